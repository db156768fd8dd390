//! A handler that asks for per-aggregate order gets one aggregate's events
//! in sequence, whatever fails in between: a domain of its own (carts),
//! five events per cart written in one burst, two consumers sharing the
//! queue, refusals injected, and one event type the consumer is not bound
//! to, which never holds the events after it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use inbox::{Consumer, ConsumerConfig, Event, Handler, HandlerError};
use order_service::config::{AmqpConfig, RelayConfig};
use order_service::orders::EVENTS;
use outbox::{NewOutboxEvent, Relay};
use outbox_common::amqp::Subscription;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, eventually, test_amqp};

const CARTS: usize = 12;
/// Each cart's history, in sequence; `cart.shipped` is not the projection's.
const HISTORY: [&str; 5] = [
    "cart.opened",
    "cart.item_added",
    "cart.shipped",
    "cart.item_added",
    "cart.paid",
];
const PROJECTION: Subscription = Subscription {
    consumer: "cart_projection",
    routing_keys: &["cart.opened", "cart.item_added", "cart.paid"],
};
/// Takes every cart event, so that `cart.shipped` is routed somewhere.
const AUDIT: Subscription = Subscription {
    consumer: "cart_audit",
    routing_keys: &["cart.#"],
};

/// Writes each event it applies into `cart_applied`; refuses the first
/// attempt of each cart's first two events in every other cart, so that
/// their successors arrive first and must wait.
#[derive(Clone)]
struct Projection {
    subscription: Subscription,
    ordered: bool,
    /// A cart whose first event is refused every time (a poison event).
    poison: Option<usize>,
    /// Refuses the first attempts described above.
    refusals: bool,
}

impl Projection {
    /// The projection in sequence, with `cart`'s first event refused every
    /// time.
    fn poisoned(cart: usize) -> Self {
        Self {
            subscription: PROJECTION,
            ordered: true,
            poison: Some(cart),
            refusals: true,
        }
    }
}

impl Handler for Projection {
    type Event = serde_json::Value;

    fn subscription(&self) -> Subscription {
        self.subscription
    }

