//! The metrics, as an operator sees them: through a real Prometheus server.
//!
//! The real binary's roles run as separate processes, as docker compose runs
//! them (`api`, `relay`, `consume billing`, `consume email`), each serving
//! `/healthz`, `/readyz` and `/metrics` on an HTTP_ADDR of its own, against
//! a database, an exchange and queues of this test's own. A Prometheus server
//! of the test's own (Debian's `prometheus` binary, or `PROMETHEUS_BIN`)
//! scrapes them every second, each target labelled with its compose service
//! name (`role="api"`, `"relay"`, `"email-consumer"`, `"billing-consumer"`),
//! as `prometheus.yml` labels the compose stack's. The test posts a few
//! orders, then asks Prometheus, in PromQL, what an operator would ask: is
//! every role up, were the orders created, published, processed once by each
//! consumer (billing: `order.created`; e-mail: both events), is the outbox
//! drained, how old were the events when consumed, and did nothing fail,
//! retry or dead-letter. Every PromQL check polls until its deadline (no
//! fixed sleeps); they all run, and a failure lists every check that failed
//! with Prometheus' last answer, the targets' scrape errors, the metric
//! families each role serves and the roles' last warnings.
//!
//! ```text
//! cargo test --test prometheus
//! ```
//!
//! needs Postgres and RabbitMQ as the other suites do (`TEST_DATABASE_URL`,
//! `TEST_AMQP_URL`) and a `prometheus` binary (`apt-get install prometheus`,
//! as `.ci/run` does; the package's own service is not used).
//! `PROM_TEST_KEEP_LOGS=1` keeps the roles' logs; `PROM_TEST_RUST_LOG` sets
//! their `RUST_LOG` (default `info`).
//!
//! The orders go in two waves: one order, then the rest once Prometheus has
//! seen the first processed. A label set of a metric family may appear on
//! `/metrics` only when first used (the consumers create theirs at start
//! today; nothing promises it), and then Prometheus' first sample of, say,
//! `consumer_event_age_seconds_bucket{queue=...}` already counts the first
//! event and `rate()` sees no increase; the second wave increases series
//! Prometheus already has, so the `rate()` queries have something to show.

#[path = "common/mod.rs"]
mod common;
#[path = "prometheus/dashboard.rs"]
mod dashboard;
#[path = "prometheus/roles.rs"]
mod roles;
#[path = "prometheus/server.rs"]
mod server;

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use common::{DeleteQueues, DropDatabase, create_database, test_amqp};
use roles::{Role, Roles};
use server::{Prometheus, Sample, show};

/// Orders of the first wave, then of the second.
const FIRST_WAVE: usize = 1;
const SECOND_WAVE: usize = 4;
const ORDERS: usize = FIRST_WAVE + SECOND_WAVE;

/// How long a role may take to answer `/healthz` after it was started.
const STARTUP: Duration = Duration::from_secs(60);
/// How long each stage's checks may take to come true.
const SETTLE: Duration = Duration::from_secs(30);

