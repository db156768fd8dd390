//! The WAL relay (`RELAY_MODE=wal`): the outbox's inserts published from a
//! logical slot, with no claim and no update of the rows; its position
//! given to Postgres only up to confirmed transactions; refused rows handed
//! to the polling relay; one reader per slot.

use std::collections::HashSet;
use std::time::Duration;

use lapin::types::AMQPValue;
use order_service::config::{AmqpConfig, RelayConfig, SecretUrl};
use order_service::orders::{BILLING, EVENTS, SUBSCRIPTIONS};
use outbox::wal::WalRelay;
use outbox::{Publisher, Relay, RelayMetrics};
use outbox_common::amqp::QueueNames;
use outbox_common::amqp::headers::{SEQUENCE_HEADER, WRITTEN_AT_HEADER};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, amqp_channel, drain_queue, eventually, test_amqp};
use crate::relay::insert_events;

const WITHIN: Duration = Duration::from_secs(20);

/// A test database and broker names, and a slot name of this test's own
/// (slots are the server's, not the database's; the database's guard drops
/// them).
struct Wal {
    db: TestDb,
    amqp: AmqpConfig,
    slot: String,
    _queues: DeleteQueues,
}

/// A running WAL relay, stopped when dropped.
struct Running {
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Wal {
    async fn new() -> Self {
        let amqp = test_amqp();
        // The queues, as a relay declares them before its first publish.
        let cancel = CancellationToken::new();
        Publisher::open_lanes(&amqp, &SUBSCRIPTIONS, 1, &cancel)
            .await
            .unwrap()
            .close()
            .await;
        Self {
            db: TestDb::new().await,
            _queues: DeleteQueues::orders(&amqp),
            amqp,
            slot: format!("t{}", &Uuid::new_v4().simple().to_string()[..16]),
        }
    }

    fn relay(&self) -> Relay {
        Relay::new(self.db.pool.clone(), EVENTS.clone(), self.amqp.clone())
            .with_config(RelayConfig::default().with_batch_size(50))
            .with_metrics(RelayMetrics::default())
            .with_subscriptions(SUBSCRIPTIONS.to_vec())
    }

    fn wal_relay(&self) -> WalRelay {
        let url = SecretUrl::new(self.db.url.clone());
        let source = order_service::db::replication_config(&url, &self.slot, &self.slot).unwrap();
        WalRelay::new(self.relay(), source)
            .unwrap()
            .with_horizon_interval(Duration::from_millis(200))
    }

    /// Sets up and starts a WAL relay.
    async fn start(&self) -> Running {
        let relay = self.wal_relay();
        relay.setup().await.unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(relay.run(cancel.clone()));
        Running {
            cancel,
            task: Some(task),
        }
    }

    fn billing_queue(&self) -> String {
        QueueNames::new(&self.amqp, BILLING).main
    }

    /// Waits until the billing queue has delivered every id of `ids`
    /// (and perhaps duplicates); returns the deliveries.
    async fn delivered(&self, ids: &[Uuid]) -> Vec<lapin::message::Delivery> {
        let want: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
        let (_conn, channel) = amqp_channel().await;
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            got.extend(drain_queue(&channel, &self.billing_queue()).await);
            let seen: HashSet<String> = got.iter().map(message_id).collect();
            if want.is_subset(&seen) {
                return got;
            }
            let missing = want.difference(&seen).count();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{missing} events not delivered within {WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The session reading the slot, if one does.
    async fn reader(&self) -> Option<i32> {
        sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&self.slot)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Waits until the slot has confirmed everything written so far.
    async fn slot_caught_up(&self) {
        let pool = &self.db.pool;
        let now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(pool)
            .await
            .unwrap();
        eventually("the slot to confirm the writes", WITHIN, || async {
            let passed: Option<bool> = sqlx::query_scalar(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .bind(&now)
            .fetch_optional(pool)
            .await
            .unwrap()
            .flatten();
            passed.unwrap_or(false).then_some(())
        })
        .await;
    }
}

fn message_id(delivery: &lapin::message::Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .unwrap()
        .to_string()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn inserts_are_published_from_the_slot_and_the_rows_never_updated() {
    let wal = Wal::new().await;
    let relay = wal.start().await;
    let ids = insert_events(&wal.db.pool, 120, "order.created").await;

    let deliveries = wal.delivered(&ids).await;
    wal.slot_caught_up().await;

    // As the polling relay publishes them: id, type, persistence, place.
    let first = &deliveries[0];
    assert_eq!(
        first.properties.kind().as_ref().unwrap().as_str(),
        "order.created"
    );
    assert_eq!(*first.properties.delivery_mode(), Some(2));
    assert_eq!(
        first.properties.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    let headers = first.properties.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get(SEQUENCE_HEADER),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert!(headers.contains_key(WRITTEN_AT_HEADER));
    // No claim, no mark: no row was ever locked or updated (xmax 0), and
    // each is the WAL relay's by its default.
    let pool = &wal.db.pool;
    assert_eq!(
        count(pool, "SELECT count(*) FROM outbox WHERE xmax <> 0").await,
        0
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM outbox WHERE published_at = 'infinity'"
        )
        .await,
        120
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_restart_goes_on_from_the_confirmed_position_and_loses_nothing() {
    let wal = Wal::new().await;
    let relay = wal.start().await;
    let first = insert_events(&wal.db.pool, 30, "order.created").await;
    wal.delivered(&first).await;
    wal.slot_caught_up().await;
    relay.stop().await;

    // Written while no relay reads the slot: kept in the WAL for it.
    let second = insert_events(&wal.db.pool, 30, "order.created").await;
    let relay = wal.start().await;
    let deliveries = wal.delivered(&second).await;
    wal.slot_caught_up().await;
    let again: HashSet<String> = first.iter().map(Uuid::to_string).collect();
    assert!(
        deliveries.iter().all(|d| !again.contains(&message_id(d))),
        "what the slot confirmed is not sent again"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_row_the_broker_refuses_goes_to_the_polling_relay_and_the_slot_goes_on() {
    let wal = Wal::new().await;
    let relay = wal.start().await;
    // No queue is bound to this type: the broker returns it.
    let refused = insert_events(&wal.db.pool, 1, "order.unrouted").await;
    let after = insert_events(&wal.db.pool, 10, "order.created").await;

    wal.delivered(&after).await;
    wal.slot_caught_up().await;
    let pool = &wal.db.pool;
    eventually("the refused row to be handed over", WITHIN, || async {
        let (published_at, attempts, error): (Option<String>, i32, Option<String>) =
            sqlx::query_as(
                "SELECT published_at::text, attempts, last_error FROM outbox \
                 WHERE transaction_id = $1",
            )
            .bind(refused[0])
            .fetch_one(pool)
            .await
            .unwrap();
        let handed = published_at.is_none()
            && attempts >= 1
            && error.is_some_and(|e| e.contains("returned"));
        handed.then_some(())
    })
    .await;
    relay.stop().await;
}

#[tokio::test]
async fn a_second_wal_relay_waits_and_takes_over_when_the_first_stops() {
    let wal = Wal::new().await;
    let first = wal.start().await;
    let ids = insert_events(&wal.db.pool, 10, "order.created").await;
    wal.delivered(&ids).await;
    let reader = wal.reader().await;
    assert!(reader.is_some());
    let second = wal.start().await;
    let more = insert_events(&wal.db.pool, 10, "order.created").await;
    wal.delivered(&more).await;
    assert_eq!(
        wal.reader().await,
        reader,
        "the first relay still reads the slot"
    );

    first.stop().await;
    let later = insert_events(&wal.db.pool, 10, "order.created").await;
    wal.delivered(&later).await;
    wal.slot_caught_up().await;
    let now = wal.reader().await;
    assert!(now.is_some() && now != reader, "the second relay took over");
    second.stop().await;
}

#[tokio::test]
async fn an_idle_outbox_lets_the_slot_advance() {
    let wal = Wal::new().await;
    let relay = wal.start().await;
    let pool = &wal.db.pool;
    // WAL written by other tables only: the keepalive position is acknowledged.
    sqlx::query("CREATE TABLE unrelated (n int)")
        .execute(pool)
        .await
        .unwrap();
    for _ in 0..5 {
        sqlx::query("INSERT INTO unrelated SELECT generate_series(1, 1000)")
            .execute(pool)
            .await
            .unwrap();
    }
    wal.slot_caught_up().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_lost_slot_hands_the_rows_it_had_not_passed_to_the_polling_relay() {
    let wal = Wal::new().await;
    let relay = wal.start().await;
    let ids = insert_events(&wal.db.pool, 5, "order.created").await;
    wal.delivered(&ids).await;
    wal.slot_caught_up().await;
    relay.stop().await;
    let pool = &wal.db.pool;
    // A failover to a Postgres 15 standby: the slot is gone, the default stays.
    eventually("the walsender to let go of the slot", WITHIN, || async {
        wal.reader().await.is_none().then_some(())
    })
    .await;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&wal.slot)
        .execute(pool)
        .await
        .unwrap();
    let orphans = insert_events(pool, 4, "order.created").await;

    let setup = wal.wal_relay().setup().await.unwrap();

    assert!(setup.created_slot);
    let handed: Vec<Uuid> = sqlx::query_scalar(
        "SELECT transaction_id FROM outbox WHERE published_at IS NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for id in &orphans {
        assert!(
            handed.contains(id),
            "{id} written without a slot is handed over"
        );
    }
    assert_eq!(setup.handed_back as usize, handed.len());
}

#[tokio::test]
async fn retention_deletes_only_rows_a_passed_horizon_covers() {
    let wal = Wal::new().await;
    let pool = &wal.db.pool;
    let prune = outbox::wal::horizons::prune(EVENTS.name(), Duration::ZERO);
    let relay = wal.start().await;
    let ids = insert_events(pool, 20, "order.created").await;
    wal.delivered(&ids).await;
    wal.slot_caught_up().await;
    // Transactions of other tests, in other databases, hold back a
    // horizon's oldest transaction: wait for one that covers all 20 rows.
    eventually("a passed horizon that covers the rows", WITHIN, || async {
        let covered = count(
            pool,
            "SELECT count(*) FROM outbox o, (SELECT max_id, oldest_xid FROM outbox_wal_horizons \
               WHERE passed ORDER BY taken_at DESC LIMIT 1) h \
             WHERE o.id <= h.max_id AND age(o.xmin) > age(xid(h.oldest_xid))",
        )
        .await;
        (covered == 20).then_some(())
    })
    .await;
    relay.stop().await;
    let later = insert_events(pool, 3, "order.created").await;

    let deleted = prune.run_once(pool).await.unwrap();

    assert_eq!(deleted, 20);
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT transaction_id FROM outbox ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(
        left, later,
        "rows written after the last passed horizon stay"
    );
}
