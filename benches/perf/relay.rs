//! Relay drain rate of a 50,000-row backlog beside a raw lapin publish loop
//! with the same confirm window and message size, in the same run, to the
//! same exchange and queues (the relay's topology: both order consumers).

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use order_service::amqp::QueueNames;
use order_service::config::{AmqpConfig, QueueType, RelayConfig};
use order_service::metrics::Metrics;
use order_service::orders::SUBSCRIPTIONS;
use order_service::outbox::{Publisher, Relay, Wake};
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp, percentile};

const ROWS: i64 = 50_000;
const ROUNDS: usize = 5;
/// Rounds on classic queues, for the figure beside the quorum one.
const CLASSIC_ROUNDS: usize = 3;

/// Fills the outbox with `ROWS` order events shaped like the API's.
async fn fill(db: &BenchDb) -> anyhow::Result<usize> {
    sqlx::query(
        "INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) \
         SELECT t, 'order', o::text, 'order.created', \
           jsonb_build_object('transactionId', t, 'orderId', o, 'productId', '123', 'userId', 'user_99', \
             'amount', 500, 'timestamp', to_char(now() AT TIME ZONE 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')), \
           jsonb_build_object('traceparent', '00-' || md5(t::text) || '-' || left(md5(o::text), 16) || '-01') \
         FROM (SELECT gen_random_uuid() AS t, gen_random_uuid() AS o FROM generate_series(1, $1)) s",
    )
    .bind(ROWS)
    .execute(&db.pool)
    .await?;
    // The relay publishes the stored JSON text as it is.
    let size: i32 = sqlx::query_scalar("SELECT length(payload::text) FROM outbox LIMIT 1")
        .fetch_one(&db.pool)
        .await?;
    Ok(size as usize)
}

/// The raw side: a confirm-mode channel on a connection of its own, like
/// the relay's publisher.
struct Raw {
    connection: Connection,
    channel: Channel,
}

impl Raw {
    async fn open(amqp: &AmqpConfig) -> anyhow::Result<Self> {
        let connection =
            order_service::amqp::connect(amqp, "bench raw publish", &CancellationToken::new())
                .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            connection,
            channel,
        })
    }

    async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Publishes `n` messages of `size` bytes with up to `window` confirms in flight.
async fn raw_publish(
    raw: &Raw,
    exchange: &str,
    n: i64,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let body = vec![b'x'; size];
    let channel = &raw.channel;
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        );
        let properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type("order.created".into())
            .with_timestamp(i as u64)
            .with_headers(headers);
        let confirm = channel
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

async fn purge(raw: &Raw, amqp: &AmqpConfig) -> anyhow::Result<()> {
    for subscription in SUBSCRIPTIONS {
        let q = QueueNames::new(amqp, subscription.consumer).main;
        raw.channel
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    Ok(())
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let mut config = RelayConfig::default();
    // Overrides for tuning runs; the defaults are what the service uses.
    if let Some(w) = std::env::var("RELAY_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.workers = w;
    }
    if let Some(b) = std::env::var("RELAY_BATCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.batch_size = b;
    }
    let window = config.batch_size as usize * config.workers;
    let (rounds, size) = rounds_on(QueueType::Quorum, &config, ROUNDS).await?;
    let classic = rounds_on(QueueType::Classic, &config, CLASSIC_ROUNDS)
        .await?
        .0;
    // The median round's ratio: pairs adjacent in time, robust to one
    // round's drift. Every round is listed under the table.
    let mut ratios: Vec<f64> = rounds.iter().map(|(raw, relay)| relay / raw).collect();
    ratios.sort_by(f64::total_cmp);
    let median = percentile(&ratios, 50.0);
    let (raw, relay) = rounds
        .iter()
        .copied()
        .find(|(raw, relay)| relay / raw == median)
        .expect("the median is one of the rounds");
    report.row(
        &format!("Relay drain, 50,000-row backlog, quorum queues (median of {ROUNDS} rounds)"),
        format!("{relay:.0} msg/s"),
        format!("raw lapin publish, window {window}, {size} B, same round: {raw:.0} msg/s"),
        median,
        ">= 0.9",
    );
    let all: Vec<String> = rounds
        .iter()
        .map(|(raw, relay)| format!("{relay:.0}/{raw:.0} = {:.2}", relay / raw))
        .collect();
    report.note(format!(
        "Relay rounds on quorum queues (relay/raw msg/s): {}",
        all.join(", ")
    ));
    let mut ratios: Vec<f64> = classic.iter().map(|(raw, relay)| relay / raw).collect();
    ratios.sort_by(f64::total_cmp);
    let median = percentile(&ratios, 50.0);
    let (raw, relay) = classic
        .iter()
        .copied()
        .find(|(raw, relay)| relay / raw == median)
        .expect("the median is one of the rounds");
    report.row(
        &format!("Relay drain on classic queues (QUEUE_TYPE=classic, median of {CLASSIC_ROUNDS})"),
        format!("{relay:.0} msg/s"),
        format!("raw lapin publish to classic queues, same round: {raw:.0} msg/s"),
        median,
        "(figure)",
    );
    Ok(())
}

/// `n` paired rounds (raw publish, relay drain) on queues of `queue_type`.
async fn rounds_on(
    queue_type: QueueType,
    config: &RelayConfig,
    n: usize,
) -> anyhow::Result<(Vec<(f64, f64)>, usize)> {
    let window = config.batch_size as usize * config.workers;
    let mut amqp = bench_amqp("relay");
    amqp.queue_type = queue_type;
    // The relay's publisher declares the exchange and every order queue.
    let publisher = Publisher::open(&amqp, &SUBSCRIPTIONS, &CancellationToken::new()).await?;
    let raw_side = Raw::open(&amqp).await?;
    let mut rounds: Vec<(f64, f64)> = Vec::new();
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
            raw = raw_publish(&raw_side, &amqp.exchange, ROWS, size, window).await?;
            purge(&raw_side, &amqp).await?;
        }
        let relay = Relay {
            pool: db.pool.clone(),
            amqp: amqp.clone(),
            config: config.clone(),
            metrics: Arc::new(Metrics::default()),
            wake: Wake::default(),
            subscriptions: SUBSCRIPTIONS.to_vec(),
        };
        let started = Instant::now();
        let published = relay.drain(&publisher).await?;
        let rate = published as f64 / started.elapsed().as_secs_f64();
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
            raw = raw_publish(&raw_side, &amqp.exchange, ROWS, size, window).await?;
        }
        println!(
            "relay round {round} ({queue_type:?} queues, {}): raw confirmed publish {raw:.0} msg/s, relay drain {rate:.0} msg/s, ratio {:.2}",
            if raw_first {
                "raw first"
            } else {
                "relay first"
            },
            rate / raw
        );
        rounds.push((raw, rate));
        db.drop_db().await?;
    }
    purge(&raw_side, &amqp).await?;
    raw_side.close().await;
    publisher.close().await;
    cleanup_amqp(&amqp).await?;
    Ok((rounds, size))
}
