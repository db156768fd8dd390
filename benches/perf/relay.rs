//! Relay drain rate of a 50,000-row backlog beside a raw lapin publish loop
//! with the same confirm window and message size, in the same run, to the
//! same exchange and queues (the relay's topology: both order consumers).

use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use order_service::config::{AmqpConfig, QueueType, RelayConfig};
use order_service::orders::{EVENTS, SUBSCRIPTIONS};
use outbox::{Publisher, Relay, RelayMetrics, Wake};
use outbox_common::amqp::QueueNames;
use outbox_common::amqp::headers::{PUBLISHED_AT_HEADER, TRACEPARENT_HEADER, WRITTEN_AT_HEADER};
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp, percentile};

pub(crate) const ROWS: i64 = 50_000;
const ROUNDS: usize = 5;
/// Rounds on classic queues, for the figure beside the quorum one.
const CLASSIC_ROUNDS: usize = 3;

/// Fills the outbox with `ROWS` order events shaped like the API's.
pub(crate) async fn fill(db: &BenchDb) -> anyhow::Result<usize> {
    fill_rows(db, ROWS).await
}

/// Writes `rows` order events shaped like the API's, in one statement.
pub(crate) async fn fill_rows(db: &BenchDb, rows: i64) -> anyhow::Result<usize> {
    sqlx::query(
        "INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) \
         SELECT t, 'order', o::text, 'order.created', \
           jsonb_build_object('transactionId', t, 'orderId', o, 'productId', '123', 'userId', 'user_99', \
             'amount', 500, 'timestamp', to_char(now() AT TIME ZONE 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')), \
           jsonb_build_object('traceparent', '00-' || md5(t::text) || '-' || left(md5(o::text), 16) || '-01') \
         FROM (SELECT gen_random_uuid() AS t, gen_random_uuid() AS o FROM generate_series(1, $1)) s",
    )
    .bind(rows)
    .execute(&db.pool)
    .await?;
    // The relay publishes the stored JSON text as it is.
    let size: i32 = sqlx::query_scalar("SELECT length(payload::text) FROM outbox LIMIT 1")
        .fetch_one(&db.pool)
        .await?;
    Ok(size as usize)
}

/// The raw side: confirm-mode channels on a connection of their own, as
/// many as the relay's publisher lanes (messages go round them in turn), like
/// the relay's publisher.
pub(crate) struct Raw {
    connection: Connection,
    channels: Vec<Channel>,
}

impl Raw {
    pub(crate) async fn open(amqp: &AmqpConfig, lanes: usize) -> anyhow::Result<Self> {
        let connection =
            outbox_common::amqp::connect(amqp, "bench raw publish", &CancellationToken::new())
                .await?;
        let mut channels = Vec::new();
        for _ in 0..lanes.max(1) {
            channels.push(outbox_common::amqp::confirm_channel(&connection).await?);
        }
        Ok(Self {
            connection,
            channels,
        })
    }

