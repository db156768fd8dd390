//! Each event of a sequenced outbox carries its place in its aggregate's
//! history, given in the writing transaction: for one aggregate, the order
//! of the commits is the order of the numbers, even with writers at once.

use std::time::Duration;

use order_service::orders::EVENTS;
use outbox::NewOutboxEvent;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestDb, eventually};

fn event(aggregate_id: &str, event_type: &'static str) -> NewOutboxEvent {
    NewOutboxEvent {
        transaction_id: Uuid::new_v4(),
        aggregate_type: "cart",
        aggregate_id: aggregate_id.to_owned(),
        event_type,
        payload: json!({}),
        headers: json!({}),
    }
}

/// `(seq, previous)` of `aggregate_id`'s rows, in id order.
async fn numbers(pool: &PgPool, aggregate_id: &str) -> Vec<(i64, Value)> {
    sqlx::query_as(
        "SELECT seq, previous FROM outbox WHERE aggregate_type = 'cart' AND aggregate_id = $1 \
         ORDER BY id",
    )
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn events_are_numbered_with_the_latest_earlier_event_of_each_type() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let burst = ["a", "b", "a", "c", "b"].map(|t| event("c-1", t));
    EVENTS.insert_many(&mut tx, &burst).await.unwrap();
    EVENTS.insert(&mut tx, &event("c-2", "a")).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut tx, &event("c-1", "a")).await.unwrap();
    tx.commit().await.unwrap();

    assert_eq!(
        numbers(&db.pool, "c-1").await,
        vec![
            (1, json!({})),
            (2, json!({"a": 1})),
            (3, json!({"a": 1, "b": 2})),
            (4, json!({"a": 3, "b": 2})),
            (5, json!({"a": 3, "b": 2, "c": 4})),
            (6, json!({"a": 3, "b": 5, "c": 4})),
        ]
    );
    assert_eq!(numbers(&db.pool, "c-2").await, vec![(1, json!({}))]);
    db.cleanup().await;
}

/// Writes `event` in a transaction of its own, on a task: it waits while
/// another transaction holds the aggregate's lock.
fn second_writer(pool: &PgPool, event: NewOutboxEvent) -> tokio::task::JoinHandle<()> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        EVENTS.insert(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
    })
}

/// Waits until one session of the test's database waits on a lock: `who`.
async fn one_waits_on_a_lock(pool: &PgPool, who: &str) {
    let what = format!("{who} to wait on a lock");
    eventually(&what, Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .ok()?;
            (waiting == 1).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_second_writer_of_an_aggregate_waits_and_numbers_after_the_first_commits() {
    second_writer_waits(false).await;
}

/// The same for an aggregate opened as new: it has no counter, and both
/// writers go on from its latest row.
#[tokio::test]
async fn a_second_writer_of_an_aggregate_opened_as_new_waits_too() {
    second_writer_waits(true).await;
}

/// Two writers of one aggregate at once (after an opening row `o` when
/// `opened`): the second waits, and numbers after the first.
async fn second_writer_waits(opened: bool) {
    let db = TestDb::new().await;
    if opened {
        let mut tx = db.pool.begin().await.unwrap();
        EVENTS
            .insert_new_aggregates(&mut tx, &[event("c-1", "o")])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let mut first = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut first, &event("c-1", "a")).await.unwrap();
    let second = second_writer(&db.pool, event("c-1", "b"));
    // The second writer waits for the aggregate's lock.
    one_waits_on_a_lock(&db.pool, "the second writer").await;
    assert!(!second.is_finished(), "the second writer did not wait");
    first.commit().await.unwrap();
    second.await.unwrap();

    let want = if opened {
        vec![
            (1, json!({})),
            (2, json!({"o": 1})),
            (3, json!({"o": 1, "a": 2})),
        ]
    } else {
        vec![(1, json!({})), (2, json!({"a": 1}))]
    };
    assert_eq!(numbers(&db.pool, "c-1").await, want);
    db.cleanup().await;
}

#[tokio::test]
async fn a_writer_that_rolls_back_leaves_no_gap() {
    let db = TestDb::new().await;
    let mut first = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut first, &event("c-1", "a")).await.unwrap();
    let second = second_writer(&db.pool, event("c-1", "b"));
    first.rollback().await.unwrap();
    second.await.unwrap();

    assert_eq!(numbers(&db.pool, "c-1").await, vec![(1, json!({}))]);
    db.cleanup().await;
}

/// The counter rows of the versions before (`outbox_aggregates`), which no
/// writer writes now.
async fn counters(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_aggregates")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn new_aggregates_are_numbered_from_the_batch_and_later_writers_go_on_from_them() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let opening = [("c-1", "a"), ("c-2", "a"), ("c-1", "b")].map(|(id, t)| event(id, t));
    EVENTS
        .insert_new_aggregates(&mut tx, &opening)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut tx, &event("c-1", "a")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        numbers(&db.pool, "c-1").await,
        vec![
            (1, json!({})),
            (2, json!({"a": 1})),
            (3, json!({"a": 1, "b": 2})),
        ]
    );
    assert_eq!(numbers(&db.pool, "c-2").await, vec![(1, json!({}))]);
    assert_eq!(counters(&db.pool).await, 0, "a writer wrote a counter row");
    db.cleanup().await;
}

#[tokio::test]
async fn an_aggregate_with_rows_is_refused_as_new_and_nothing_is_written() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut tx, &event("c-1", "a")).await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let again = [event("c-2", "a"), event("c-1", "b")];
    let error = EVENTS
        .insert_new_aggregates(&mut tx, &again)
        .await
        .unwrap_err();
    drop(tx);
    let db_error = error.as_database_error().expect("a database error");
    assert!(db_error.is_unique_violation(), "{error}");
    assert_eq!(db_error.constraint(), Some("outbox_aggregate_seq_key"));
    assert_eq!(numbers(&db.pool, "c-1").await, vec![(1, json!({}))]);
    assert_eq!(numbers(&db.pool, "c-2").await, vec![]);
    db.cleanup().await;
}

/// A writer of its own statement ([`outbox::Table::insert_statement`]) that
/// skips [`outbox::Table::lock_aggregates`] while another writer of the
/// aggregate holds it: it numbers from what its snapshot saw, and the unique
/// index refuses its row once the other commits. Refused, never numbered
/// twice or out of commit order.
#[tokio::test]
async fn a_writer_that_skips_the_lock_is_refused_not_misnumbered() {
    let db = TestDb::new().await;
    let mut first = db.pool.begin().await.unwrap();
    EVENTS.insert(&mut first, &event("c-1", "a")).await.unwrap();
    let pool = db.pool.clone();
    let unlocked = tokio::spawn(async move {
        let events = [event("c-1", "b")];
        let sql = sqlx::AssertSqlSafe(EVENTS.insert_statement(1, ""));
        let insert = outbox::Table::bind_events(sqlx::query(sql), &events);
        let mut tx = pool.begin().await.unwrap();
        insert.execute(&mut *tx).await.map(drop)
    });
    // It waits on the unique index, for the first writer's entry.
    one_waits_on_a_lock(&db.pool, "the unlocked writer").await;
    first.commit().await.unwrap();

    let error = unlocked.await.unwrap().unwrap_err();
    let db_error = error.as_database_error().expect("a database error");
    assert!(db_error.is_unique_violation(), "{error}");
    assert_eq!(db_error.constraint(), Some("outbox_aggregate_seq_key"));
    assert_eq!(numbers(&db.pool, "c-1").await, vec![(1, json!({}))]);
    db.cleanup().await;
}
