//! A new event type and its consumer, defined in this file alone, run
//! inside the order service's own roles: `points.awarded` events are
//! written to the order service's `outbox`, published by its relay with
//! this file's subscription, and applied by a handler started as a `Roles`
//! consumer role (its metrics in the roles' families, its commits waking
//! the roles' relay). What any service built on the core gets (published,
//! applied once under a duplicate delivery, retried, dead-lettered) is
//! shown by `examples/loyalty` and its tests; here only what the roles add:
//! a handler that panics is dead-lettered and the role carries on, and the
//! dedup transaction under such a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inbox::ConsumerMetrics;
use inbox::{Applied, Consumer, Event, Handler, HandlerError, dlq};
use order_service::config::{AmqpConfig, ConsumerConfig, RelayConfig};
use order_service::orders::EVENTS;
use order_service::startup::Roles;
use outbox::{NewOutboxEvent, Relay};
use outbox_common::amqp::{QueueNames, Subscription};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, eventually, test_amqp};

const WAIT: Duration = Duration::from_secs(20);

/// The new event type, also its routing key.
const POINTS_AWARDED: &str = "points.awarded";
/// Its consumer: its own name (dedup key, queue) and binding.
const LOYALTY: Subscription = Subscription {
    consumer: "loyalty_points",
    routing_keys: &[POINTS_AWARDED],
};

/// The body of `points.awarded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PointsAwarded {
    award_id: Uuid,
    user_id: String,
    points: i64,
}