    pub(crate) async fn close(self) {
        for channel in &self.channels {
            let _ = channel.close(200, "done".into()).await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Publishes `n` messages of `size` bytes with up to `window` confirms in flight.
pub(crate) async fn raw_publish(
    raw: &Raw,
    exchange: &str,
    n: i64,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let body = vec![b'x'; size];
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..n {
        // The relay's properties and headers, so both sides send the same bytes.
        let now_ms = chrono::Utc::now().timestamp_millis().to_string();
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT_HEADER.into(),
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        headers.insert(
            PUBLISHED_AT_HEADER.into(),
            AMQPValue::LongString(now_ms.clone().into()),
        );
        headers.insert(
            WRITTEN_AT_HEADER.into(),
            AMQPValue::LongString(now_ms.into()),
        );
        let properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type("order.created".into())
            .with_timestamp(i as u64)
            .with_app_id("order-service".into())
            .with_headers(headers);
        let confirm = raw.channels[i as usize % raw.channels.len()]
            .basic_publish(
                exchange.into(),
                "order.created".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?;
        in_flight.push(confirm);
        while in_flight.len() >= window {
            let c: Confirmation = in_flight.next().await.unwrap()?;
            anyhow::ensure!(
                matches!(c, Confirmation::Ack(None)),
                "raw publish not confirmed: {c:?}"
            );
        }
    }
    while let Some(c) = in_flight.next().await {
        anyhow::ensure!(
            matches!(c?, Confirmation::Ack(None)),
            "raw publish not confirmed"
        );
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The relay's Postgres work without its publishes: claim a batch of due
/// rows, mark them published, roll back (so the rows stay due), at most
/// `rate` rows a second, until `stop`. Run beside a raw publish loop, it
/// shows how much of the gap between relay and raw loop is the machine's
/// CPU going to Postgres rather than to the broker. Returns the rows a
/// second it did.
async fn relay_db_work(
    pool: sqlx::PgPool,
    batch_size: i64,
    rate: f64,
    stop: CancellationToken,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut rows = 0usize;
    while !stop.is_cancelled() {
        let mut tx = pool.begin().await?;
        let claimed = EVENTS.claim_due(&mut tx, batch_size).await?;
        let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
        EVENTS.mark_published(&mut tx, &ids).await?;
        tx.rollback().await?;
        rows += ids.len();
        // Paced to `rate`: sleep until this many rows are due by the clock.
        let due = std::time::Duration::from_secs_f64(rows as f64 / rate);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(due.saturating_sub(started.elapsed())) => {}
        }
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// A raw publish run with the relay's Postgres work beside it, at the
/// relay's `rate`, on the round's outbox (made due again first).
async fn raw_beside_db_work(
    raw: &Raw,
    amqp: &AmqpConfig,
    db: &BenchDb,
    config: &RelayConfig,
    size: usize,
    rate: f64,
) -> anyhow::Result<(f64, f64)> {
    sqlx::query("UPDATE outbox SET published_at = NULL")
        .execute(&db.pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    purge(raw, amqp).await?;
    let window = config.confirm_window();
    let stop = CancellationToken::new();
    let work = tokio::spawn(relay_db_work(
        db.pool.clone(),
        config.batch_size(),
        rate,
        stop.clone(),
    ));
    let published = raw_publish(raw, amqp.exchange(), ROWS, size, window).await;
    stop.cancel();
    let db_rate = work.await??;
    Ok((published?, db_rate))
}

/// The server's current WAL position, in bytes.
async fn wal_lsn(db: &BenchDb) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
            .fetch_one(&db.pool)
            .await?,
    )
}

pub(crate) async fn purge(raw: &Raw, amqp: &AmqpConfig) -> anyhow::Result<()> {
    for subscription in SUBSCRIPTIONS {
        let q = QueueNames::new(amqp, subscription.consumer).main;
        raw.channels[0]
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    Ok(())
}

/// One round's rates, msg/s.
#[derive(Debug, Clone, Copy)]
struct Round {
    raw: f64,
    relay: f64,
    /// The raw loop again, with the relay's Postgres work beside it at the
    /// relay's rate (quorum rounds only).
    raw_beside_db: Option<f64>,
    /// Bytes of WAL the drain wrote per row (the whole server's, so
    /// autovacuum's too).
    wal_per_row: f64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.relay / self.raw
    }
}

/// The round whose ratio is the median (see [`crate::setup::median_round`]).
fn median_round(rounds: &[Round]) -> Round {
    *crate::setup::median_round(rounds, Round::ratio)
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let mut config = RelayConfig::default();
    // Overrides for tuning runs; the defaults are what the service uses.
    if let Some(w) = std::env::var("RELAY_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config = config.with_workers(w);
    }
    if let Some(b) = std::env::var("RELAY_BATCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config = config.with_batch_size(b);
    }
    let window = config.confirm_window();
    let (rounds, size) = rounds_on(QueueType::Quorum, &config, ROUNDS).await?;
    let classic = rounds_on(QueueType::Classic, &config, CLASSIC_ROUNDS)
        .await?
        .0;
    // Every round is listed under the table.
    let median = median_round(&rounds);
    report.row(
        &format!("Relay drain, 50,000-row backlog, quorum queues (median of {ROUNDS} rounds)"),
        format!("{:.0} msg/s", median.relay),
        format!(
            "raw lapin publish, window {window}, {size} B, same properties, {} channels like the relay's lanes, same round: {:.0} msg/s",
            config.batches_open(),
            median.raw
        ),
        median.ratio(),
        ">= 0.9",
    );
    let all: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.0}/{:.0} = {:.2}", r.relay, r.raw, r.ratio()))
        .collect();
    let mut wal: Vec<f64> = rounds.iter().map(|r| r.wal_per_row).collect();
    wal.sort_by(f64::total_cmp);
    report.note(format!(
        "Relay rounds on quorum queues (relay/raw msg/s): {}; WAL a published row: median {:.0} B",
        all.join(", "),
        percentile(&wal, 50.0)
    ));
    // Where the gap goes: the raw loop with the relay's Postgres work beside it.
    let beside: Vec<Round> = rounds
        .iter()
        .filter_map(|r| {
            r.raw_beside_db.map(|raw| Round {
                raw,
                relay: r.relay,
                raw_beside_db: None,
                wal_per_row: r.wal_per_row,
            })
        })
        .collect();
    if !beside.is_empty() {
        let median = median_round(&beside);
        report.row(
            &format!(
                "Relay drain, quorum queues, beside a raw loop that shares the machine with the relay's Postgres work (median of {})",
                beside.len()
            ),
            format!("{:.0} msg/s", median.relay),
            format!(
                "raw lapin publish while the relay's claims and marks run at the relay's rate (rolled back), same round: {:.0} msg/s",
                median.raw
            ),
            median.ratio(),
            "(figure)",
        );
        let all: Vec<String> = rounds
            .iter()
            .filter_map(|r| r.raw_beside_db.map(|b| format!("{:.0} → {b:.0}", r.raw)))
            .collect();
        report.note(format!(
            "Raw loop alone → beside the relay's Postgres work, per quorum round (msg/s): {}",
            all.join(", ")
        ));
    }
    let median = median_round(&classic);
    report.row(
        &format!("Relay drain on classic queues (QUEUE_TYPE=classic, median of {CLASSIC_ROUNDS})"),
        format!("{:.0} msg/s", median.relay),
        format!(
            "raw lapin publish to classic queues, same round: {:.0} msg/s",
            median.raw
        ),
        median.ratio(),
        "(figure)",
    );
    Ok(())
}

/// `n` paired rounds (raw publish, relay drain) on queues of `queue_type`;
/// on quorum queues each round also runs the raw loop beside the relay's
/// Postgres work.
async fn rounds_on(
    queue_type: QueueType,
    config: &RelayConfig,
    n: usize,
) -> anyhow::Result<(Vec<Round>, usize)> {
    let window = config.confirm_window();
    let mut amqp = bench_amqp("relay");
    amqp = amqp.with_queue_type(queue_type);
    // The relay's publisher declares the exchange and every order queue.
    let lanes = config.batches_open();
    let publisher =
        Publisher::open_lanes(&amqp, &SUBSCRIPTIONS, lanes, &CancellationToken::new()).await?;
    let raw_side = Raw::open(&amqp, lanes).await?;
    let mut rounds = Vec::new();
    let mut size = 0;
    // Each round pairs a raw run with a relay run, back to back, and the
    // order alternates: the broker is still cleaning up the purged messages
    // of the first run while the second starts, so a fixed order would
    // charge that cost to one side only.
    for round in 1..=n {
        let db = BenchDb::new("relay", 10).await?;
        size = fill(&db).await?;
        sqlx::query("VACUUM ANALYZE outbox")
            .execute(&db.pool)
            .await?;
        let raw_first = round % 2 == 1;
        purge(&raw_side, &amqp).await?;
        let mut raw = 0.0;
        if raw_first {
            raw = raw_publish(&raw_side, amqp.exchange(), ROWS, size, window).await?;
            purge(&raw_side, &amqp).await?;
        }
        let relay = Relay::new(db.pool.clone(), EVENTS.clone(), amqp.clone())
            .with_config(config.clone())
            .with_metrics(RelayMetrics::default())
            .with_wake(Wake::default())
            .with_subscriptions(SUBSCRIPTIONS.to_vec());
        let wal_before = wal_lsn(&db).await?;
        let started = Instant::now();
        let published = relay.drain(&publisher).await?;
        let rate = published as f64 / started.elapsed().as_secs_f64();
        let wal_per_row = (wal_lsn(&db).await? - wal_before) / published.max(1) as f64;
        anyhow::ensure!(
            published as i64 == ROWS,
            "relay published {published} of {ROWS}"
        );
        anyhow::ensure!(
            db.scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .await
                == 0
        );
        if !raw_first {
            purge(&raw_side, &amqp).await?;
            raw = raw_publish(&raw_side, amqp.exchange(), ROWS, size, window).await?;
        }
        let mut beside = String::new();
        let raw_beside_db = if queue_type == QueueType::Quorum {
            let (raw_beside, db_rate) =
                raw_beside_db_work(&raw_side, &amqp, &db, config, size, rate).await?;
            beside = format!(
                "; raw beside the relay's Postgres work ({db_rate:.0} rows/s) {raw_beside:.0} msg/s, ratio {:.2}",
                rate / raw_beside
            );
            Some(raw_beside)
        } else {
            None
        };
        println!(
            "relay round {round} ({queue_type:?} queues, {}): raw confirmed publish {raw:.0} msg/s, relay drain {rate:.0} msg/s ({wal_per_row:.0} B of WAL a row), ratio {:.2}{beside}",
            if raw_first {
                "raw first"
            } else {
                "relay first"
            },
            rate / raw
        );
        rounds.push(Round {
            raw,
            relay: rate,
            raw_beside_db,
            wal_per_row,
        });
        db.drop_db().await?;
    }
    purge(&raw_side, &amqp).await?;
    raw_side.close().await;
    publisher.close().await;
    cleanup_amqp(&amqp).await?;
    Ok((rounds, size))
}
