//! The dispatcher of an outbox into another sink (the mailer's engine), in
//! aggregate order: one aggregate's rows are handed over one at a time, in
//! their order, whatever fails in between; other aggregates go on.

use std::sync::{Arc, Mutex};

use order_service::orders::mailer::MAILS;
use outbox::{Dispatcher, NewOutboxEvent, OutboxRow, Sink, SinkError};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::TestDb;

/// Accepts every row but refuses `flaky`'s first attempt, and records the
/// `(aggregate, event type)` of what it accepted, in order.
#[derive(Clone, Default)]
struct Recorder {
    accepted: Arc<Mutex<Vec<(String, String)>>>,
    flaky: Arc<Mutex<Option<Uuid>>>,
}

impl Sink for Recorder {
    async fn deliver(&self, row: &OutboxRow) -> Result<(), SinkError> {
        if self
            .flaky
            .lock()
            .unwrap()
            .take_if(|id| *id == row.transaction_id)
            .is_some()
        {
            return Err(SinkError::Temporary("421 try again later".into()));
        }
        let entry = (row.aggregate_id.clone(), row.event_type.clone());
        self.accepted.lock().unwrap().push(entry);
        Ok(())
    }
}

fn mail(aggregate_id: &str, event_type: &'static str) -> NewOutboxEvent {
    NewOutboxEvent {
        transaction_id: Uuid::new_v4(),
        aggregate_type: "order",
        aggregate_id: aggregate_id.to_owned(),
        event_type,
        payload: json!({"to": "a@example.com", "subject": event_type, "body": ""}),
        headers: json!({}),
    }
}

#[tokio::test]
async fn one_aggregates_rows_are_handed_over_in_order_even_after_a_temporary_failure() {
    let db = TestDb::new().await;
    let rows = [
        mail("A", "first"),
        mail("B", "first"),
        mail("A", "second"),
        mail("B", "second"),
        mail("A", "third"),
    ];
    let mut tx = db.pool.begin().await.unwrap();
    MAILS.insert_many(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
    let sink = Recorder::default();
    *sink.flaky.lock().unwrap() = Some(rows[0].transaction_id);
    let dispatcher =
        Dispatcher::new(db.pool.clone(), MAILS.clone(), sink.clone()).in_sequence_per_aggregate();

    // A's first row fails and waits for its backoff; B goes on, A waits.
    let mut rounds = Vec::new();
    for _ in 0..3 {
        rounds.push(dispatcher.run_once().await.unwrap());
    }
    let accepted = sink.accepted.lock().unwrap().clone();
    assert_eq!(
        accepted,
        vec![("B".into(), "first".into()), ("B".into(), "second".into())],
        "{rounds:?}"
    );
    // Its backoff over, A's rows go, in their order.
    sqlx::query("UPDATE mail_outbox SET next_attempt_at = now() WHERE published_at IS NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    while dispatcher.run_once().await.unwrap().claimed > 0 {}
    let of_a: Vec<String> = sink
        .accepted
        .lock()
        .unwrap()
        .iter()
        .filter(|(aggregate, _)| aggregate == "A")
        .map(|(_, event)| event.clone())
        .collect();
    assert_eq!(of_a, ["first", "second", "third"]);
    db.cleanup().await;
}

#[tokio::test]
async fn different_aggregates_are_claimed_in_one_round() {
    let db = TestDb::new().await;
    let rows: Vec<_> = (0..6).map(|i| mail(&format!("agg-{i}"), "first")).collect();
    let mut tx = db.pool.begin().await.unwrap();
    MAILS.insert_many(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
    let sink = Recorder::default();
    let dispatcher = Dispatcher::new(db.pool.clone(), MAILS.clone(), sink.clone())
        .with_concurrency(8)
        .in_sequence_per_aggregate();

    let round = dispatcher.run_once().await.unwrap();

    assert_eq!((round.claimed, round.delivered), (6, 6));
    db.cleanup().await;
}