    fn in_sequence(&self) -> bool {
        self.ordered
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<serde_json::Value>],
    ) -> Result<(), HandlerError> {
        for event in events {
            let place = event.sequence.as_ref();
            let seq = place.map(|p| p.seq);
            let cart: usize = event.body["cart"].as_u64().unwrap_or_default() as usize;
            if self.ordered
                && self.refusals
                && event.attempt == 0
                && cart.is_multiple_of(2)
                && seq.is_some_and(|s| s <= 2)
            {
                return Err(HandlerError::refused("a refusal injected by the test"));
            }
            if self.poison == Some(cart) && seq == Some(1) {
                return Err(HandlerError::refused("poison"));
            }
            sqlx::query(
                "INSERT INTO cart_applied (consumer, cart, seq, event_type) VALUES ($1, $2, $3, $4)",
            )
            .bind(self.subscription.consumer)
            .bind(cart as i64)
            .bind(seq)
            .bind(&event.event_type)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// A test's database with the projection's table, and the subscriptions'
/// queues of its own, deleted on drop.
struct Carts {
    db: TestDb,
    amqp: AmqpConfig,
    subscriptions: Vec<Subscription>,
    _queues: DeleteQueues,
}

impl Carts {
    async fn new(subscriptions: &[Subscription]) -> Self {
        let db = TestDb::new().await;
        sqlx::query(
            "CREATE TABLE cart_applied (id bigserial PRIMARY KEY, consumer text NOT NULL, \
               cart bigint NOT NULL, seq bigint, event_type text NOT NULL)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let amqp = test_amqp();
        let _queues = DeleteQueues {
            config: amqp.clone(),
            consumers: subscriptions.iter().map(|s| s.consumer).collect(),
        };
        let subscriptions = subscriptions.to_vec();
        Self {
            db,
            amqp,
            subscriptions,
            _queues,
        }
    }

    /// Drops the database (the queues go when `self` is dropped).
    async fn cleanup(self) {
        self.db.cleanup().await;
    }

    /// Writes every cart's `history` through the outbox in one transaction,
    /// then publishes it all, `batch` rows a relay batch.
    async fn publish(&self, carts: std::ops::Range<usize>, history: &[&'static str], batch: i64) {
        let events: Vec<NewOutboxEvent> = carts
            .flat_map(|cart| {
                history.iter().map(move |&event_type| NewOutboxEvent {
                    transaction_id: Uuid::new_v4(),
                    aggregate_type: "cart",
                    aggregate_id: format!("cart-{cart}"),
                    event_type,
                    payload: json!({ "cart": cart }),
                    headers: json!({}),
                })
            })
            .collect();
        let mut tx = self.db.pool.begin().await.unwrap();
        EVENTS.insert_many(&mut tx, &events).await.unwrap();
        tx.commit().await.unwrap();
        self.relay(batch).await;
    }

    /// Publishes what the outbox holds unpublished, `batch` rows a relay batch.
    async fn relay(&self, batch: i64) {
        let relay = Relay::new(self.db.pool.clone(), EVENTS.clone(), self.amqp.clone())
            .with_config(RelayConfig::default().with_batch_size(batch))
            .with_subscriptions(self.subscriptions.clone());
        let publisher = relay.publisher(&CancellationToken::new()).await.unwrap();
        while relay.drain(&publisher).await.unwrap() > 0 {}
        publisher.close().await;
    }
}

async fn applied(pool: &PgPool, consumer: &str) -> BTreeMap<i64, Vec<i64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT cart, coalesce(seq, 0) FROM cart_applied WHERE consumer = $1 ORDER BY id",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_cart = BTreeMap::<i64, Vec<i64>>::new();
    for (cart, seq) in rows {
        by_cart.entry(cart).or_default().push(seq);
    }
    by_cart
}

/// Waits until `carts` carts have `events` events each applied by
/// `consumer`; returns the places applied, by cart.
async fn all_applied(
    pool: &PgPool,
    consumer: &str,
    carts: usize,
    events: usize,
) -> BTreeMap<i64, Vec<i64>> {
    let what = format!("{carts} carts' {events} events applied");
    eventually(&what, Duration::from_secs(30), || async move {
        let by_cart = applied(pool, consumer).await;
        let done = by_cart.len() == carts && by_cart.values().all(|s| s.len() == events);
        done.then_some(by_cart)
    })
    .await
}

#[tokio::test]
async fn an_ordered_handler_applies_each_aggregates_events_in_sequence() {
    // Every cart's five events in one burst, then published.
    let carts = Carts::new(&[PROJECTION, AUDIT]).await;
    carts.publish(0..CARTS, &HISTORY, 7).await;
    let (db, amqp) = (&carts.db, &carts.amqp);

    // Two consumers share the projection's queue; each takes batches of up
    // to 4 deliveries, so successors often come in before their predecessor.
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let config = ConsumerConfig::default()
        .with_batch_size(4)
        .with_concurrency(2);
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let handler = Projection {
            subscription: PROJECTION,
            ordered: true,
            poison: None,
            refusals: true,
        };
        let consumer =
            Consumer::new(handler, db.pool.clone(), amqp.clone()).with_config(config.clone());
        consumers.push(Arc::new(consumer));
    }
    let audit = Projection {
        subscription: AUDIT,
        ordered: false,
        poison: None,
        refusals: true,
    };
    consumers.iter().for_each(|c| {
        tracker.spawn(c.clone().run(cancel.clone()));
    });
    tracker
        .spawn(Arc::new(Consumer::new(audit, db.pool.clone(), amqp.clone())).run(cancel.clone()));

    let by_cart = all_applied(&db.pool, PROJECTION.consumer, CARTS, 4).await;
    // In sequence, every cart; the unbound cart.shipped (3) held nothing up.
    for (cart, seqs) in &by_cart {
        assert_eq!(seqs, &[1, 2, 4, 5], "cart {cart}");
    }
    let held: u64 = consumers.iter().map(|c| c.metrics().held.get()).sum();
    let retried: u64 = consumers.iter().map(|c| c.metrics().retried.get()).sum();
    assert!(
        retried >= CARTS as u64,
        "refusals injected: {retried} retried"
    );
    assert!(
        held > 0,
        "no event came before its predecessor: the test proved nothing"
    );
    let audited = applied(&db.pool, AUDIT.consumer).await;
    assert_eq!(
        audited.values().map(Vec::len).sum::<usize>(),
        CARTS * HISTORY.len()
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_held")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "held events left behind");
    // Every place at the last event, and no longer marked waiting once
    // the sweep found none of its events held.
    let pool = db.pool.clone();
    eventually(
        "every cart's place at 5, none waiting",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let places: Vec<(i64, bool)> = sqlx::query_as(
                    "SELECT last_seq, waiting FROM inbox_aggregates WHERE consumer = $1",
                )
                .bind(PROJECTION.consumer)
                .fetch_all(&pool)
                .await
                .unwrap();
                (places.len() == CARTS && places.iter().all(|p| *p == (5, false))).then_some(())
            }
        },
    )
    .await;
    // A place moved on within a second of its last write changes no
    // indexed column: some of the updates were heap-only (HOT), with no
    // index entries written (Postgres reports its counts within seconds).
    let pool = db.pool.clone();
    eventually(
        "heap-only updates of the places",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let hot: i64 = sqlx::query_scalar(
                    "SELECT n_tup_hot_upd FROM pg_stat_user_tables \
                     WHERE relname = 'inbox_aggregates'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                (hot > 0).then_some(())
            }
        },
    )
    .await;

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    carts.cleanup().await;
}

