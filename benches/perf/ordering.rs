//! The e-mail consumer's backlog drain with per-aggregate order on beside
//! off (issue 23's "at least 0.8×"), in the same run, on the real binary.
//!
//! Each drain has a database and queues of its own. `N` orders'
//! `order.created` and `order.confirmed` rows are written through the
//! events' outbox ([`EVENTS`], which numbers them: seq 1 and 2 within each
//! order). Two backlogs are drained, each with order on and off:
//! - in publication order, as a relay publishes the outbox: what order
//!   itself costs (the places, the in-flight waits);
//! - with every tenth order's `order.created` then moved [`DISPLACEMENT`]
//!   rows later in the outbox's id order, so its `order.confirmed` is
//!   published well before it, beyond the consumer's prefetch: with order
//!   on, that event must be held until its predecessor comes (what holding
//!   costs besides).
//!
//! `order-service relay` (one worker, so the queue follows id order)
//! publishes the outbox while no consumer runs; then `order-service consume
//! email` starts with `EMAIL_IN_SEQUENCE=true` or `false` (no `SMTP_URL`,
//! `EMAIL_FAILURE_RATE=0`), and the drain is timed from its first
//! notification to the last of the `2N` (every event applied, the queue
//! empty). Rounds alternate which side goes first; the ratio reported is
//! the median round's.
//!
//! Beside the rate, for each side: how many orders had their "payment
//! confirmed" recorded before their "order received" (order off: a few in
//! publication order, about the displaced tenth else; order on: must be 0), and the peak of the consumer's
//! held-events metrics (every metric whose name has `held`), sampled
//! during the drain, and the drain's CPU per event, from /proc: the
//! consumer process, Postgres (the whole cluster, this benchmark's own
//! polling included: one read of the notifications' highest id every
//! 10 ms) and RabbitMQ.
//!
//! `ORDERING_BENCH_N` (default 10,000 orders, so 20,000 events) and
//! `ORDERING_BENCH_ROUNDS` (default 3).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use order_service::config::AmqpConfig;
use order_service::orders::events::{Charge, EMAIL};
use order_service::orders::{EVENTS, OrderConfirmed, OrderEvent};
use outbox_common::amqp::QueueNames;
use tokio_util::sync::CancellationToken;

use crate::cpu::{Parties, PerOrder};
use crate::report::Report;
use crate::service::Service;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp};

/// Every this many orders, one has its `order.created` published after its
/// `order.confirmed`.
const DISPLACED_EVERY: usize = 10;
/// How many outbox rows later a displaced `order.created` goes: past the
/// relay's batch (750) and the consumer's prefetch (128), so the consumer
/// sees its `order.confirmed` alone.
const DISPLACEMENT: i64 = 1000;
/// Orders written per outbox transaction while filling.
const CHUNK: usize = 500;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// One drain.
struct Drain {
    in_sequence: bool,
    /// Events per second, first notification to last.
    rate: f64,
    /// Orders whose "payment confirmed" was recorded before their "order
    /// received" (by the notifications' ids, which follow the consumer's
    /// writes).
    inverted: i64,
    /// Peak of each `held` series of the consumer's metrics.
    held: BTreeMap<String, f64>,
    /// CPU per event, consumer start to drained (`_ms` fields: ms per event).
    cpu: PerOrder,
    /// The consumer's transactions that applied events (distinct `xmin` of
    /// its dedup rows): steadier than the rate on a noisy machine.
    transactions: i64,
}

impl Drain {
    fn side(&self) -> &'static str {
        if self.in_sequence { "on" } else { "off" }
    }

    fn cost_summary(&self) -> String {
        let c = &self.cpu;
        format!(
            "CPU per event: consumer {:.0} us, Postgres {:.0} us, RabbitMQ {:.0} us; \
             {} transactions applied events",
            c.service_ms * 1000.0,
            c.postgres_ms * 1000.0,
            c.rabbitmq_ms * 1000.0,
            self.transactions
        )
    }

    fn held_summary(&self) -> String {
        if self.held.is_empty() {
            return "no held-events metric exposed".into();
        }
        let peaks: Vec<String> = self
            .held
            .iter()
            .map(|(series, peak)| format!("{series} peak {peak}"))
            .collect();
        peaks.join(", ")
    }
}

