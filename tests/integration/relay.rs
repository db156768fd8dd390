//! The relay: outbox rows reach RabbitMQ with confirms, at least once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::types::AMQPValue;
use order_service::config::{AmqpConfig, RelayConfig};
use order_service::orders::{BILLING, EVENTS, OrderEvent, SUBSCRIPTIONS};
use outbox::{NewOutboxEvent, Publisher, Relay, RelayMetrics, Wake, forward_wakes_as_notify};
use outbox_common::amqp::QueueNames;
use outbox_common::amqp::headers::{
    AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER, PREVIOUS_HEADER, SEQUENCE_HEADER,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, amqp_channel, drain_queue, eventually, test_amqp};
use crate::proxy::{Proxy, target_of, via};

/// Writes `n` order events straight into the outbox; returns their ids.
pub async fn insert_events(pool: &PgPool, n: usize, event_type: &'static str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    let mut tx = pool.begin().await.unwrap();
    for _ in 0..n {
        let event = OrderEvent {
            transaction_id: Uuid::new_v4(),
            order_id: Uuid::now_v7(),
            product_id: "p-1".into(),
            user_id: "user_1".into(),
            amount: 100,
            timestamp: chrono::Utc::now(),
        };
        EVENTS
            .insert(
                &mut tx,
                &NewOutboxEvent {
                    transaction_id: event.transaction_id,
                    aggregate_type: "order",
                    aggregate_id: event.order_id.to_string(),
                    event_type,
                    payload: serde_json::to_value(&event).unwrap(),
                    headers: serde_json::json!({}),
                },
            )
            .await
            .unwrap();
        ids.push(event.transaction_id);
    }
    tx.commit().await.unwrap();
    ids
}

fn relay(pool: &PgPool, amqp: &AmqpConfig, config: RelayConfig) -> Relay {
    Relay::new(pool.clone(), EVENTS.clone(), amqp.clone())
        .with_config(config)
        .with_metrics(RelayMetrics::default())
        .with_wake(Wake::default())
        .with_subscriptions(SUBSCRIPTIONS.to_vec())
}

/// A publisher with the order subscriptions and the default relay's lanes,
/// as the relay opens it.
async fn publisher(amqp: &AmqpConfig) -> Publisher {
    publisher_for(amqp, &RelayConfig::default()).await
}

/// A publisher with a lane for each batch `config` may open.
async fn publisher_for(amqp: &AmqpConfig, config: &RelayConfig) -> Publisher {
    let lanes = config.batches_open();
    Publisher::open_lanes(amqp, &SUBSCRIPTIONS, lanes, &CancellationToken::new())
        .await
        .unwrap()
}

/// Waits until a running relay has declared its queues (it does so before
/// its first publish).
async fn wait_for_topology(amqp: &AmqpConfig) {
    eventually(
        "the relay to declare its queues",
        Duration::from_secs(10),
        || async {
            let (_c, channel) = amqp_channel().await;
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .queue_declare(
                    billing_queue(amqp).as_str().into(),
                    passive,
                    Default::default(),
                )
                .await
                .ok()
        },
    )
    .await;
}

fn billing_queue(amqp: &AmqpConfig) -> String {
    QueueNames::new(amqp, BILLING).main
}

async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits, up to `within`, until no outbox row is left unpublished.
async fn all_published(pool: &PgPool, what: &str, within: Duration) {
    eventually(what, within, || async {
        (unpublished(pool).await == 0).then_some(())
    })
    .await;
}