/// A poison event (refused every time) ends in the dead-letter queue and
/// holds its own aggregate's later events only; the other aggregates flow.
/// Held events follow in the transaction of the event they waited for:
/// when a cart's first event comes after its two later ones, all three are
/// applied by one transaction, with no second pass through the broker.
#[tokio::test]
async fn held_events_are_applied_in_the_transaction_of_the_event_they_waited_for() {
    let carts = Carts::new(&[PROJECTION]).await;
    let (consumer, cancel, running) = first_event_held_back(&carts, 3).await;
    publish_first(&carts, false).await;
    let done = all_applied(&carts.db.pool, PROJECTION.consumer, 1, 3).await;
    assert_eq!(done[&1], [1, 2, 3]);
    let transactions = transactions_applied(&carts.db.pool).await;
    assert_eq!(transactions, 1, "applied by one transaction");
    assert_eq!(consumer.metrics().processed.get(), 3);
    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// At most 64 held events follow in one transaction; the release publishes
/// the rest again, and they are applied in sequence all the same.
#[tokio::test]
async fn many_held_events_follow_in_parts_and_in_sequence() {
    let carts = Carts::new(&[PROJECTION]).await;
    let (_consumer, cancel, running) = first_event_held_back(&carts, 100).await;
    publish_first(&carts, false).await;
    let done = all_applied(&carts.db.pool, PROJECTION.consumer, 1, 100).await;
    assert_eq!(done[&1], (1..=100).collect::<Vec<i64>>());
    let transactions = transactions_applied(&carts.db.pool).await;
    assert!(transactions > 1, "{transactions} transaction(s)");
    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// A copy of a held event that comes with the event it waited for (a
/// redelivery, or a release that published it but did not delete it) is
/// applied once: the held one is taken out, not applied again.
#[tokio::test]
async fn a_copy_of_a_held_event_beside_its_predecessor_is_applied_once() {
    let carts = Carts::new(&[PROJECTION]).await;
    let (_consumer, cancel, running) = first_event_held_back(&carts, 2).await;
    // Stopped, so that the next consumer takes the first event and the
    // held one's copy together.
    cancel.cancel();
    running.await.unwrap();
    publish_first(&carts, true).await;
    let (db, amqp) = (&carts.db, &carts.amqp);
    let consumer = Arc::new(Consumer::new(in_order(), db.pool.clone(), amqp.clone()));
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(cancel.clone()));
    let done = all_applied(&db.pool, PROJECTION.consumer, 1, 2).await;
    assert_eq!(done[&1], [1, 2]);
    let (held, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM inbox_held), (SELECT count(*) FROM cart_applied)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((held, rows), (0, 2), "held left, rows applied");
    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// How many transactions wrote the projection's rows.
async fn transactions_applied(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM cart_applied")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The projection in sequence, without refusals.
fn in_order() -> Projection {
    Projection {
        subscription: PROJECTION,
        ordered: true,
        poison: None,
        refusals: false,
    }
}

/// Writes cart 1's `n` events (numbered 1 to `n`), publishes all but the
/// first, and starts a consumer in sequence; returns once it holds them.
async fn first_event_held_back(
    carts: &Carts,
    n: usize,
) -> (
    Arc<Consumer<Projection>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let db = &carts.db;
    let events: Vec<NewOutboxEvent> = (0..n)
        .map(|i| NewOutboxEvent {
            transaction_id: Uuid::new_v4(),
            aggregate_type: "cart",
            aggregate_id: "cart-1".into(),
            event_type: if i == 0 {
                "cart.opened"
            } else {
                "cart.item_added"
            },
            payload: json!({ "cart": 1 }),
            headers: json!({}),
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    EVENTS.insert_many(&mut tx, &events).await.unwrap();
    sqlx::query("UPDATE outbox SET published_at = now() WHERE seq = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    carts.relay(1000).await;
    let consumer = Arc::new(Consumer::new(
        in_order(),
        db.pool.clone(),
        carts.amqp.clone(),
    ));
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(cancel.clone()));
    let want = n as u64 - 1;
    eventually("the later events held", Duration::from_secs(30), || {
        let held = consumer.metrics().held.get();
        async move { (held == want).then_some(()) }
    })
    .await;
    (consumer, cancel, running)
}

/// Publishes the first event held back, and with it, if `copy`, the second
/// again (the same message id).
async fn publish_first(carts: &Carts, copy: bool) {
    sqlx::query("UPDATE outbox SET published_at = NULL WHERE seq = 1 OR (seq = 2 AND $1)")
        .bind(copy)
        .execute(&carts.db.pool)
        .await
        .unwrap();
    carts.relay(1000).await;
}

/// Within one consumer, a later event of an aggregate never overtakes an
/// earlier one: a batch that shares an aggregate with a batch in flight
/// starts once that one is done. Events delivered in sequence are applied
/// without one held, however small the batches and many at once.
#[tokio::test]
async fn events_delivered_in_sequence_are_never_held_within_one_consumer() {
    const HISTORY: [&str; 4] = [
        "cart.opened",
        "cart.item_added",
        "cart.item_added",
        "cart.paid",
    ];
    let carts = Carts::new(&[PROJECTION]).await;
    let n = 4 * CARTS;
    // One relay batch: one channel, so the queue holds them in sequence.
    carts.publish(0..n, &HISTORY, 4 * n as i64).await;
    let (db, amqp) = (&carts.db, &carts.amqp);
    let handler = Projection {
        subscription: PROJECTION,
        ordered: true,
        poison: None,
        refusals: false,
    };
    let config = ConsumerConfig::default()
        .with_batch_size(2)
        .with_concurrency(4);
    let consumer = Consumer::new(handler, db.pool.clone(), amqp.clone()).with_config(config);
    let consumer = Arc::new(consumer);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(cancel.clone()));
    let by_cart = all_applied(&db.pool, PROJECTION.consumer, n, 4).await;
    for (cart, seqs) in &by_cart {
        assert_eq!(seqs, &[1, 2, 3, 4], "cart {cart}");
    }
    // A batch that failed (a transient error under load) goes through the
    // retry queue and comes back after its aggregate's later events: those
    // are held, as they must be. The count says which it was.
    let metrics = consumer.metrics();
    assert_eq!(
        metrics.held.get(),
        0,
        "events held ({} retried, {} requeued)",
        metrics.retried.get(),
        metrics.requeued.get()
    );
    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// `dlq list`'s view shows the held aggregate, and an operator's skip lets
/// it go on.
#[tokio::test]
async fn a_poison_event_holds_its_aggregate_only_until_it_is_skipped() {
    let carts = Carts::new(&[PROJECTION]).await;
    let history = ["cart.opened", "cart.item_added", "cart.paid"];
    carts
        .publish(0..3, &history, RelayConfig::default().batch_size())
        .await;
    let (db, amqp) = (&carts.db, &carts.amqp);
    let handler = Projection::poisoned(1);
    let consumer = Arc::new(Consumer::new(handler, db.pool.clone(), amqp.clone()));
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(cancel.clone()));

    // Carts 0 and 2 go through; cart 1's first event is dead-lettered after
    // its retries, and its two later events are held.
    let pool = db.pool.clone();
    let held = eventually(
        "cart 1 held behind its poison event",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            let dead = consumer.metrics().dead_lettered.get();
            async move {
                (dead == 1).then_some(())?;
                let done = applied(&pool, PROJECTION.consumer).await;
                let others = [0, 2]
                    .iter()
                    .all(|c| done.get(c).is_some_and(|s| s.len() == 3));
                let held = inbox::waiting::list(&pool, PROJECTION.consumer, 10)
                    .await
                    .ok()?;
                (others && !done.contains_key(&1) && held.first().is_some_and(|h| h.events == 2))
                    .then_some(held)
            }
        },
    )
    .await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (
            held[0].aggregate_id.as_str(),
            held[0].waiting_for,
            held[0].last_applied
        ),
        ("cart-1", 1, 0)
    );
    assert_eq!(consumer.metrics().dead_lettered.get(), 1);
    // A held event has no dedup row: it is not applied yet, and its copy
    // published again must not be taken for a duplicate.
    let dedup_rows = "SELECT (SELECT count(*) FROM inbox_held), \
         (SELECT count(*) FROM inbox_held h JOIN processed_messages p \
            USING (consumer, transaction_id)), \
         (SELECT count(*) FROM processed_messages)";
    let counts: (i64, i64, i64) = sqlx::query_as(dedup_rows)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(counts, (2, 0, 6), "held, held with a dedup row, dedup rows");

    let skipped = inbox::waiting::skip(&db.pool, PROJECTION.consumer, "cart", "cart-1").await;
    assert_eq!(skipped.unwrap(), Some(1));
    let pool = db.pool.clone();
    let cart_1 = eventually("cart 1 to go on", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            let done = applied(&pool, PROJECTION.consumer).await;
            done.get(&1).filter(|s| s.len() == 2).cloned()
        }
    })
    .await;
    assert_eq!(cart_1, [2, 3]);
    let counts: (i64, i64, i64) = sqlx::query_as(dedup_rows)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        counts,
        (0, 0, 8),
        "applied once released, each with its dedup row"
    );
    let nothing = inbox::waiting::skip(&db.pool, PROJECTION.consumer, "cart", "cart-1").await;
    assert_eq!(nothing.unwrap(), None, "nothing held any more");

    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// Held events are bounded too: one held longer than the hold limit (the
