//! The consumers: one side effect per event, whatever the broker does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use inbox::ConsumerMetrics;
use inbox::{Applied, Consumer, Event, Handler, HandlerError, dlq, message};
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use order_service::config::{AmqpConfig, ConsumerConfig};
use order_service::metrics::Metrics;
use order_service::orders::billing::Billing;
use order_service::orders::events::BILLING_SUBSCRIPTION;
use order_service::orders::{self, NewOrder, ORDER_CONFIRMED, OrderEvent};
use outbox_common::amqp::{QueueNames, Subscription};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, amqp_channel, drain_queue, eventually, test_amqp};
use crate::proxy::{Proxy, target_of, via};

const WAIT: Duration = Duration::from_secs(20);

/// An order row and the event that announces it.
async fn order(pool: &PgPool, amount: i64) -> OrderEvent {
    let id = Uuid::now_v7();
    let new = NewOrder {
        product_id: "p-1".into(),
        user_id: "user_7".into(),
        amount,
    };
    let mut conn = pool.acquire().await.unwrap();
    let created = orders::insert(&mut conn, id, &new).await.unwrap();
    OrderEvent {
        transaction_id: Uuid::new_v4(),
        order_id: id,
        product_id: new.product_id,
        user_id: new.user_id,
        amount,
        timestamp: created,
    }
}

/// Publishes `body` to `queue` through the default exchange, confirmed.
async fn send(channel: &Channel, queue: &str, body: &[u8], message_id: Option<Uuid>) {
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type("order.created".into());
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.to_string().into());
    }
    dlq::publish(channel, queue, body, properties)
        .await
        .unwrap();
}

