//! Billing consumer throughput beside pgbench running the consumer's work for
//! one message (dedup insert, ledger insert, order update and the
//! `order.confirmed` outbox row, all in one statement: fewer round trips
//! than the consumer's own) as one transaction per message at 16 clients,
//! same run: what a consumer without batching could reach at best.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use inbox::Consumer;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use order_service::config::ConsumerConfig;
use order_service::metrics::Metrics;
use order_service::orders::billing::Billing;
use order_service::orders::events::BILLING_SUBSCRIPTION;
use order_service::orders::{ORDER_CREATED, OrderEvent};
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp, pgbench};

const MESSAGES: i64 = 20_000;
const PGBENCH_CLIENTS: u32 = 16;

/// The consumer's work for one message, as the consumer does it, in one
/// statement (so one transaction): the dedup insert, the ledger insert, the
/// order update and the `order.confirmed` outbox row with the charge, on
/// orders whose ids are md5(n).
const CONSUMER_TX: &str = r#"
\set n random(1, 20000)
WITH fresh AS (INSERT INTO processed_messages (consumer, transaction_id) VALUES ('pgbench', gen_random_uuid()) ON CONFLICT DO NOTHING RETURNING transaction_id), charged AS (INSERT INTO ledger (order_id, user_id, amount, transaction_id) SELECT md5(:n::text)::uuid, 'user_1', 100, transaction_id FROM fresh RETURNING id, order_id, charged_at), confirmed AS (INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) SELECT gen_random_uuid(), 'order', order_id::text, 'order.confirmed', jsonb_build_object('transactionId', gen_random_uuid(), 'orderId', order_id, 'productId', 'p', 'userId', 'user_1', 'amount', 100, 'timestamp', charged_at, 'charge', jsonb_build_object('ledgerId', id, 'amount', 100, 'chargedAt', charged_at)), '{}' FROM charged) UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE id = md5(:n::text)::uuid AND EXISTS (SELECT 1 FROM fresh);
"#;

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let config = ConsumerConfig::default();
    let db = BenchDb::new("consumer", PGBENCH_CLIENTS + 2).await?;
    let amqp = bench_amqp("consumer");
    sqlx::query(
        "INSERT INTO orders (id, product_id, user_id, amount) \
         SELECT md5(n::text)::uuid, 'p', 'user_1', 100 FROM generate_series(1, $1) n",
    )
    .bind(MESSAGES)
    .execute(&db.pool)
    .await?;
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orders")
        .fetch_all(&db.pool)
        .await?;

    // Fill the billing queue, many confirms in flight.
    let connection =
        outbox_common::amqp::connect(&amqp, "bench filler", &CancellationToken::new()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    outbox_common::amqp::declare_exchange(&channel, &amqp).await?;
    let queues =
        outbox_common::amqp::declare_consumer_queues(&channel, &amqp, &BILLING_SUBSCRIPTION)
            .await?;
    let mut in_flight = FuturesUnordered::new();
    for id in &ids {
        let event = OrderEvent {
            transaction_id: uuid::Uuid::new_v4(),
            order_id: *id,
            product_id: "p".into(),
            user_id: "user_1".into(),
            amount: 100,
            timestamp: chrono::Utc::now(),
        };
        let properties = BasicProperties::default()
            .with_message_id(event.transaction_id.to_string().into())
            .with_type(ORDER_CREATED.into())
            .with_delivery_mode(2);
        let body = serde_json::to_vec(&event)?;
        in_flight.push(
            channel
                .basic_publish(
                    "".into(),
                    queues.main.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?,
        );
        while in_flight.len() >= 1000 {
            anyhow::ensure!(matches!(
                in_flight.next().await.unwrap()?,
                Confirmation::Ack(None)
            ));
        }
    }
    while let Some(c) = in_flight.next().await {
        anyhow::ensure!(matches!(c?, Confirmation::Ack(None)));
    }
    connection.close(200, "filled".into()).await?;

    let metrics = Metrics::default();
    let consumer = std::sync::Arc::new(
        Consumer::new(Billing, db.pool.clone(), amqp.clone())
            .with_config(config.clone())
            .with_metrics(&metrics.consumers),
    );
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(consumer.clone().run(cancel.clone()));
    while consumer.metrics().processed.get() < MESSAGES as u64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "consumer did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = MESSAGES as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    task.await?;
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM ledger").await == MESSAGES,
        "one charge per message"
    );
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM outbox WHERE event_type = 'order.confirmed'")
            .await
            == MESSAGES,
        "one order.confirmed outbox row per message"
    );

    let per_transaction = MESSAGES as f64 / consumer.metrics().transactions.get().max(1) as f64;
    let pg = pgbench(&db.url, CONSUMER_TX, PGBENCH_CLIENTS, 10)?;
    println!(
        "consumer: billing {rate:.0} msg/s ({per_transaction:.1} messages per transaction, \
         {} transactions at once), pgbench one transaction per message {pg:.0} tps, ratio {:.2}",
        config.concurrency(),
        rate / pg
    );
    report.row(
        &format!(
            "Billing consumer, {MESSAGES} queued messages, {} transactions at once",
            config.concurrency()
        ),
        format!("{rate:.0} msg/s, {per_transaction:.1} messages per transaction"),
        format!(
            "pgbench dedup + ledger + order update + order.confirmed outbox row, \
             one transaction per message, {PGBENCH_CLIENTS} clients: {pg:.0} tps"
        ),
        rate / pg,
        "(issue 4: figure)",
    );
    cleanup_amqp(&amqp).await?;
    db.drop_db().await?;
    Ok(())
}