const BILLING_QUEUE: &str = "billing_service";
const EMAIL_QUEUE: &str = "email_notification_service";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_every_role_and_the_orders_flow_through_the_metrics() {
    let (db_name, db_url) = create_database().await;
    let _db = DropDatabase(db_name.clone());
    let mut amqp = test_amqp();
    // The roles get these delays too, so the guard finds their retry queues.
    amqp = amqp.with_retry_delays(vec![
        std::time::Duration::from_millis(200),
        std::time::Duration::from_millis(500),
    ]);
    let _queues = DeleteQueues::orders(&amqp);
    eprintln!(
        "database {db_name}, exchange {}, queues {}*",
        amqp.exchange(),
        amqp.queue_prefix()
    );
    let mut roles = roles::start(
        &db_url,
        &amqp,
        &std::env::temp_dir().join(format!("{db_name}_logs")),
    );
    let prometheus = Prometheus::start(&roles::targets(&roles)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let mut report = Report::default();

    // Every role serves its health endpoints on its own HTTP_ADDR.
    for path in ["/healthz", "/readyz"] {
        let deadline = if path == "/healthz" { STARTUP } else { SETTLE };
        for role in Role::ALL {
            let url = format!("http://{}{path}", roles.addr(role));
            let outcome = poll(deadline, &mut roles, || async {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == StatusCode::OK => Ok(()),
                    Ok(r) => Err(format!(
                        "answered {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Err(format!("no answer: {e}")),
                }
            })
            .await;
            report.record(format!("{} GET {path} answers 200", role.label()), outcome);
        }
    }

    // Prometheus scrapes every role.
    let up: Vec<Check> = Role::ALL
        .iter()
        .map(|role| {
            Check::equals(
                format!("{} is up", role.label()),
                format!(r#"up{{job="order-service",role="{}"}}"#, role.label()),
                1.0,
            )
        })
        .collect();
    report.settle(&prometheus, &mut roles, up).await;

    // First wave, and wait until Prometheus has seen it processed.
    let mut orders = post_orders(&client, roles.addr(Role::Api), FIRST_WAVE).await;
    let warm_up = vec![
        Check::equals(
            format!("after the first wave, billing processed {FIRST_WAVE}"),
            processed(BILLING_QUEUE),
            FIRST_WAVE as f64,
        ),
        Check::equals(
            format!("after the first wave, e-mail processed {}", 2 * FIRST_WAVE),
            processed(EMAIL_QUEUE),
            (2 * FIRST_WAVE) as f64,
        ),
    ];
    report.settle(&prometheus, &mut roles, warm_up).await;

    orders.extend(post_orders(&client, roles.addr(Role::Api), SECOND_WAVE).await);
    let n = ORDERS as f64;
    let flow = vec![
        Check::equals("orders created", "sum(orders_created_total)", n),
        Check::equals(
            "POST /orders answered 202, per http_requests_total",
            r#"sum(http_requests_total{method="POST",route="/orders",status="202"})"#,
            n,
        ),
        Check::at_least(
            "relay published order.created and order.confirmed of every order",
            "sum(relay_published_total)",
            2.0 * n,
        ),
        Check::equals(
            "billing processed each order.created once",
            processed(BILLING_QUEUE),
            n,
        ),
        Check::equals(
            "e-mail processed each event of both types once",
            processed(EMAIL_QUEUE),
            2.0 * n,
        ),
    ];
    report.settle(&prometheus, &mut roles, flow).await;
    let outcome = poll(SETTLE, &mut roles, || async {
        let mut pending = Vec::new();
        for location in &orders {
            let order: Value = client
                .get(format!("http://{location}"))
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            if order["status"] != "CONFIRMED" {
                pending.push(format!("{location}: {}", order["status"]));
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(pending.join(", "))
        }
    })
    .await;
    report.record(
        format!("all {ORDERS} orders CONFIRMED (GET /orders/{{id}})"),
        outcome,
    );

    let quantile =
        "histogram_quantile(0.5, sum by (le, queue) (rate(consumer_event_age_seconds_bucket[1m])))";
    let drained = vec![
        // max, not sum: the api and every relay each read the same table's
        // count at each scrape (and the consumers serve a constant 0).
        Check::equals("outbox drained", "max(outbox_pending_rows)", 0.0),
        Check::at_least(
            "the outbox age gauge is served",
            "count(outbox_oldest_pending_age_seconds)",
            1.0,
        ),
        Check::per_queue(
            "median event age, per consumer queue",
            quantile,
            &[BILLING_QUEUE, EMAIL_QUEUE],
            |v| v.is_finite() && v >= 0.0,
        ),
        Check::equals(
            "one event-age observation per billing event",
            format!(r#"sum(consumer_event_age_seconds_count{{queue=~".*{BILLING_QUEUE}"}})"#),
            n,
        ),
        Check::equals(
            "one event-age observation per e-mail event",
            format!(r#"sum(consumer_event_age_seconds_count{{queue=~".*{EMAIL_QUEUE}"}})"#),
            2.0 * n,
        ),
        Check::at_least(
            "relay confirm latency observed",
            "sum(relay_confirm_duration_seconds_count)",
            1.0,
        ),
        Check::at_least(
            "HTTP latency observed (every request of the API at least)",
            "sum(http_request_duration_seconds_count)",
            n,
        ),
    ];
    report.settle(&prometheus, &mut roles, drained).await;

    // Nothing went wrong in a healthy run (absent series count as 0: a label
    // set appears when first used).
    let zero = [
        "relay_failed_total",
        "consumer_duplicates_total",
        "consumer_retried_total",
        "consumer_dead_lettered_total",
        "consumer_requeued_total",
        "dead_letter_queue_messages",
    ]
    .into_iter()
    .map(|metric| {
        Check::equals(
            format!("{metric} is 0"),
            format!("sum({metric}) or vector(0)"),
            0.0,
        )
    })
    .collect();
    report.settle(&prometheus, &mut roles, zero).await;

    // The dashboard's queries evaluate, against the metrics just produced.
    let panels = dashboard::checks();
    report.settle(&prometheus, &mut roles, panels).await;
    let unknown = dashboard::unknown_metrics(&prometheus).await;
    report.record("every metric the dashboard names is served".into(), unknown);

    report.finish(&prometheus, &roles, &client).await;
}

/// `POST /orders` `count` times; returns where each order is, `addr/orders/{id}`.
async fn post_orders(
    client: &reqwest::Client,
    api: std::net::SocketAddr,
    count: usize,
) -> Vec<String> {
    let mut locations = Vec::new();
    for i in 0..count {
        let response = client
            .post(format!("http://{api}/orders"))
            .json(
                &json!({"productId": format!("p{i}"), "userId": "prometheus_test", "amount": 500}),
            )
            .send()
            .await
            .expect("POST /orders");
        assert_eq!(response.status(), StatusCode::ACCEPTED, "POST /orders");
        let location = response.headers()[reqwest::header::LOCATION]
            .to_str()
            .expect("a Location header")
            .to_owned();
        locations.push(format!("{api}{location}"));
    }
    locations
}

fn processed(queue: &str) -> String {
    format!(r#"sum(consumer_processed_total{{queue=~".*{queue}"}})"#)
}

type Verdict = Box<dyn Fn(&[Sample]) -> Result<(), String> + Send + Sync>;

/// A PromQL query and what its answer must be.
pub struct Check {
    what: String,
    promql: String,
    verdict: Verdict,
}

impl Check {
    pub fn new(what: impl Into<String>, promql: impl Into<String>, verdict: Verdict) -> Self {
        Self {
            what: what.into(),
            promql: promql.into(),
            verdict,
        }
    }

    /// One sample, equal to `expected`.
    fn equals(what: impl Into<String>, promql: impl Into<String>, expected: f64) -> Self {
        Self::one(what, promql, format!("== {expected}"), move |v| {
            v == expected
        })
    }

    /// One sample, at least `min`.
    fn at_least(what: impl Into<String>, promql: impl Into<String>, min: f64) -> Self {
        Self::one(what, promql, format!(">= {min}"), move |v| v >= min)
    }

    fn one(
        what: impl Into<String>,
        promql: impl Into<String>,
        wanted: String,
        ok: impl Fn(f64) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::new(
            what,
            promql,
            Box::new(move |samples| match samples {
                [sample] if ok(sample.value) => Ok(()),
                _ => Err(format!("wanted one sample {wanted}, got {}", show(samples))),
            }),
        )
    }

    /// One sample for each of `queues` (its `queue` label ends with it),
    /// each passing `ok`.
    fn per_queue(
        what: impl Into<String>,
        promql: impl Into<String>,
        queues: &[&'static str],
        ok: impl Fn(f64) -> bool + Send + Sync + 'static,
    ) -> Self {
        let queues = queues.to_vec();
        Self::new(
            what,
            promql,
            Box::new(move |samples| {
                let missing: Vec<&str> = queues
                    .iter()
                    .copied()
                    .filter(|queue| {
                        !samples.iter().any(|s| {
                            s.labels.get("queue").is_some_and(|q| q.ends_with(queue)) && ok(s.value)
                        })
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "no good value for {missing:?}, got {}",
                        show(samples)
                    ))
                }
            }),
        )
    }
}

/// Polls `attempt` until it succeeds or `deadline` passes (then its last
/// error); panics at once if a role exited.
async fn poll<F, Fut>(deadline: Duration, roles: &mut Roles, mut attempt: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let until = Instant::now() + deadline;
    loop {
        let outcome = attempt().await;
        let exited = roles.exited();
        assert!(
            exited.is_empty(),
            "{}\n{}",
            exited.join("\n"),
            roles.diagnostics()
        );
        if outcome.is_ok() || Instant::now() >= until {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every check's outcome; the test fails at the end, listing each failure.
#[derive(Default)]
struct Report {
    outcomes: Vec<(String, Result<(), String>)>,
}

impl Report {
    fn record(&mut self, what: String, outcome: Result<(), String>) {
        eprintln!(
            "{} {what}{}",
            if outcome.is_ok() { "ok  " } else { "FAIL" },
            outcome
                .as_ref()
                .err()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        self.outcomes.push((what, outcome));
    }

    /// Polls all of `checks` together until each has passed once, or the
    /// deadline passes; records each one's outcome.
    async fn settle(&mut self, prometheus: &Prometheus, roles: &mut Roles, checks: Vec<Check>) {
        let mut pending: Vec<(Check, Result<(), String>)> = checks
            .into_iter()
            .map(|c| (c, Err("not evaluated".into())))
            .collect();
        let until = Instant::now() + SETTLE;
        loop {
            let mut still = Vec::new();
            for (check, _) in pending {
                let outcome = match prometheus.query(&check.promql).await {
                    Ok(samples) => (check.verdict)(&samples),
                    Err(error) => Err(format!("query failed: {error}")),
                };
                match outcome {
                    Ok(()) => self.record(check.what.clone(), Ok(())),
                    Err(error) => still.push((check, Err(error))),
                }
            }
            pending = still;
            let exited = roles.exited();
            assert!(
                exited.is_empty(),
                "{}\n{}",
                exited.join("\n"),
                roles.diagnostics()
            );
            if pending.is_empty() || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for (check, outcome) in pending {
            let outcome = outcome.map_err(|e| format!("`{}`: {e}", check.promql));
            self.record(check.what, outcome);
        }
    }

    /// Panics listing every failed check, with what may explain it.
    async fn finish(self, prometheus: &Prometheus, roles: &Roles, client: &reqwest::Client) {
        let failed: Vec<String> = self
            .outcomes
            .iter()
            .filter_map(|(what, outcome)| outcome.as_ref().err().map(|e| format!("- {what}: {e}")))
            .collect();
        if failed.is_empty() {
            return;
        }
        let mut families = String::new();
        for role in Role::ALL {
            let url = format!("http://{}/metrics", roles.addr(role));
            let names = match client.get(&url).send().await {
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    let names: Vec<&str> = text
                        .lines()
                        .filter_map(|l| l.strip_prefix("# TYPE "))
                        .collect();
                    format!("{status}, {} families: {}", names.len(), names.join(", "))
                }
                Err(e) => format!("no answer: {e}"),
            };
            families.push_str(&format!("{}: {names}\n", role.label()));
        }
        let log = prometheus.log();
        let log_tail: Vec<&str> = log.lines().rev().take(10).collect();
        panic!(
            "{} of {} checks failed:\n{}\n\nPrometheus targets:\n{}\n\nGET /metrics of each role:\n{families}\n\
             Prometheus log (last lines, newest first):\n{}\n\n{}",
            failed.len(),
            self.outcomes.len(),
            failed.join("\n"),
            prometheus.targets().await,
            log_tail.join("\n"),
            roles.diagnostics()
        );
    }
}
