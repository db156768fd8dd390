//! End to end: the real binary (`order-service run`) under a fixed offered
//! load; latency from the order's commit to the billing consumer's commit,
//! and on to the "payment confirmed" e-mail (the `order.confirmed` event
//! billing writes through the outbox, published by the relay, recorded by
//! the e-mail consumer); whether both backlogs stay bounded, peak RSS and
//! CPU per 1,000 orders; and the CPU each order costs Postgres, RabbitMQ and
//! the service over the measured window (from the load's start until both
//! backlogs are drained), read from /proc ([`crate::cpu`]), with the share of
//! that window in which a task waited for a core (the kernel's CPU pressure).
//!
//! Knobs (tuning and smoke runs; the defaults are the measurement):
//! `E2E_RATE` (base rate, 1,000/s), `E2E_SECONDS` (load per step, 15 s),
//! `E2E_LADDER=0` (the base rate only), `E2E_RELAY_MODE=wal` (the relay in
//! WAL mode: `RELAY_MODE=wal`, a slot of the step's database).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cpu::{Parties, PerOrder};
use crate::report::Report;
use crate::service::Service;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp, percentile};

/// Seconds of load per step, unless `E2E_SECONDS` says otherwise.
const SECONDS: u64 = 15;
/// A step is sustained only if both backlogs are gone this soon after the load.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// ... and both p99s stay under this.
const P99_LIMIT_MS: f64 = 1000.0;

