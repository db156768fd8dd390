//! The writer: an award and its `points.awarded` event, committed together
//! or not at all. The relay publishes the event later, at least once, under
//! the award's id as its AMQP `message_id`.

use std::sync::LazyLock;

use outbox::{NewOutboxEvent, Table};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// The event type, also its routing key.
pub const POINTS_AWARDED: &str = "points.awarded";

/// The name of the service's outbox table.
pub const OUTBOX_TABLE: &str = "loyalty_outbox";

/// The service's outbox table and its statements, built once.
pub static OUTBOX: LazyLock<Table> = LazyLock::new(|| Table::named(OUTBOX_TABLE));

/// The body of a `points.awarded` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PointsAwarded {
    /// The award's id: also the event's `transaction_id`, hence the AMQP
    /// `message_id` and the consumers' dedup key.
    pub award_id: Uuid,
    /// Whose balance it credits.
    pub user_id: String,
    /// How many points; the writer records any number, the consumer
    /// refuses a negative one.
    pub points: i64,
}

/// Records an award of `points` to `user_id` and its event on `tx`, the
/// caller's transaction: both commit with it, or neither does. After the
/// commit, wake the relay ([`crate::Service::award`] does both).
pub async fn award(
    tx: &mut PgConnection,
    user_id: &str,
    points: i64,
) -> Result<PointsAwarded, sqlx::Error> {
    let award = PointsAwarded {
        award_id: Uuid::now_v7(),
        user_id: user_id.to_owned(),
        points,
    };
    sqlx::query("INSERT INTO awards (award_id, user_id, points) VALUES ($1, $2, $3)")
        .bind(award.award_id)
        .bind(&award.user_id)
        .bind(award.points)
        .execute(&mut *tx)
        .await?;
    OUTBOX.insert(tx, &event(&award)).await?;
    Ok(award)
}

/// The outbox row of `award`.
fn event(award: &PointsAwarded) -> NewOutboxEvent {
    NewOutboxEvent {
        transaction_id: award.award_id,
        aggregate_type: "loyalty_account",
        aggregate_id: award.user_id.clone(),
        event_type: POINTS_AWARDED,
        // Plain fields and string keys: serializing cannot fail.
        payload: serde_json::to_value(award).expect("an award serializes"),
        // No trace context: this example does not set up tracing.
        headers: serde_json::json!({}),
    }
}