async fn send_event(channel: &Channel, queue: &str, event: &OrderEvent) {
    send(
        channel,
        queue,
        &serde_json::to_vec(event).unwrap(),
        Some(event.transaction_id),
    )
    .await;
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

fn start<H: Handler>(consumer: &Arc<Consumer<H>>) -> Running {
    let cancel = CancellationToken::new();
    let task = tokio::spawn(consumer.clone().run(cancel.clone()));
    Running { cancel, task }
}

fn consumer<H: Handler>(
    handler: H,
    pool: &PgPool,
    amqp: &AmqpConfig,
    metrics: &Metrics,
) -> Arc<Consumer<H>> {
    consumer_with(handler, pool, amqp, metrics, ConsumerConfig::default())
}

fn consumer_with<H: Handler>(
    handler: H,
    pool: &PgPool,
    amqp: &AmqpConfig,
    metrics: &Metrics,
    config: ConsumerConfig,
) -> Arc<Consumer<H>> {
    Arc::new(
        Consumer::new(handler, pool.clone(), amqp.clone())
            .with_config(config)
            .with_metrics(&metrics.consumers),
    )
}

/// Declares the consumer's queues, as a running consumer or the relay would.
async fn declare(channel: &Channel, amqp: &AmqpConfig) -> QueueNames {
    outbox_common::amqp::declare_exchange(channel, amqp)
        .await
        .unwrap();
    outbox_common::amqp::declare_consumer_queues(channel, amqp, &BILLING_SUBSCRIPTION)
        .await
        .unwrap()
}

fn handled(m: &ConsumerMetrics) -> u64 {
    m.processed.get() + m.duplicates.get() + m.dead_lettered.get()
}

async fn wait_handled(m: &ConsumerMetrics, n: u64) {
    eventually("deliveries to be handled", WAIT, || async {
        (handled(m) >= n).then_some(())
    })
    .await;
}

async fn ledger_rows(pool: &PgPool, order_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The `order.confirmed` outbox rows billing wrote for an order.
async fn confirmed_rows(pool: &PgPool, order_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_type = $1 AND aggregate_id = $2")
        .bind(ORDER_CONFIRMED)
        .bind(order_id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What billing leaves for an order it charged `charges` times: that many
/// ledger rows and `order.confirmed` outbox rows.
async fn assert_charged(pool: &PgPool, order_id: Uuid, charges: i64) {
    assert_eq!(
        (
            ledger_rows(pool, order_id).await,
            confirmed_rows(pool, order_id).await
        ),
        (charges, charges),
        "ledger rows and order.confirmed rows of order {order_id}"
    );
}

#[tokio::test]
async fn the_same_message_delivered_three_times_charges_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 500).await;
    for _ in 0..3 {
        send_event(&channel, &queues.main, &event).await;
    }
    let billing = consumer(Billing, &db.pool, &amqp, &metrics);

    let running = start(&billing);
    wait_handled(billing.metrics(), 3).await;

    assert_charged(&db.pool, event.order_id, 1).await;
    assert_eq!(
        (
            billing.metrics().processed.get(),
            billing.metrics().duplicates.get()
        ),
        (1, 2)
    );
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(
        orders::find(&mut conn, event.order_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "CONFIRMED"
    );
    drop(conn);
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn two_instances_racing_on_duplicates_charge_each_order_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let (a, b) = (
        consumer(Billing, &db.pool, &amqp, &metrics),
        consumer(Billing, &db.pool, &amqp, &metrics),
    );
    let (ra, rb) = (start(&a), start(&b));
    let mut events = Vec::new();
    for _ in 0..25 {
        let event = order(&db.pool, 10).await;
        send_event(&channel, &queues.main, &event).await;
        send_event(&channel, &queues.main, &event).await;
        events.push(event);
    }

    wait_handled(a.metrics(), 50).await; // a and b share one metrics entry

    for event in &events {
        assert_charged(&db.pool, event.order_id, 1).await;
    }
    assert_eq!(a.metrics().processed.get(), 25);
    assert_eq!(a.metrics().duplicates.get(), 25);
    ra.stop().await;
    rb.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn queued_deliveries_share_transactions_and_each_order_is_charged_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let mut events = Vec::new();
    for i in 0..40 {
        let event = order(&db.pool, 100 + i).await;
        send_event(&channel, &queues.main, &event).await;
        // Every eighth message also arrives twice in the same burst.
        if i % 8 == 0 {
            send_event(&channel, &queues.main, &event).await;
        }
        events.push(event);
    }
    let config = ConsumerConfig::default().with_concurrency(1);
    let billing = consumer_with(Billing, &db.pool, &amqp, &metrics, config);

    let running = start(&billing);
    wait_handled(billing.metrics(), 45).await;

    assert_eq!(
        (
            billing.metrics().processed.get(),
            billing.metrics().duplicates.get()
        ),
        (40, 5)
    );
    for event in &events {
        assert_charged(&db.pool, event.order_id, 1).await;
    }
    let charged: i64 = sqlx::query_scalar("SELECT sum(amount)::bigint FROM ledger")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(charged, events.iter().map(|e| e.amount).sum::<i64>());
    let confirmed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(confirmed, 40);
    let transactions = billing.metrics().transactions.get();
    assert!(
        transactions <= 20,
        "45 queued deliveries took {transactions} transactions"
    );
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_failing_message_in_a_batch_does_not_fail_the_others() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(order(&db.pool, 10 + i).await);
    }
    // An event for an order that does not exist: billing must refuse it.
    let mut missing = events[10].clone();
    missing.order_id = Uuid::now_v7();
    missing.transaction_id = Uuid::new_v4();
    events.insert(10, missing.clone());
    for event in &events {
        send_event(&channel, &queues.main, event).await;
    }
    let config = ConsumerConfig::default().with_concurrency(1);
    let billing = consumer_with(Billing, &db.pool, &amqp, &metrics, config);

    let running = start(&billing);
    eventually(
        "the good messages to be charged and the bad one retried",
        WAIT,
        || async {
            (billing.metrics().processed.get() == 20 && billing.metrics().retried.get() >= 1)
                .then_some(())
        },
    )
    .await;

    for event in events.iter().filter(|e| e.order_id != missing.order_id) {
        assert_charged(&db.pool, event.order_id, 1).await;
    }
    assert_charged(&db.pool, missing.order_id, 0).await;
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_messages WHERE transaction_id = $1")
            .bind(missing.transaction_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 0, "the failed message left no dedup row");
    running.stop().await;
    db.cleanup().await;
}

/// Sets the test database read-only (or back) for new sessions, and ends its
/// sessions so that the next ones take the setting. `admin` is on the
/// server's admin database, so the setting never applies to it.
async fn set_read_only(admin: &PgPool, name: &str, on: bool) {
    let setting = if on {
        "SET default_transaction_read_only = on"
    } else {
        "RESET default_transaction_read_only"
    };
    // The name is the fixture's own (letters, digits, underscores).
    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" {setting}"
    )))
    .execute(admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .execute(admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_read_only_database_is_an_outage_not_a_failing_message() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 77).await;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&crate::common::admin_url())
        .await
        .unwrap();
    set_read_only(&admin, &db.name, true).await;
    send_event(&channel, &queues.main, &event).await;
    let billing = consumer(Billing, &db.pool, &amqp, &metrics);
    let running = start(&billing);

    // Postgres refuses the statement (25006) again and again: an outage.
    eventually("two refused attempts", WAIT, || async {
        (billing.metrics().requeued.get() >= 2).then_some(())
    })
    .await;
    assert_eq!(billing.metrics().retried.get(), 0, "no attempt used up");
    assert_eq!(billing.metrics().dead_lettered.get(), 0);
    assert_charged(&db.pool, event.order_id, 0).await;

    set_read_only(&admin, &db.name, false).await;
    wait_handled(billing.metrics(), 1).await;
    assert_eq!(billing.metrics().processed.get(), 1);
    assert_eq!(billing.metrics().retried.get(), 0);
    assert_charged(&db.pool, event.order_id, 1).await;
    running.stop().await;
    admin.close().await;
    db.cleanup().await;
}