/// Writes `n` orders' two events through the events' outbox, numbered,
/// then, if `displace`, moves every [`DISPLACED_EVERY`]th `order.created`
/// [`DISPLACEMENT`] rows later. Returns the number of displaced orders.
async fn fill(db: &BenchDb, n: usize, displace: bool) -> anyhow::Result<usize> {
    let now = chrono::Utc::now();
    let mut displaced = Vec::new();
    for start in (0..n).step_by(CHUNK) {
        let mut rows = Vec::with_capacity(2 * CHUNK);
        for i in start..(start + CHUNK).min(n) {
            let created = OrderEvent {
                transaction_id: uuid::Uuid::new_v4(),
                order_id: uuid::Uuid::new_v4(),
                product_id: "123".into(),
                user_id: format!("user_{i}"),
                amount: 500,
                timestamp: now,
            };
            let charge = Charge {
                ledger_id: i64::try_from(i)?,
                amount: 500,
                charged_at: now,
            };
            let confirmed = OrderConfirmed::new(created.transaction_id, &created, charge);
            rows.push(created.created_row(serde_json::json!({})));
            rows.push(confirmed.row(serde_json::json!({})));
            if displace && i % DISPLACED_EVERY == 0 {
                displaced.push(created.order_id.to_string());
            }
        }
        let mut tx = db.pool.begin().await?;
        EVENTS.insert_many(&mut tx, &rows).await?;
        tx.commit().await?;
    }
    // Renumber the ids in the wanted publishing order (negative first, so
    // no new id meets an old one), then back to positive.
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "WITH target AS ( \
           SELECT id, row_number() OVER (ORDER BY 2 * id + CASE \
             WHEN event_type = 'order.created' AND aggregate_id = ANY($1) THEN 2 * $2 + 1 \
             ELSE 0 END) AS pos \
           FROM outbox) \
         UPDATE outbox o SET id = -t.pos FROM target t WHERE o.id = t.id",
    )
    .bind(&displaced)
    .bind(DISPLACEMENT)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE outbox SET id = -id WHERE id < 0")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    Ok(displaced.len())
}

/// Ready messages in the e-mail consumer's main queue.
async fn email_queue_depth(amqp: &AmqpConfig) -> anyhow::Result<u32> {
    let connection =
        outbox_common::amqp::connect(amqp, "bench ordering", &CancellationToken::new()).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            QueueNames::new(amqp, EMAIL).main.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "counted".into()).await;
    Ok(declared.message_count())
}

/// The service's settings for `db` and `amqp`, as the e2e step sets them.
fn service_env(db: &BenchDb, amqp: &AmqpConfig) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("AMQP_URL", amqp.url().expose().to_owned()),
        ("AMQP_EXCHANGE", amqp.exchange().to_owned()),
        ("AMQP_QUEUE_PREFIX", amqp.queue_prefix().to_owned()),
    ]
}

/// Every metric series whose name has `held`, with its value.
async fn held_metrics(client: &reqwest::Client, addr: &str) -> Vec<(String, f64)> {
    let Ok(response) = client.get(format!("http://{addr}/metrics")).send().await else {
        return Vec::new();
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            name.contains("held")
                .then(|| Some((series.to_owned(), value.parse().ok()?)))?
        })
        .collect()
}

