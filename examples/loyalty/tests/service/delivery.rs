//! Awards through the relay and the consumer: published, credited once
//! under a duplicate delivery, retried after a refusal, dead-lettered when
//! refused to the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use inbox::{Event, Handler, HandlerError, dlq};
use loyalty_example::demo::republish;
use loyalty_example::{BALANCES, Balances, POINTS_AWARDED, PointsAwarded};
use outbox_common::amqp::Subscription;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fixture::{TestService, eventually};

#[tokio::test]
async fn awards_are_published_to_the_services_exchange_and_credited() {
    let t = TestService::new().await;
    let running = t.service.start(Balances);

    let first = t.service.award("alice", 10).await.unwrap();
    let second = t.service.award("alice", 5).await.unwrap();
    let third = t.service.award("bob", 3).await.unwrap();
    eventually("the three awards to be credited", || async {
        (running.metrics().processed.get() == 3).then_some(())
    })
    .await;
    t.all_published().await;

    assert_eq!(t.balance("alice").await, Some(15));
    assert_eq!(t.balance("bob").await, Some(3));
    let mut expected = vec![first.award_id, second.award_id, third.award_id];
    expected.sort();
    assert_eq!(t.dedup_rows().await, expected, "one dedup row per award");
    assert_eq!(running.metrics().duplicates.get(), 0);
    t.stop(running).await;
}

#[tokio::test]
async fn an_award_delivered_twice_is_credited_once() {
    let t = TestService::new().await;
    let running = t.service.start(Balances);
    let award = t.service.award("alice", 10).await.unwrap();
    eventually("the award to be credited", || async {
        (running.metrics().processed.get() == 1).then_some(())
    })
    .await;
    t.all_published().await;

    // Published again under the same message id, as after a relay's crash
    // between the broker's confirm and its mark.
    republish(&t.service, award.award_id).await.unwrap();
    eventually("the copy to be recognised", || async {
        (running.metrics().duplicates.get() == 1).then_some(())
    })
    .await;
    t.all_published().await;

    assert_eq!(running.metrics().processed.get(), 1, "credited once");
    assert_eq!(t.balance("alice").await, Some(10));
    assert_eq!(t.dedup_rows().await, vec![award.award_id]);
    t.stop(running).await;
}

/// [`Balances`], refusing the first attempt of every award (a ledger busy
/// for a moment), and recording the attempts it is handed.
#[derive(Debug, Clone, Default)]
struct RefusesFirstAttempt {
    attempts: Arc<Mutex<HashMap<Uuid, Vec<u32>>>>,
}

impl Handler for RefusesFirstAttempt {
    type Event = PointsAwarded;

    fn subscription(&self) -> Subscription {
        BALANCES
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<PointsAwarded>],
    ) -> Result<(), HandlerError> {
        for event in events {
            let mut attempts = self.attempts.lock().unwrap();
            attempts.entry(event.id).or_default().push(event.attempt);
        }
        if events.iter().any(|e| e.attempt == 0) {
            return Err(HandlerError::refused("the ledger is busy"));
        }
        Balances.handle(tx, events).await
    }
}

#[tokio::test]
async fn an_award_refused_on_its_first_attempt_is_retried_and_credited_once() {
    let t = TestService::new().await;
    let running = t.service.start(RefusesFirstAttempt::default());
    let award = t.service.award("alice", 10).await.unwrap();
    eventually("the award to be credited", || async {
        (running.metrics().processed.get() == 1).then_some(())
    })
    .await;

    let metrics = running.metrics();
    assert_eq!(metrics.retried.get(), 1, "one trip through a delay queue");
    assert_eq!(metrics.dead_lettered.get(), 0);
    let attempts = running.handler().attempts.lock().unwrap()[&award.award_id].clone();
    // Refused at attempt 0 (in a batch, perhaps, then alone), applied at 1.
    assert_eq!(attempts.last(), Some(&1), "{attempts:?}");
    assert!(
        attempts[..attempts.len() - 1].iter().all(|a| *a == 0),
        "{attempts:?}"
    );
    assert_eq!(
        t.balance("alice").await,
        Some(10),
        "the refusal left nothing"
    );
    t.stop(running).await;
}

#[tokio::test]
async fn a_negative_award_is_dead_lettered_after_the_retries_and_listed() {
    let t = TestService::new().await;
    let running = t.service.start(Balances);
    let refused = t.service.award("carol", -40).await.unwrap();
    let other = t.service.award("dave", 3).await.unwrap();
    eventually("the negative award to be dead-lettered", || async {
        let m = running.metrics();
        (m.dead_lettered.get() == 1 && m.processed.get() == 1).then_some(())
    })
    .await;

    let retries = t.service.amqp().retry_delays().len();
    assert_eq!(running.metrics().retried.get(), retries as u64);
    let cancel = CancellationToken::new();
    let letters = dlq::list_until(t.service.amqp(), &t.service.queues(), 10, &cancel)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.message_id, refused.award_id.to_string());
    assert_eq!(letter.event_type, POINTS_AWARDED);
    assert_eq!(
        letter.attempts,
        retries as u32 + 1,
        "the first try and each retry"
    );
    assert!(letter.error.contains("cannot debit"), "{}", letter.error);
    assert_eq!(t.balance("carol").await, None);
    assert_eq!(t.balance("dave").await, Some(3));
    assert_eq!(t.dedup_rows().await, vec![other.award_id]);
    t.stop(running).await;
}
