//! The consumer: credits balances from `points.awarded` events, inside the
//! inbox's dedup transaction.

use inbox::{Event, Handler, HandlerError};
use outbox_common::amqp::Subscription;
use sqlx::PgConnection;

use crate::awards::{POINTS_AWARDED, PointsAwarded};

/// The balances consumer: its name (the dedup key and the base of its
/// queues' names) and the event types its queue is bound to.
pub const BALANCES: Subscription = Subscription {
    consumer: "loyalty_balances",
    routing_keys: &[POINTS_AWARDED],
};

/// Credits each award to its user's balance. The inbox runs it only on
/// events this consumer has not committed before, in the transaction that
/// records them as seen: a redelivery is acked without reaching it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Balances;

impl Handler for Balances {
    type Event = PointsAwarded;

    fn subscription(&self) -> Subscription {
        BALANCES
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
            credit(tx, &event.body).await?;
        }
        Ok(())
    }
}

/// Credits one award on `tx`. An award never debits: a negative one is
/// refused, which the inbox retries through the delay queues (a rule that
/// may change meanwhile) and then dead-letters for an operator.
pub async fn credit(tx: &mut PgConnection, award: &PointsAwarded) -> Result<(), HandlerError> {
    if award.points < 0 {
        return Err(HandlerError::refused(format!(
            "award {} of {} points to {}: an award cannot debit a balance",
            award.award_id, award.points, award.user_id
        )));
    }
    // A `?` on a sqlx error: a constraint refuses the event, anything else
    // is an outage that leaves it in its queue.
    sqlx::query(
        "INSERT INTO balances (user_id, points) VALUES ($1, $2) \
         ON CONFLICT (user_id) DO UPDATE \
         SET points = balances.points + excluded.points, updated_at = now()",
    )
    .bind(&award.user_id)
    .bind(award.points)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