/// Fills a queue with `n` orders' events (a tenth out of order if
/// `displace`) and drains it with order on or off.
async fn drain(n: usize, displace: bool, in_sequence: bool) -> anyhow::Result<Drain> {
    let events = 2 * i64::try_from(n)?;
    let db = BenchDb::new("ordering", 4).await?;
    let amqp = bench_amqp("ordering");
    let displaced = fill(&db, n, displace).await?;
    let env = service_env(&db, &amqp);

    // Publish the whole outbox while no consumer runs.
    let mut relay_env = env.clone();
    relay_env.push(("RELAY_WORKERS", "1".into()));
    let relay = Service::start(&["relay"], &relay_env).await?;
    let started = Instant::now();
    while db
        .scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .await
        > 0
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the relay did not drain the outbox"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop()?;
    let queued = email_queue_depth(&amqp).await?;
    anyhow::ensure!(
        i64::from(queued) == events,
        "{queued} messages in the e-mail queue, {events} expected"
    );

    let mut consumer_env = env;
    consumer_env.push(("EMAIL_IN_SEQUENCE", in_sequence.to_string()));
    consumer_env.push(("EMAIL_FAILURE_RATE", "0".into()));
    let consumer = Service::start(&["consume", "email"], &consumer_env).await?;
    let parties = Parties {
        postgres: crate::cpu::postmaster(&db.pool).await?,
        rabbitmq: crate::cpu::rabbitmq(),
        service: consumer.child.id(),
    };
    let cpu_before = parties.sample();
    let client = reqwest::Client::new();
    let mut held = BTreeMap::new();
    let (mut first, mut next_scrape) = (None, Instant::now());
    let started = Instant::now();
    let finished = loop {
        // The highest id, read off the primary key's end: a count would
        // scan the table every poll, a cost that grows with the drain's
        // length and taxes the slower side more. Ids are drawn one by one
        // and no drain transaction rolls back, so the last id is the count
        // once every notification has committed (checked below).
        let applied = db
            .scalar("SELECT coalesce(max(id), 0) FROM notifications")
            .await;
        let now = Instant::now();
        if applied > 0 {
            first.get_or_insert(now);
        }
        if now >= next_scrape {
            next_scrape = now + Duration::from_millis(250);
            for (series, value) in held_metrics(&client, &consumer.addr).await {
                let peak = held.entry(series).or_insert(value);
                *peak = f64::max(*peak, value);
            }
        }
        if applied >= events
            && db.scalar("SELECT count(*) FROM notifications").await == events
            && email_queue_depth(&amqp).await? == 0
        {
            break now;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the e-mail consumer did not drain: {applied} of {events} applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The drain's CPU, per event: the consumer, Postgres (the whole cluster,
    // this benchmark's own polling included) and RabbitMQ.
    let cpu = PerOrder::between(cpu_before, parties.sample(), events);
    consumer.stop()?;
    let first = first.unwrap_or(started);
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM notifications").await == events,
        "one notification per event"
    );
    let inverted = db
        .scalar(
            "SELECT count(*) FROM notifications c JOIN notifications r \
               ON r.order_id = c.order_id AND r.event_type = 'order.created' \
             WHERE c.event_type = 'order.confirmed' AND c.id < r.id",
        )
        .await;
    let transactions = db
        .scalar("SELECT count(DISTINCT xmin::text) FROM processed_messages")
        .await;
    cleanup_amqp(&amqp).await?;
    db.drop_db().await?;
    let drain = Drain {
        in_sequence,
        rate: events as f64 / finished.duration_since(first).as_secs_f64(),
        inverted,
        held,
        cpu,
        transactions,
    };
    println!(
        "ordering {}: {events} events ({displaced} orders' order.created published \
         {DISPLACEMENT} rows after their order.confirmed) drained at {:.0} events/s; \
         {inverted} orders' payment-confirmed recorded before their order-received; {}; {}",
        drain.side(),
        drain.rate,
        drain.held_summary(),
        drain.cost_summary()
    );
    Ok(drain)
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let n = env_usize("ORDERING_BENCH_N", 10_000);
    let rounds = env_usize("ORDERING_BENCH_ROUNDS", 3);
    // The backlog as one relay published it, then with a tenth of the
    // orders out of order (what holding costs).
    for displace in [false, true] {
        let backlog = match displace {
            false => "in publication order".to_owned(),
            true => format!(
                "every {DISPLACED_EVERY}th order.created published {DISPLACEMENT} rows late"
            ),
        };
        let mut results = Vec::new();
        for round in 0..rounds {
            // Alternate which side goes first: the machine drifts within a run.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            let mut on = None;
            let mut off = None;
            for in_sequence in order {
                let d = drain(n, displace, in_sequence).await?;
                if in_sequence { &mut on } else { &mut off }.replace(d);
            }
            let (on, off) = (on.expect("drained"), off.expect("drained"));
            let ratio = on.rate / off.rate;
            report.note(format!(
                "ordering, {backlog}, round {}: on {:.0} events/s ({} inverted, {}; {}), \
                 off {:.0} events/s ({} inverted; {}), ratio {ratio:.2}",
                round + 1,
                on.rate,
                on.inverted,
                on.held_summary(),
                on.cost_summary(),
                off.rate,
                off.inverted,
                off.cost_summary()
            ));
            results.push((ratio, on, off));
        }
        let (ratio, on, off) = crate::setup::median_round(&results, |r| r.0);
        report.row(
            &format!(
                "E-mail consumer backlog drain, {n} orders' two events, {backlog}, order on \
                 (median of {rounds})"
            ),
            format!(
                "{:.0} events/s, {} orders recorded out of order; {}; {}",
                on.rate,
                on.inverted,
                on.held_summary(),
                on.cost_summary()
            ),
            format!(
                "same drain, order off: {:.0} events/s, {} orders recorded out of order; {}",
                off.rate,
                off.inverted,
                off.cost_summary()
            ),
            *ratio,
            ">= 0.8 (issue 23)",
        );
    }
    Ok(())
}