/// dedup window, in the service) goes to the dead-letter queue with the
/// reason, rather than waiting for ever or being deleted unapplied.
#[tokio::test]
async fn an_event_held_past_the_hold_limit_is_dead_lettered() {
    let carts = Carts::new(&[PROJECTION]).await;
    let history = ["cart.opened", "cart.paid"];
    carts
        .publish(1..2, &history, RelayConfig::default().batch_size())
        .await;
    let (db, amqp) = (&carts.db, &carts.amqp);
    let handler = Projection::poisoned(1);
    let config = ConsumerConfig::default().with_hold_limit(Duration::from_secs(2));
    let consumer = Consumer::new(handler, db.pool.clone(), amqp.clone()).with_config(config);
    let consumer = Arc::new(consumer);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(consumer.clone().run(cancel.clone()));

    let (_conn, channel) = crate::helpers::amqp_channel().await;
    let dlq = outbox_common::amqp::QueueNames::new(amqp, PROJECTION.consumer).dlq;
    eventually("both events in the DLQ", Duration::from_secs(30), || {
        let (channel, dlq) = (channel.clone(), dlq.clone());
        async move {
            let declare = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let queue = channel
                .queue_declare(dlq.as_str().into(), declare, Default::default())
                .await
                .ok()?;
            (queue.message_count() == 2).then_some(())
        }
    })
    .await;
    let reasons: Vec<String> = crate::helpers::drain_queue(&channel, &dlq)
        .await
        .iter()
        .filter_map(|d| {
            inbox::message::header_str(
                d.properties.headers().as_ref(),
                outbox_common::amqp::headers::ERROR_HEADER,
            )
        })
        .collect();
    assert!(reasons.iter().any(|r| r == "poison"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.starts_with("held longer than")),
        "{reasons:?}"
    );
    // Deleted once the dead-letter queue confirmed it.
    let pool = db.pool.clone();
    eventually("no event held", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let held: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_held")
                .fetch_one(&pool)
                .await
                .ok()?;
            (held == 0).then_some(())
        }
    })
    .await;
    cancel.cancel();
    running.await.unwrap();
    carts.cleanup().await;
}