/// Bills, then refuses the events for its first `failures` calls: the
/// refusal must roll back the charge it has just written.
struct FailsFirst {
    failures: AtomicU32,
}

impl Handler for FailsFirst {
    type Event = OrderEvent;

    fn subscription(&self) -> Subscription {
        BILLING_SUBSCRIPTION
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<OrderEvent>],
    ) -> Result<(), HandlerError> {
        Billing.handle(tx, events).await?;
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(HandlerError::refused(format!(
                "payment gateway timeout ({left} failures left)"
            )));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_failing_twice_then_succeeding_is_retried_and_charges_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 700).await;
    send_event(&channel, &queues.main, &event).await;
    let flaky = consumer(
        FailsFirst {
            failures: AtomicU32::new(2),
        },
        &db.pool,
        &amqp,
        &metrics,
    );

    let running = start(&flaky);
    wait_handled(flaky.metrics(), 1).await;

    assert_eq!(flaky.metrics().retried.get(), 2);
    assert_eq!(flaky.metrics().processed.get(), 1);
    assert_eq!(flaky.metrics().dead_lettered.get(), 0);
    // Each refused attempt had written a ledger row and an order.confirmed
    // row in its transaction: both were rolled back.
    assert_charged(&db.pool, event.order_id, 1).await;
    running.stop().await;
    db.cleanup().await;
}

/// Fails while `failing` is set.
struct Switchable {
    failing: AtomicBool,
}

impl Handler for Switchable {
    type Event = OrderEvent;

    fn subscription(&self) -> Subscription {
        BILLING_SUBSCRIPTION
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<OrderEvent>],
    ) -> Result<(), HandlerError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(HandlerError::refused("card declined"));
        }
        Billing.handle(tx, events).await
    }
}