fn message_ids(deliveries: &[lapin::message::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_outbox_row_is_delivered_with_its_properties_and_marked() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let ids = insert_events(&db.pool, 120, "order.created").await;
    let relay = relay(&db.pool, &amqp, RelayConfig::default().with_batch_size(50));
    let publisher = publisher(&amqp).await;

    let published = relay.drain(&publisher).await.unwrap();

    assert_eq!(published, 120);
    assert_eq!(unpublished(&db.pool).await, 0);
    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    let expected: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(
        message_ids(&deliveries).into_iter().collect::<HashSet<_>>(),
        expected
    );
    let first = &deliveries[0];
    assert_eq!(
        first.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*first.properties.delivery_mode(), Some(2));
    assert_eq!(
        first.properties.kind().as_ref().unwrap().as_str(),
        "order.created"
    );
    assert!(first.properties.timestamp().is_some());
    assert_eq!(first.routing_key.as_str(), "order.created");
    let body: OrderEvent = serde_json::from_slice(&first.data).unwrap();
    assert_eq!(
        body.transaction_id.to_string(),
        first.properties.message_id().as_ref().unwrap().as_str()
    );
    // Its place in its order's history: the first event, with no predecessor.
    let headers = first.properties.headers().as_ref().unwrap().inner();
    let text = |name: &str| match headers.get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(text(AGGREGATE_TYPE_HEADER), "order");
    assert_eq!(text(AGGREGATE_ID_HEADER), body.order_id.to_string());
    assert_eq!(
        headers.get(SEQUENCE_HEADER),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert_eq!(text(PREVIOUS_HEADER), "{}");
    publisher.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn a_crash_between_publish_and_mark_publishes_again_with_the_same_id() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let ids = insert_events(&db.pool, 5, "order.created").await;
    let relay = relay(&db.pool, &amqp, RelayConfig::default());
    let publisher = publisher(&amqp).await;

    // Publish, then "crash": the claiming transaction ends without marking.
    let mut tx = db.pool.begin().await.unwrap();
    let batch = relay.claim_and_publish(&mut tx, &publisher).await.unwrap();
    assert_eq!(batch.claimed, 5);
    assert_eq!(batch.settlement.published.len(), 5);
    assert!(batch.settlement.failed.is_empty());
    drop(tx);
    assert_eq!(unpublished(&db.pool).await, 5, "nothing was marked");
    relay.drain(&publisher).await.unwrap();

    assert_eq!(unpublished(&db.pool).await, 0);
    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    assert_eq!(
        deliveries.len(),
        10,
        "each row arrived twice: at least once"
    );
    for id in ids {
        let copies = message_ids(&deliveries)
            .iter()
            .filter(|m| **m == id.to_string())
            .count();
        assert_eq!(copies, 2, "both copies of {id} carry its message_id");
    }
    publisher.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn an_unroutable_row_stays_pending_with_its_error_and_does_not_hold_up_the_rest() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    insert_events(&db.pool, 1, "order.nobody_listens").await;
    insert_events(&db.pool, 10, "order.created").await;
    let relay = relay(&db.pool, &amqp, RelayConfig::default());
    let publisher = publisher(&amqp).await;

    let first = relay.run_once(&publisher).await.unwrap();
    let second = relay.run_once(&publisher).await.unwrap();

    assert_eq!((first.claimed, first.published, first.failed), (11, 10, 1));
    assert_eq!(
        second.claimed, 0,
        "the failed row waits for its next attempt"
    );
    let (attempts, error, retry_in_future): (i32, String, bool) = sqlx::query_as(
        "SELECT attempts, last_error, next_attempt_at > now() FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert!(error.contains("NO_ROUTE"), "{error}");
    assert!(retry_in_future);
    let (_conn, channel) = amqp_channel().await;
    assert_eq!(drain_queue(&channel, &billing_queue(&amqp)).await.len(), 10);
    publisher.close().await;
    db.cleanup().await;
}

/// A publisher retired by a batch that left publishes unconfirmed (their
/// acks and returns may still come on its lane) takes no further batch, on
/// any lane: the rows wait, due, for a new connection.
#[tokio::test]
async fn a_retired_publisher_starts_no_batch_and_the_rows_stay_due() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    insert_events(&db.pool, 10, "order.created").await;
    let relay = relay(&db.pool, &amqp, RelayConfig::default());
    let publisher = publisher(&amqp).await;
    assert!(publisher.is_usable());

    publisher.on_lane(1).retire();

    assert!(!publisher.is_usable(), "every clone, every lane is retired");
    assert_eq!(relay.drain(&publisher).await.unwrap(), 0);
    assert_eq!(unpublished(&db.pool).await, 10);
    let fresh = publisher_for(&amqp, &RelayConfig::default()).await;
    assert_eq!(relay.drain(&fresh).await.unwrap(), 10);
    publisher.close().await;
    fresh.close().await;
    db.cleanup().await;
}

/// A batch the broker nacked leaves its rows due with the error and retires
/// the publisher: the rows are tried again on new channels, since a channel
/// that nacks (after a cluster node went down, say) may keep nacking.
/// A full queue with `reject-publish` overflow makes the broker nack.
#[tokio::test]
async fn a_nacked_batch_leaves_its_rows_due_and_retires_the_publisher() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let full = QueueNames::new(&amqp, "full").main;
    let _queues = DeleteQueues {
        config: amqp.clone(),
        consumers: SUBSCRIPTIONS
            .iter()
            .map(|s| s.consumer)
            .chain(["full"])
            .collect(),
    };
    let publisher = publisher(&amqp).await;
    let (_conn, channel) = amqp_channel().await;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(full.as_str().into(), Default::default(), args)
        .await
        .unwrap();
    channel
        .queue_bind(
            full.as_str().into(),
            amqp.exchange().into(),
            "order.created".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    insert_events(&db.pool, 5, "order.created").await;
    let relay = relay(&db.pool, &amqp, RelayConfig::default());

    let outcome = relay.run_once(&publisher).await.unwrap();

    assert_eq!(
        (outcome.claimed, outcome.published, outcome.failed),
        (5, 0, 5)
    );
    assert!(!publisher.is_usable(), "a nack retires the publisher");
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT last_error FROM outbox WHERE published_at IS NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(errors.len(), 5);
    assert!(errors.iter().all(|e| e.contains("nacked")), "{errors:?}");
    publisher.close().await;
    db.cleanup().await;
}

/// The broker may confirm many publishes with one ack, and lapin hands a
/// returned message to whichever confirm that ack completes first. Each
/// row's fate must still be its own: the unroutable rows, and only they, stay
/// pending with their error; every other row is published and delivered.
/// With a lane per batch, no return reaches another batch: none of the
/// rows is marked published and made due again afterwards.
#[tokio::test]
async fn unroutable_rows_among_many_are_each_kept_pending_and_no_other() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let (mut routable, mut unroutable) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        routable.extend(insert_events(&db.pool, 9, "order.created").await);
        unroutable.extend(insert_events(&db.pool, 1, "order.nobody_listens").await);
    }
    // Small batches, many open at once: on one shared channel, one ack
    // often spans several batches.
    let config = RelayConfig::default().with_batch_size(40).with_workers(4);
    let publisher = publisher_for(&amqp, &config).await;
    let relay = relay(&db.pool, &amqp, config);

    let drained = relay.drain_counted(&publisher).await.unwrap();

    assert_eq!(drained.published, 1800);
    assert_eq!(drained.reopened, 0, "a return rode on another batch's ack");
    let pending: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT transaction_id, last_error FROM outbox WHERE published_at IS NULL")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let pending_ids: HashSet<Uuid> = pending.iter().map(|(t, _)| *t).collect();
    let unroutable: HashSet<Uuid> = unroutable.into_iter().collect();
    let lost: Vec<&Uuid> = unroutable.difference(&pending_ids).collect();
    let held: Vec<&Uuid> = pending_ids.difference(&unroutable).collect();
    assert!(
        lost.is_empty() && held.is_empty(),
        "unroutable rows marked published: {lost:?}; routable rows left pending: {held:?}"
    );
    assert!(
        pending.iter().all(|(_, e)| e.contains("NO_ROUTE")),
        "{pending:?}"
    );
    let (_conn, channel) = amqp_channel().await;
    let delivered: HashSet<String> =
        message_ids(&drain_queue(&channel, &billing_queue(&amqp)).await)
            .into_iter()
            .collect();
    assert_eq!(delivered, routable.iter().map(Uuid::to_string).collect());
    publisher.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn two_relays_over_2000_rows_deliver_each_exactly_once() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let ids = insert_events(&db.pool, 2000, "order.created").await;
    let config = RelayConfig::default().with_batch_size(100);
    let (a, b) = (
        relay(&db.pool, &amqp, config.clone()),
        relay(&db.pool, &amqp, config),
    );
    let cancel = CancellationToken::new();
    let (pa, pb) = (
        a.publisher(&cancel).await.unwrap(),
        b.publisher(&cancel).await.unwrap(),
    );

    let (ra, rb) = tokio::join!(a.drain(&pa), b.drain(&pb));

    assert_eq!(ra.unwrap() + rb.unwrap(), 2000);
    assert_eq!(unpublished(&db.pool).await, 0);
    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    assert_eq!(deliveries.len(), 2000);
    let distinct: HashSet<String> = message_ids(&deliveries).into_iter().collect();
    assert_eq!(distinct, ids.iter().map(Uuid::to_string).collect());
    pa.close().await;
    pb.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn the_relay_loses_nothing_when_the_broker_goes_away_mid_stream() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(target_of(&crate::helpers::amqp_url())).await;
    let mut amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    amqp = amqp.with_url(via(&crate::helpers::amqp_url(), proxy.addr));
    let relay = relay(
        &db.pool,
        &amqp,
        RelayConfig::default()
            .with_batch_size(20)
            .with_poll_interval(std::time::Duration::from_millis(50)),
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(cancel.clone()));
    let mut ids = insert_events(&db.pool, 100, "order.created").await;
    all_published(
        &db.pool,
        "the first 100 rows to be published",
        Duration::from_secs(20),
    )
    .await;

    proxy.cut();
    ids.extend(insert_events(&db.pool, 100, "order.created").await);
    eventually(
        "the relay to try the broker during the outage",
        Duration::from_secs(10),
        || async { (proxy.refused() >= 2).then_some(()) },
    )
    .await;
    assert!(
        unpublished(&db.pool).await > 0,
        "nothing can be published while the broker is away"
    );
    proxy.restore();

    all_published(
        &db.pool,
        "the rest to be published after the broker returns",
        Duration::from_secs(30),
    )
    .await;
    assert!(!running.is_finished(), "the relay kept running");
    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    let distinct: HashSet<String> = message_ids(&deliveries).into_iter().collect();
    assert_eq!(
        distinct,
        ids.iter().map(Uuid::to_string).collect(),
        "every row arrived"
    );
    cancel.cancel();
    running.await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn the_relay_catches_up_when_postgres_comes_back() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(target_of(&db.url)).await;
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&via(&db.url, proxy.addr))
        .await
        .unwrap();
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let relay = relay(
        &relay_pool,
        &amqp,
        RelayConfig::default().with_poll_interval(std::time::Duration::from_millis(50)),
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(cancel.clone()));
    wait_for_topology(&amqp).await;

    proxy.cut();
    let ids = insert_events(&db.pool, 50, "order.created").await;
    eventually(
        "the relay to try Postgres during the outage",
        Duration::from_secs(10),
        || async { (proxy.refused() >= 2).then_some(()) },
    )
    .await;
    assert_eq!(unpublished(&db.pool).await, 50);
    proxy.restore();

    all_published(
        &db.pool,
        "the rows to be published once Postgres is back",
        Duration::from_secs(30),
    )
    .await;
    assert!(!running.is_finished());
    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    let distinct: HashSet<String> = message_ids(&deliveries).into_iter().collect();
    assert_eq!(distinct, ids.iter().map(Uuid::to_string).collect());
    cancel.cancel();
    running.await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_notify_from_another_process_wakes_the_relay_long_before_its_poll() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let relay = relay(
        &db.pool,
        &amqp,
        RelayConfig::default().with_poll_interval(std::time::Duration::from_millis(600_000)),
    );
    let cancel = CancellationToken::new();
    // The relay's own process: its LISTEN task turns a NOTIFY into its wake-up.
    let listening = tokio::spawn(outbox_common::wake::listen(
        db.pool.clone(),
        relay.wake().clone(),
        cancel.clone(),
    ));
    let running = tokio::spawn(relay.run(cancel.clone()));
    // The "API process": its own wake-up, forwarded as a Postgres NOTIFY.
    let api_wake = Wake::default();
    tokio::spawn(forward_wakes_as_notify(
        db.pool.clone(),
        api_wake.clone(),
        cancel.clone(),
    ));
    // Let the relay finish its first drain and start waiting.
    wait_for_topology(&amqp).await;

    insert_events(&db.pool, 3, "order.created").await;
    api_wake.notify();

    all_published(
        &db.pool,
        "the relay to publish after the NOTIFY",
        Duration::from_secs(10),
    )
    .await;
    cancel.cancel();
    running.await.unwrap();
    listening.await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn published_rows_past_retention_are_pruned_and_pending_ones_kept() {
    let db = TestDb::new().await;
    insert_events(&db.pool, 25, "order.created").await;
    sqlx::query("UPDATE outbox SET published_at = now() - interval '8 days' WHERE id <= 20")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id IN (21, 22)")
        .execute(&db.pool)
        .await
        .unwrap();
    let config = RelayConfig::default();

    let pruned = order_service::orders::EVENTS
        .prune(config.retention())
        .with_batch(7)
        .run_once(&db.pool)
        .await
        .unwrap();

    assert_eq!(pruned, 20, "old published rows go, in batches of 7");
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, 5);
    assert_eq!(unpublished(&db.pool).await, 3);
    db.cleanup().await;
}