/// Runs a statement that fails, swallows the error and returns Ok, on an
/// aborted transaction.
struct Swallower;

impl Handler for Swallower {
    type Event = serde_json::Value;

    fn subscription(&self) -> Subscription {
        PROJECTION
    }

    fn in_sequence(&self) -> bool {
        true
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        _events: &[Event<serde_json::Value>],
    ) -> Result<(), HandlerError> {
        let _ = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
        Ok(())
    }
}

/// A handler in sequence that swallows its statement's error returns Ok on
/// an aborted transaction, whose COMMIT Postgres answers with a silent
/// rollback: the event must come back as an outage (its delivery left for
/// redelivery), not as applied, and neither its dedup row nor its
/// aggregate's place may be written.
#[tokio::test]
async fn a_handler_in_sequence_that_swallows_an_error_is_not_taken_as_applied() {
    let db = TestDb::new().await;
    let consumer = Consumer::new(Swallower, db.pool.clone(), test_amqp());
    let event = Event {
        id: Uuid::new_v4(),
        event_type: "cart.opened".into(),
        body: json!({ "cart": 1 }),
        attempt: 0,
        trace_headers: json!({}),
        sequence: Some(inbox::Sequence {
            aggregate_type: "cart".into(),
            aggregate_id: "cart-1".into(),
            seq: 1,
            predecessor: 0,
        }),
    };

    let result = consumer.apply_one(&event).await;

    assert!(result.is_err(), "an outage, not {result:?}");
    let (dedup, places): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM processed_messages), (SELECT count(*) FROM inbox_aggregates)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((dedup, places), (0, 0));
    db.cleanup().await;
}