/// Reports an outage of the payment gateway for its first `outages` calls,
/// then bills.
struct GatewayDown {
    outages: AtomicU32,
}

impl Handler for GatewayDown {
    type Event = OrderEvent;

    fn subscription(&self) -> Subscription {
        BILLING_SUBSCRIPTION
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<OrderEvent>],
    ) -> Result<(), HandlerError> {
        Billing.handle(tx, events).await?;
        let left = self.outages.load(Ordering::SeqCst);
        if left > 0 {
            self.outages.store(left - 1, Ordering::SeqCst);
            return Err(HandlerError::outage("payment gateway unreachable"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_handlers_outage_requeues_the_delivery_without_using_an_attempt() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 650).await;
    send_event(&channel, &queues.main, &event).await;
    // More outages than there are retry queues: were an outage counted as
    // an attempt, the message would end in the DLQ.
    let outages = amqp.retry_delays().len() as u32 + 1;
    let billing = consumer(
        GatewayDown {
            outages: AtomicU32::new(outages),
        },
        &db.pool,
        &amqp,
        &metrics,
    );

    let running = start(&billing);
    wait_handled(billing.metrics(), 1).await;

    assert_eq!(billing.metrics().requeued.get(), u64::from(outages));
    assert_eq!(billing.metrics().retried.get(), 0, "no attempt used up");
    assert_eq!(billing.metrics().dead_lettered.get(), 0);
    assert_eq!(billing.metrics().processed.get(), 1);
    assert_charged(&db.pool, event.order_id, 1).await;
    running.stop().await;
    assert!(
        drain_queue(&channel, &queues.dlq).await.is_empty(),
        "nothing was dead-lettered"
    );
    db.cleanup().await;
}

fn header_i64(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        _ => None,
    }
}

#[tokio::test]
async fn an_always_failing_message_is_dead_lettered_after_the_last_attempt_and_replays_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 900).await;
    send_event(&channel, &queues.main, &event).await;
    let handler = Switchable {
        failing: AtomicBool::new(true),
    };
    let billing = consumer(handler, &db.pool, &amqp, &metrics);
    let running = start(&billing);

    eventually("the message to reach the DLQ", WAIT, || async {
        (billing.metrics().dead_lettered.get() == 1).then_some(())
    })
    .await;

    assert_eq!(
        billing.metrics().retried.get(),
        2,
        "one retry per configured delay"
    );
    let letters = dlq::list(&amqp, &queues, 10).await.unwrap();
    let again = dlq::list(&amqp, &queues, 10).await.unwrap();
    assert_eq!(
        (letters.len(), again.len()),
        (1, 1),
        "listing leaves letters in place"
    );
    assert_eq!(letters[0].message_id, event.transaction_id.to_string());
    assert_eq!(letters[0].event_type, "order.created");
    assert_eq!(letters[0].attempts, 3);
    assert!(
        letters[0].error.contains("card declined"),
        "{}",
        letters[0].error
    );
    assert_charged(&db.pool, event.order_id, 0).await;
    assert_eq!(db.count("SELECT count(*) FROM processed_messages").await, 0);

    // The cause is fixed; replay.
    billing.handler().failing.store(false, Ordering::SeqCst);
    let replayed = dlq::replay(&amqp, &queues, 100, None).await.unwrap();
    assert_eq!((replayed.moved, replayed.too_old), (1, 0));
    eventually("the replayed message to be processed", WAIT, || async {
        (billing.metrics().processed.get() == 1).then_some(())
    })
    .await;
    assert_charged(&db.pool, event.order_id, 1).await;
    assert_eq!(
        dlq::replay(&amqp, &queues, 100, None).await.unwrap().moved,
        0,
        "the DLQ is empty"
    );
    running.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_poison_message_goes_straight_to_the_dlq_and_the_next_one_is_processed() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    send(
        &channel,
        &queues.main,
        b"this is not JSON",
        Some(Uuid::new_v4()),
    )
    .await;
    send(
        &channel,
        &queues.main,
        br#"{"orderId": "missing the rest"}"#,
        None,
    )
    .await;
    let event = order(&db.pool, 300).await;
    send_event(&channel, &queues.main, &event).await;
    let billing = consumer(Billing, &db.pool, &amqp, &metrics);

    let running = start(&billing);
    wait_handled(billing.metrics(), 3).await;

    assert_eq!(billing.metrics().dead_lettered.get(), 2);
    assert_eq!(billing.metrics().retried.get(), 0, "poison is not retried");
    assert_charged(&db.pool, event.order_id, 1).await;
    running.stop().await;
    let dead = drain_queue(&channel, &queues.dlq).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead[0].data, b"this is not JSON",
        "the body is kept as it was"
    );
    assert_eq!(header_i64(&dead[0].properties, "x-attempt"), Some(1));
    db.cleanup().await;
}