fn seconds() -> u64 {
    std::env::var("E2E_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(SECONDS)
}

/// One latency distribution, in ms, sorted.
pub struct Latencies {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub values: Vec<f64>,
}

impl Latencies {
    fn new(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            p50_ms: percentile(&values, 50.0),
            p99_ms: percentile(&values, 99.0),
            max_ms: values.last().copied().unwrap_or(f64::NAN),
            values,
        }
    }

    fn summary(&self) -> String {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

pub struct StepResult {
    pub offered: u64,
    pub accepted_rate: f64,
    /// Order commit to billing commit.
    pub billing: Latencies,
    /// Order commit to the "payment confirmed" e-mail's commit.
    pub mail: Latencies,
    /// Most orders still PENDING (not charged) at a sample.
    pub max_backlog: i64,
    /// Most orders without their "payment confirmed" e-mail at a sample.
    pub max_mail_backlog: i64,
    /// From the end of the load until every order was charged.
    pub drained_in: Duration,
    /// From the end of the load until every order had its "payment
    /// confirmed" e-mail.
    pub mails_drained_in: Duration,
    pub peak_rss_mib: f64,
    pub cpu_per_1000: f64,
    /// CPU per order of Postgres, RabbitMQ and the service, same window.
    pub cpu: PerOrder,
    /// The share of the window in which a task waited for a core (the
    /// kernel's CPU pressure), if the kernel reports it.
    pub cpu_pressure: Option<f64>,
    /// Latencies end at the commits (else at their transactions' start).
    pub exact: bool,
    /// Executor time per order by statement, when the server loads
    /// `pg_stat_statements`.
    pub statements: Option<Vec<crate::statements::Statement>>,
    /// (second, accepted, charged, payment-confirmed mails) per second of
    /// the run.
    pub timeline: Vec<(i64, i64, i64, i64)>,
}

impl StepResult {
    /// Why this step is not sustained, if it is not: both events must keep
    /// up, the billing and the "payment confirmed" e-mails.
    fn shortfall(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.accepted_rate < 0.95 * self.offered as f64 {
            why.push(format!("accepted only {:.0}/s", self.accepted_rate));
        }
        for (what, latencies, drained) in [
            ("billing", &self.billing, self.drained_in),
            ("payment-confirmed mail", &self.mail, self.mails_drained_in),
        ] {
            if latencies.p99_ms.is_nan() || latencies.p99_ms >= P99_LIMIT_MS {
                why.push(format!("{what} p99 {:.1} ms", latencies.p99_ms));
            }
            if drained >= DRAIN_LIMIT {
                why.push(format!(
                    "{what} backlog drained {:.1} s after the load",
                    drained.as_secs_f64()
                ));
            }
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// Orders not yet charged, and orders without their "payment confirmed"
/// e-mail, in one statement.
async fn backlogs(db: &BenchDb) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE status = 'PENDING'), \
                (SELECT count(*) FROM orders) \
                - (SELECT count(*) FROM notifications WHERE event_type = 'order.confirmed')",
    )
    .fetch_one(&db.pool)
    .await?)
}

/// The relay's mode (`E2E_RELAY_MODE`: `poll`, the default, or `wal`).
fn relay_mode() -> String {
    std::env::var("E2E_RELAY_MODE").unwrap_or_else(|_| "poll".into())
}

/// Offers `rate` orders per second for `seconds()`, open loop.
async fn step(rate: u64) -> anyhow::Result<StepResult> {
    let seconds = seconds();
    let db = BenchDb::new("e2e", 4).await?;
    let amqp = bench_amqp("e2e");
    let env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("AMQP_URL", amqp.url().expose().to_owned()),
        ("AMQP_EXCHANGE", amqp.exchange().to_owned()),
        ("AMQP_QUEUE_PREFIX", amqp.queue_prefix().to_owned()),
        ("DATABASE_POOL_SIZE", "20".into()),
    ];
    let mut env = env;
    if relay_mode() == "wal" {
        env.push(("RELAY_MODE", "wal".into()));
        env.push(("WAL_SLOT", db.name.clone()));
        env.push(("WAL_PUBLICATION", db.name.clone()));
    }
    let service = Service::start(&["run"], &env).await?;
    let url = format!("http://{}/orders", service.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let commits = "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
                   WHERE datname = current_database()";
    let commits_before = db.scalar(commits).await;
    let parties = Parties {
        postgres: crate::cpu::postmaster(&db.pool).await?,
        rabbitmq: crate::cpu::rabbitmq(),
        service: service.child.id(),
    };
    let with_statements = crate::statements::prepare(&db.pool).await?;
    let cpu_before = service.cpu_seconds();
    let parties_before = parties.sample();
    let waited_before = crate::cpu::waited_for_a_core();
    let started = Instant::now();
    let total = rate * seconds;
    let (mut max_backlog, mut max_mail_backlog) = (0, 0);
    let mut next_sample = Duration::ZERO;
    let body = r#"{"productId":"123","userId":"user_99","amount":500}"#;
    for i in 0..total {
        // Open loop: request i is due at i / rate seconds, whatever the answers do.
        let due = Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let (client, url, accepted, failed) = (
            client.clone(),
            url.clone(),
            accepted.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            let ok = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 202);
            if ok {
                accepted.fetch_add(1, Ordering::Relaxed)
            } else {
                failed.fetch_add(1, Ordering::Relaxed)
            };
        });
        if started.elapsed() >= next_sample {
            next_sample += Duration::from_secs(1);
            let (pending, unmailed) = backlogs(&db).await?;
            max_backlog = max_backlog.max(pending);
            max_mail_backlog = max_mail_backlog.max(unmailed);
        }
    }
    let sent_in = started.elapsed();
    // Drain: wait until every accepted order is charged, and has its
    // "payment confirmed" e-mail; each timed on its own.
    let drain_started = Instant::now();
    let (mut drained_in, mut mails_drained_in) = (None, None);
    while drained_in.is_none() || mails_drained_in.is_none() {
        let done = accepted.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) == total;
        let (pending, unmailed) = backlogs(&db).await?;
        if done && pending == 0 {
            drained_in.get_or_insert_with(|| drain_started.elapsed());
        }
        if done && unmailed == 0 {
            mails_drained_in.get_or_insert_with(|| drain_started.elapsed());
        }
        anyhow::ensure!(
            drain_started.elapsed() < Duration::from_secs(120),
            "backlog did not drain: {pending} PENDING, {unmailed} without their payment-confirmed mail"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (drained_in, mails_drained_in) = (
        drained_in.unwrap_or_default(),
        mails_drained_in.unwrap_or_default(),
    );
    let cpu = service.cpu_seconds() - cpu_before;
    let parties_after = parties.sample();
    let cpu_pressure = waited_before
        .zip(crate::cpu::waited_for_a_core())
        .map(|(before, after)| (after - before) / started.elapsed().as_secs_f64());
    let peak_rss_mib = service.peak_rss_mib();
    service.stop()?;
    // Counted once the service's connections are closed (and have reported).
    let transactions = db.scalar(commits).await - commits_before;
    let orders = db.scalar("SELECT count(*) FROM orders").await;
    let cpu_per_order = PerOrder::between(parties_before, parties_after, orders);
    let statements = match with_statements {
        true => Some(crate::statements::per_order(&db.pool, orders).await?),
        false => None,
    };
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM ledger").await == orders,
        "one charge per order"
    );
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM outbox WHERE event_type = 'order.confirmed'")
            .await
            == orders,
        "one order.confirmed per order"
    );
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM notifications WHERE event_type = 'order.confirmed'")
            .await
            == orders
            && db
                .scalar("SELECT count(*) FROM notifications WHERE event_type = 'order.created'")
                .await
                == orders,
        "two mails per order, one per event"
    );
    // The commits: their exact times when Postgres records commit times,
    // else their transactions' start (`charged_at`, `sent_at`), earlier.
    let exact = commit_times(&db).await?;
    let (billing_sql, mail_sql) = if exact {
        (
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp(l.xmin) - o.created_at) * 1000)::float8 \
             FROM orders o JOIN ledger l ON l.order_id = o.id",
            "SELECT (extract(epoch FROM pg_xact_commit_timestamp(n.xmin) - o.created_at) * 1000)::float8 \
             FROM orders o JOIN notifications n ON n.order_id = o.id AND n.event_type = 'order.confirmed'",
        )
    } else {
        (
            "SELECT (extract(epoch FROM l.charged_at - o.created_at) * 1000)::float8 \
             FROM orders o JOIN ledger l ON l.order_id = o.id",
            "SELECT (extract(epoch FROM n.sent_at - o.created_at) * 1000)::float8 \
             FROM orders o JOIN notifications n ON n.order_id = o.id AND n.event_type = 'order.confirmed'",
        )
    };
    let billing = Latencies::new(sqlx::query_scalar(billing_sql).fetch_all(&db.pool).await?);
    let mail = Latencies::new(sqlx::query_scalar(mail_sql).fetch_all(&db.pool).await?);
    // The hops by the relay's mark; in WAL mode rows keep no publish time.
    if relay_mode() != "wal" {
        let (outbox_p50, outbox_p99, queue_p50, queue_p99): (f64, f64, f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM x.published_at - x.created_at) * 1000)::float8, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM x.published_at - x.created_at) * 1000)::float8, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM l.charged_at - x.published_at) * 1000)::float8, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM l.charged_at - x.published_at) * 1000)::float8 \
             FROM outbox x JOIN ledger l ON l.transaction_id = x.transaction_id",
        )
        .fetch_one(&db.pool)
        .await?;
        // The second hop: billing's order.confirmed row to its publish, and on
        // to the e-mail consumer's transaction.
        let (confirmed_p50, confirmed_p99, mail_p50, mail_p99): (f64, f64, f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM x.published_at - x.created_at) * 1000)::float8, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM x.published_at - x.created_at) * 1000)::float8, \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM n.sent_at - x.published_at) * 1000)::float8, \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM n.sent_at - x.published_at) * 1000)::float8 \
             FROM outbox x JOIN notifications n ON n.transaction_id = x.transaction_id \
             WHERE x.event_type = 'order.confirmed' AND n.event_type = 'order.confirmed'",
        )
        .fetch_one(&db.pool)
        .await?;
        println!(
            "  breakdown at {rate}/s: commit to publish confirmed (mark) p50 {outbox_p50:.1} ms p99 {outbox_p99:.1} ms; \
             mark to billing p50 {queue_p50:.1} ms p99 {queue_p99:.1} ms; \
             billing to order.confirmed marked p50 {confirmed_p50:.1} ms p99 {confirmed_p99:.1} ms; \
             mark to payment-confirmed mail p50 {mail_p50:.1} ms p99 {mail_p99:.1} ms; \
             {:.1} Postgres transactions per order",
            transactions as f64 / orders.max(1) as f64
        );
    } else {
        println!(
            "  breakdown at {rate}/s: none by the mark (the WAL relay marks no row); \
             {:.1} Postgres transactions per order",
            transactions as f64 / orders.max(1) as f64
        );
    }
    let timeline: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "WITH t0 AS (SELECT min(created_at) AS t FROM orders) \
         SELECT s::bigint, \
           (SELECT count(*) FROM orders, t0 WHERE floor(extract(epoch FROM created_at - t0.t)) = s)::bigint, \
           (SELECT count(*) FROM ledger, t0 WHERE floor(extract(epoch FROM charged_at - t0.t)) = s)::bigint, \
           (SELECT count(*) FROM notifications, t0 WHERE event_type = 'order.confirmed' \
              AND floor(extract(epoch FROM sent_at - t0.t)) = s)::bigint \
         FROM generate_series(0, $1) s",
    )
    .bind(seconds as i64 + 2)
    .fetch_all(&db.pool)
    .await?;
    cleanup_amqp(&amqp).await?;
    db.drop_db().await?;
    Ok(StepResult {
        offered: rate,
        accepted_rate: accepted.load(Ordering::Relaxed) as f64 / sent_in.as_secs_f64(),
        billing,
        mail,
        max_backlog,
        max_mail_backlog,
        drained_in,
        mails_drained_in,
        peak_rss_mib,
        cpu_per_1000: cpu / orders.max(1) as f64 * 1000.0,
        cpu: cpu_per_order,
        cpu_pressure,
        exact,
        statements,
        timeline,
    })
}