/// The batches share a confirm window far smaller than the backlog, and more
/// batches may be open than the window holds full ones: every row must still
/// get through, once, in `drain` and in `run` (a scheduler that waits for
/// room without settling confirms would hang here).
#[tokio::test]
async fn a_backlog_far_larger_than_the_confirm_window_is_published_once() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    // Window 7 × 2 = 14 publishes awaiting confirms, 3 batches open.
    let config = RelayConfig::default()
        .with_batch_size(7)
        .with_workers(2)
        .with_poll_interval(std::time::Duration::from_millis(50));
    let relay = relay(&db.pool, &amqp, config);
    let mut ids = insert_events(&db.pool, 150, "order.created").await;
    let publisher = publisher(&amqp).await;

    let drained = tokio::time::timeout(Duration::from_secs(30), relay.drain(&publisher))
        .await
        .expect("drain ends")
        .unwrap();
    assert_eq!(drained, 150);

    ids.extend(insert_events(&db.pool, 150, "order.created").await);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(cancel.clone()));
    all_published(
        &db.pool,
        "run to publish the second backlog",
        Duration::from_secs(30),
    )
    .await;
    cancel.cancel();
    running.await.unwrap();
    publisher.close().await;

    let (_conn, channel) = amqp_channel().await;
    let deliveries = drain_queue(&channel, &billing_queue(&amqp)).await;
    let delivered = message_ids(&deliveries);
    let distinct: HashSet<String> = delivered.iter().cloned().collect();
    assert_eq!(delivered.len(), 300, "each row published once");
    assert_eq!(distinct, ids.iter().map(Uuid::to_string).collect());
    db.cleanup().await;
}