#[tokio::test]
async fn a_consumer_killed_before_its_ack_gets_the_message_again_and_charges_once() {
    let (db, amqp, metrics) = (TestDb::new().await, test_amqp(), Metrics::default());
    let _queues = DeleteQueues::orders(&amqp);
    let (conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let event = order(&db.pool, 450).await;
    send_event(&channel, &queues.main, &event).await;
    let billing = consumer(Billing, &db.pool, &amqp, &metrics);

    // A consumer takes the delivery, commits its transaction, and dies before the ack.
    let (doomed_conn, doomed) = amqp_channel().await;
    let mut deliveries = doomed
        .basic_consume(
            queues.main.as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = deliveries.next().await.unwrap().unwrap();
    let parsed = message::parse::<OrderEvent>(&delivery).unwrap();
    let incoming = Event {
        id: parsed.id,
        event_type: parsed.event_type,
        body: parsed.body,
        attempt: parsed.attempt,
        trace_headers: serde_json::json!({}),
        sequence: None,
    };
    let applied = billing.apply_one(&incoming).await.unwrap();
    assert_eq!(applied, Applied::Committed);
    drop(deliveries);
    doomed_conn.close(320, "killed".into()).await.unwrap();

    let running = start(&billing);
    wait_handled(billing.metrics(), 1).await;

    assert_eq!(
        billing.metrics().duplicates.get(),
        1,
        "the redelivery was recognised"
    );
    assert_charged(&db.pool, event.order_id, 1).await;
    running.stop().await;
    let left = channel
        .basic_get(
            queues.main.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap();
    assert!(left.is_none(), "the redelivery was acked");
    drop(conn);
    db.cleanup().await;
}

#[tokio::test]
async fn a_consumer_resumes_after_the_broker_goes_away() {
    let (db, metrics) = (TestDb::new().await, Metrics::default());
    let proxy = Proxy::start(target_of(&crate::helpers::amqp_url())).await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let mut proxied = amqp.clone();
    proxied = proxied.with_url(via(&crate::helpers::amqp_url(), proxy.addr));
    let (_conn, channel) = amqp_channel().await;
    let queues = declare(&channel, &amqp).await;
    let billing = consumer(Billing, &db.pool, &proxied, &metrics);
    let running = start(&billing);
    let first = order(&db.pool, 1).await;
    send_event(&channel, &queues.main, &first).await;
    wait_handled(billing.metrics(), 1).await;

    proxy.cut();
    let mut later = Vec::new();
    for _ in 0..10 {
        let event = order(&db.pool, 2).await;
        send_event(&channel, &queues.main, &event).await;
        later.push(event);
    }
    eventually("the consumer to try to reconnect", WAIT, || async {
        (proxy.refused() >= 1).then_some(())
    })
    .await;
    proxy.restore();

    wait_handled(billing.metrics(), 11).await;
    for event in &later {
        assert_charged(&db.pool, event.order_id, 1).await;
    }
    running.stop().await;
    db.cleanup().await;
}