/// Whether Postgres records commit times (`track_commit_timestamp`), so the
/// consumers' commits are known exactly.
async fn commit_times(db: &BenchDb) -> anyhow::Result<bool> {
    let on: String = sqlx::query_scalar("SHOW track_commit_timestamp")
        .fetch_one(&db.pool)
        .await?;
    Ok(on == "on")
}

/// How saturated the machine's cores were over a step's window.
fn pressure(r: &StepResult) -> String {
    match r.cpu_pressure {
        Some(share) => format!(
            "a task waited for a core {:.0}% of the time (CPU pressure)",
            share * 100.0
        ),
        None => "no CPU pressure reported (/proc/pressure/cpu)".into(),
    }
}

fn describe(r: &StepResult) -> String {
    format!(
        "offered {}/s: accepted {:.0}/s, commit-to-billing {}, commit-to-payment-confirmed-mail {}, \
         max PENDING {}, max without payment-confirmed mail {}, drained {:.1} s (billing) and \
         {:.1} s (mails) after the load, peak RSS {:.1} MiB, {:.2} CPU s per 1,000 orders; {}; {}",
        r.offered,
        r.accepted_rate,
        r.billing.summary(),
        r.mail.summary(),
        r.max_backlog,
        r.max_mail_backlog,
        r.drained_in.as_secs_f64(),
        r.mails_drained_in.as_secs_f64(),
        r.peak_rss_mib,
        r.cpu_per_1000,
        r.cpu.summary(),
        pressure(r)
    )
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    // E2E_RATE measures another base rate (tuning runs); the target is at 1,000/s.
    let base_rate = std::env::var("E2E_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let base = step(base_rate).await?;
    println!("e2e {}", describe(&base));
    let (to_billing, to_mail) = if base.exact {
        (
            "order written to billing committed",
            "order written to payment-confirmed e-mail committed",
        )
    } else {
        println!(
            "  (approximate: ends at the consumers' transactions' start; for their commits, \
             set track_commit_timestamp = on in Postgres and restart it)"
        );
        (
            "order written to billing transaction start, approximate",
            "order written to payment-confirmed e-mail transaction start, approximate",
        )
    };
    report.row(
        &format!(
            "End to end at {base_rate} orders/s, RELAY_MODE={} ({to_billing})",
            relay_mode()
        ),
        base.billing.summary(),
        format!(
            "max PENDING {}, drained {:.1} s after the load",
            base.max_backlog,
            base.drained_in.as_secs_f64()
        ),
        f64::NAN,
        "p50 <= 10 ms, p99 <= 50 ms",
    );
    report.row(
        &format!(
            "End to end at {base_rate} orders/s, RELAY_MODE={}, through order.confirmed ({to_mail})",
            relay_mode()
        ),
        base.mail.summary(),
        format!(
            "max orders without it {}, drained {:.1} s after the load",
            base.max_mail_backlog,
            base.mails_drained_in.as_secs_f64()
        ),
        f64::NAN,
        "p99 at most 1.2x the code before issue 23's, same machine",
    );
    report.row(
        &format!("Resources at {base_rate} orders/s (`run`, all roles)"),
        format!(
            "peak RSS {:.1} MiB, {:.2} CPU s per 1,000 orders",
            base.peak_rss_mib, base.cpu_per_1000
        ),
        "-".into(),
        f64::NAN,
        "RSS < 64 MiB",
    );
    report.row(
        &format!(
            "CPU per order at {base_rate} orders/s, RELAY_MODE={}, from /proc (Postgres: the \
             whole cluster; RabbitMQ: beam.smp; the service: `run`)",
            relay_mode()
        ),
        base.cpu.summary(),
        pressure(&base),
        f64::NAN,
        "total at most 1.1x the code before issue 23's (then about 0.77 + 0.46 + 0.56 ms)",
    );
    report.note(format!("e2e {}", describe(&base)));
    match &base.statements {
        Some(statements) => {
            let (relay, total, top) = crate::statements::summary(statements);
            report.row(
                &format!(
                    "Postgres executor time per order at {base_rate} orders/s, RELAY_MODE={} \
                     (pg_stat_statements), the relay's statements",
                    relay_mode()
                ),
                format!("{relay:.0} µs"),
                format!("all statements {total:.0} µs per order"),
                f64::NAN,
                "WAL mode: at most 60 µs (polling about 250 µs)",
            );
            report.note(format!(
                "Executor time per order, RELAY_MODE={}, top statements: {}",
                relay_mode(),
                top.join("; ")
            ));
        }
        None => report.note(
            "No executor time by statement: the server does not load pg_stat_statements \
             (ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements', then restart)"
                .to_owned(),
        ),
    }
    // The highest offered load at which BOTH events keep up: billing and
    // the payment-confirmed mails, each with its backlog drained and its
    // latency sane.
    let mut best: Option<StepResult> = None;
    // E2E_LADDER=0 measures the base rate only (for quick tuning runs).
    let ladder: &[u64] = match std::env::var("E2E_LADDER").as_deref() {
        Ok("0") => &[],
        _ => &[1500, 2000, 3000, 4000, 5000, 6000],
    };
    for &rate in ladder {
        let r = step(rate).await?;
        println!("e2e {}", describe(&r));
        report.note(format!("e2e {}", describe(&r)));
        if let Some(why) = r.shortfall() {
            report.note(format!("e2e {rate}/s not sustained: {why}"));
            break;
        }
        best = Some(r);
    }
    if let Some(best) = &best {
        let limit = DRAIN_LIMIT.as_secs();
        let label = if ladder.last() == Some(&best.offered) {
            format!(
                "Highest sustained offered load (billing and payment-confirmed mails both \
                 drained within {limit} s; the ladder's top step)"
            )
        } else {
            format!(
                "Highest sustained offered load (billing and payment-confirmed mails both \
                 drained within {limit} s)"
            )
        };
        report.row(
            &label,
            format!(
                "{}/s: billing p50 {:.1} ms, p99 {:.1} ms; payment-confirmed mail p50 {:.1} ms, \
                 p99 {:.1} ms",
                best.offered,
                best.billing.p50_ms,
                best.billing.p99_ms,
                best.mail.p50_ms,
                best.mail.p99_ms
            ),
            format!(
                "max PENDING {}, max without payment-confirmed mail {}",
                best.max_backlog, best.max_mail_backlog
            ),
            f64::NAN,
            "-",
        );
    }
    report
        .files
        .push(("e2e-1000.svg".into(), crate::report::plot(&base)));
    Ok(())
}