/// A tracing layer that panics when the relay opens the PRODUCER span of
/// one row's publish, the first `times` times: a bug inside a relay batch,
/// after it claimed its rows and published those before it, and before it
/// marked anything. Injected through tracing because the relay has no hook
/// of its own; installed for this test's thread only.
struct PanicOnPublish {
    message_id: String,
    times: Arc<std::sync::atomic::AtomicU32>,
}

struct MessageId(Option<String>);

impl tracing::field::Visit for MessageId {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "messaging.message.id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PanicOnPublish {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "outbox publish" {
            return;
        }
        let mut id = MessageId(None);
        attrs.record(&mut id);
        if id.0.as_deref() != Some(self.message_id.as_str()) {
            return;
        }
        let armed = self
            .times
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok();
        if armed {
            panic!("injected: a bug while publishing {}", self.message_id);
        }
    }
}

#[tokio::test]
async fn a_relay_batch_that_panics_leaves_its_rows_due_and_the_relay_carries_on() {
    use tracing_subscriber::layer::SubscriberExt as _;

    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let ids = insert_events(&db.pool, 30, "order.created").await;
    // The tenth row: the last of the batch that claims the first ten, after
    // nine rows of that batch were published.
    let poison = ids[9];
    let times = Arc::new(std::sync::atomic::AtomicU32::new(1));
    let injected = PanicOnPublish {
        message_id: poison.to_string(),
        times: times.clone(),
    };
    // `#[tokio::test]` polls every task of this test on this thread.
    let _tracing = crate::helpers::trace_this_thread(
        tracing_subscriber::Registry::default()
            .with(tracing_subscriber::filter::LevelFilter::INFO)
            .with(injected),
    );
    // Three batches of ten open at once: one panics, two carry on.
    let relay = relay(
        &db.pool,
        &amqp,
        RelayConfig::default()
            .with_batch_size(10)
            .with_workers(2)
            .with_poll_interval(std::time::Duration::from_millis(50)),
    );
    let cancel = CancellationToken::new();
    let running = tokio::spawn(relay.clone().run(cancel.clone()));

    all_published(
        &db.pool,
        "every row to be published despite the panic",
        Duration::from_secs(20),
    )
    .await;

    assert_eq!(
        times.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the batch panicked"
    );
    assert!(!running.is_finished(), "the relay kept running");
    let (attempts, errors): (i64, i64) =
        sqlx::query_as("SELECT sum(attempts)::bigint, count(last_error) FROM outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (attempts, errors),
        (0, 0),
        "the panicking batch marked nothing"
    );
    let (_conn, channel) = amqp_channel().await;
    let deliveries = message_ids(&drain_queue(&channel, &billing_queue(&amqp)).await);
    let copies = |id: &Uuid| deliveries.iter().filter(|m| **m == id.to_string()).count();
    for (i, id) in ids.iter().enumerate() {
        // The rows published before the panic were published again with
        // the same id (at least once); the others once.
        let expected = if i < 9 { 2 } else { 1 };
        assert_eq!(copies(id), expected, "row {i} ({id})");
    }
    // Rows written after the panic are published as usual.
    let later = insert_events(&db.pool, 5, "order.created").await;
    relay.wake().notify();
    all_published(&db.pool, "the later rows", Duration::from_secs(10)).await;
    let deliveries = message_ids(&drain_queue(&channel, &billing_queue(&amqp)).await);
    assert_eq!(
        deliveries.into_iter().collect::<HashSet<_>>(),
        later.iter().map(Uuid::to_string).collect()
    );
    cancel.cancel();
    running.await.unwrap();
    db.cleanup().await;
}