/// The consumer's tables, which only this test knows. `loyalty_awards` has
/// no unique key: only the inbox stands between a redelivery and a second
/// row (and a doubled balance).
async fn create_tables(pool: &PgPool) {
    for statement in [
        "CREATE TABLE loyalty_awards (award_id uuid NOT NULL, user_id text NOT NULL, \
             points bigint NOT NULL, attempt integer NOT NULL)",
        "CREATE TABLE loyalty_balances (user_id text PRIMARY KEY, points bigint NOT NULL)",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

/// Credits points; `panics-*` users make it panic (the test's rule). It
/// records the attempt of every event it is handed.
#[derive(Debug, Clone, Default)]
struct Loyalty {
    seen: Arc<Mutex<HashMap<Uuid, Vec<u32>>>>,
}

impl Loyalty {
    /// The attempts at which the handler was handed `award`.
    fn attempts(&self, award: Uuid) -> Vec<u32> {
        self.seen
            .lock()
            .unwrap()
            .get(&award)
            .cloned()
            .unwrap_or_default()
    }
}

impl Handler for Loyalty {
    type Event = PointsAwarded;

    fn subscription(&self) -> Subscription {
        LOYALTY
    }

    fn conversation_id(&self, event: &PointsAwarded) -> Option<String> {
        Some(event.user_id.clone())
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<PointsAwarded>],
    ) -> Result<(), HandlerError> {
        for event in events {
            assert_eq!(event.event_type, POINTS_AWARDED);
            let award = &event.body;
            assert_eq!(event.id, award.award_id, "the dedup key is the message id");
            self.seen
                .lock()
                .unwrap()
                .entry(event.id)
                .or_default()
                .push(event.attempt);
            // The rows of the events before this one are written already:
            // a panic must take them back with it.
            let user = award.user_id.as_str();
            if user.starts_with("panics-") {
                panic!("a bug in the points rules for {user}");
            }
            sqlx::query(
                "INSERT INTO loyalty_awards (award_id, user_id, points, attempt) VALUES ($1, $2, $3, $4)",
            )
            .bind(award.award_id)
            .bind(user)
            .bind(award.points)
            .bind(event.attempt as i32)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO loyalty_balances (user_id, points) VALUES ($1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET points = loyalty_balances.points + excluded.points",
            )
            .bind(user)
            .bind(award.points)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// One process running a relay for `points.awarded` and the loyalty
/// consumer role, over its own database and broker names.
struct Loyal {
    roles: Roles,
    db: TestDb,
    amqp: AmqpConfig,
    handler: Loyalty,
    queues: QueueNames,
    _guard: DeleteQueues,
}

impl Loyal {
    async fn new() -> Self {
        let db = TestDb::new().await;
        create_tables(&db.pool).await;
        let amqp = test_amqp();
        let guard = DeleteQueues {
            config: amqp.clone(),
            consumers: vec![LOYALTY.consumer],
        };
        Self {
            roles: Roles::new(db.pool.clone(), CancellationToken::new()),
            queues: QueueNames::new(&amqp, LOYALTY.consumer),
            handler: Loyalty::default(),
            db,
            amqp,
            _guard: guard,
        }
    }

    /// A relay with this test's subscription only.
    fn relay(&self) -> Relay {
        Relay::new(self.roles.pool.clone(), EVENTS.clone(), self.amqp.clone())
            .with_config(
                RelayConfig::default().with_poll_interval(std::time::Duration::from_millis(100)),
            )
            .with_metrics(self.roles.metrics.relay.clone())
            .with_wake(self.roles.wake.clone())
            .with_subscriptions(vec![LOYALTY])
    }

    fn start_relay(&self) {
        let (relay, cancel) = (self.relay(), self.roles.cancel.clone());
        self.roles
            .tracker
            .spawn(async move { relay.run(cancel).await });
    }

    /// Starts the consumer role, one transaction at a time.
    fn start_consumer(&self) {
        let config = ConsumerConfig::default().with_concurrency(1);
        self.roles
            .start_handler(self.handler.clone(), &self.amqp, &config);
    }

    /// The consumer role's metrics (shared by name with the role).
    fn metrics(&self) -> ConsumerMetrics {
        self.roles.metrics.consumers.consumer(&self.queues.main)
    }

    /// Writes one `points.awarded` outbox row per award, in one transaction,
    /// and wakes the relay as a writer in its process does.
    async fn award(&self, awards: &[(&str, i64)]) -> Vec<PointsAwarded> {
        let mut tx = self.db.pool.begin().await.unwrap();
        let mut written = Vec::new();
        for (user, points) in awards {
            let award = PointsAwarded {
                award_id: Uuid::new_v4(),
                user_id: (*user).to_owned(),
                points: *points,
            };
            EVENTS
                .insert(
                    &mut tx,
                    &NewOutboxEvent {
                        transaction_id: award.award_id,
                        aggregate_type: "loyalty_account",
                        aggregate_id: award.user_id.clone(),
                        event_type: POINTS_AWARDED,
                        payload: serde_json::to_value(&award).unwrap(),
                        headers: serde_json::json!({}),
                    },
                )
                .await
                .unwrap();
            written.push(award);
        }
        tx.commit().await.unwrap();
        self.roles.wake.notify();
        written
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&ConsumerMetrics) -> bool) {
        let metrics = self.metrics();
        eventually(what, WAIT, || async { done(&metrics).then_some(()) }).await;
    }

    /// The rows `award` left in the consumer's table.
    async fn award_rows(&self, award: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM loyalty_awards WHERE award_id = $1")
            .bind(award)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn balance(&self, user: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT points FROM loyalty_balances WHERE user_id = $1")
            .bind(user)
            .fetch_optional(&self.db.pool)
            .await
            .unwrap()
    }

    /// The loyalty consumer's dedup rows.
    async fn dedup_rows(&self) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT transaction_id FROM processed_messages WHERE consumer = $1")
            .bind(LOYALTY.consumer)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    async fn unpublished(&self) -> i64 {
        self.db
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await
    }

    async fn stop(self) {
        self.roles.cancel.cancel();
        self.roles
            .wait(Duration::from_secs(15))
            .await
            .expect("the roles stop in time");
        self.db.cleanup().await;
    }
}

#[tokio::test]
async fn a_handler_panicking_on_one_event_dead_letters_it_and_the_consumer_role_carries_on() {
    let loyal = Loyal::new().await;
    // Ten awards in one outbox transaction, the fifth one poison; all queued
    // before the consumer starts, so they reach it together and the panic
    // first strikes a batch that holds the others.
    let mut users: Vec<String> = (0..10).map(|i| format!("user-{i}")).collect();
    users[4] = "panics-frank".into();
    let first: Vec<(&str, i64)> = users.iter().map(|u| (u.as_str(), 7)).collect();
    let awards = loyal.award(&first).await;
    let poison = awards[4].award_id;
    loyal.start_relay();
    eventually("the awards to be published", WAIT, || async {
        (loyal.unpublished().await == 0).then_some(())
    })
    .await;
    loyal.start_consumer();

    loyal
        .wait_until("the poison award to be dead-lettered", |m| {
            m.dead_lettered.get() == 1 && m.processed.get() == 9
        })
        .await;
    // The role carries on: awards written afterwards are applied.
    let later = loyal
        .award(&[("user-0", 1), ("grace", 2), ("heidi", 3)])
        .await;
    loyal
        .wait_until("the later awards to be applied", |m| {
            m.processed.get() == 12
        })
        .await;

    let metrics = loyal.metrics();
    let retries = loyal.amqp.retry_delays().len() as u64;
    assert_eq!(
        metrics.retried.get(),
        retries,
        "a panic is retried like a refusal"
    );
    assert_eq!(metrics.requeued.get(), 0, "a panic is not an outage");
    assert_eq!(metrics.dead_lettered.get(), 1);
    let attempts = loyal.handler.attempts(poison);
    assert_eq!(
        attempts.iter().max(),
        Some(&(retries as u32)),
        "{attempts:?}"
    );
    let letters = dlq::list(&loyal.amqp, &loyal.queues, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, poison.to_string());
    assert!(
        letters[0].error.contains("panicked")
            && letters[0]
                .error
                .contains("a bug in the points rules for panics-frank"),
        "{}",
        letters[0].error
    );
    // Nothing else is lost, nothing is applied twice, nothing of the poison.
    for award in awards.iter().chain(&later).filter(|a| a.award_id != poison) {
        assert_eq!(loyal.award_rows(award.award_id).await, 1, "{award:?}");
    }
    assert_eq!(loyal.award_rows(poison).await, 0);
    assert_eq!(loyal.balance("panics-frank").await, None);
    assert_eq!(loyal.balance("user-0").await, Some(8));
    assert_eq!(loyal.balance("user-9").await, Some(7));
    let dedup = loyal.dedup_rows().await;
    assert_eq!(dedup.len(), 12);
    assert!(!dedup.contains(&poison));
    loyal.stop().await;
}

/// The dedup transaction itself, without a broker: a batch in which the
/// handler panics on one event commits every other event of the batch and
/// refuses that one, with the panic as its reason.
#[tokio::test]
async fn a_batch_whose_handler_panics_on_one_event_commits_the_others() {
    let db = TestDb::new().await;
    create_tables(&db.pool).await;
    let handler = Loyalty::default();
    let consumer = Consumer::new(handler.clone(), db.pool.clone(), test_amqp());
    let events: Vec<Event<PointsAwarded>> = (0..10)
        .map(|i| {
            let body = PointsAwarded {
                award_id: Uuid::new_v4(),
                user_id: if i == 6 {
                    "panics-ivan".into()
                } else {
                    format!("user-{i}")
                },
                points: 4,
            };
            Event {
                id: body.award_id,
                event_type: POINTS_AWARDED.into(),
                body,
                attempt: 0,
                trace_headers: serde_json::json!({}),
                sequence: None,
            }
        })
        .collect();
    let poison = events[6].id;

    let first = consumer.apply_batch(&events).await;
    let again = consumer.apply_batch(&events).await;

    assert_eq!(first.len(), 10, "a result for every id");
    for event in &events {
        let (first, again) = (first[&event.id].clone(), again[&event.id].clone());
        if event.id == poison {
            for result in [first, again] {
                match result {
                    Ok(Applied::Refused(reason)) => assert!(
                        reason.contains("panicked") && reason.contains("panics-ivan"),
                        "{reason}"
                    ),
                    other => panic!("the panicking event gave {other:?}"),
                }
            }
        } else {
            assert_eq!(first.unwrap(), Applied::Committed, "{:?}", event.body);
            assert_eq!(again.unwrap(), Applied::Duplicate, "{:?}", event.body);
        }
    }
    // The batch was tried whole first (and rolled back with the panic),
    // then one event at a time.
    assert_eq!(handler.attempts(events[0].id), vec![0, 0]);
    assert_eq!(db.count("SELECT count(*) FROM loyalty_awards").await, 9);
    assert_eq!(
        db.count("SELECT sum(points)::bigint FROM loyalty_balances")
            .await,
        36
    );
    let dedup: Vec<Uuid> = sqlx::query_scalar("SELECT transaction_id FROM processed_messages")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(dedup.len(), 9);
    assert!(!dedup.contains(&poison));
    db.cleanup().await;
}
