//! The operator's view of the aggregates a handler in sequence holds back
//! ([`crate::Handler::in_sequence`]): which wait, for what, since when; and the
//! explicit skip of the event one waits for (one in the dead-letter queue
//! that will not be replayed, say).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// An aggregate whose later events wait for an earlier one.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct HeldAggregate {
    /// The kind of aggregate.
    pub aggregate_type: String,
    /// Which one.
    pub aggregate_id: String,
    /// The events held.
    pub events: i64,
    /// When the oldest of them was held.
    pub oldest_held_at: DateTime<Utc>,
    /// The place of the event they wait for (the first of them waits for it).
    pub waiting_for: i64,
    /// The place of the last event applied.
    pub last_applied: i64,
}

/// `consumer`'s held aggregates, the longest waiting first, at most `limit`.
pub async fn list(pool: &PgPool, consumer: &str, limit: i64) -> sqlx::Result<Vec<HeldAggregate>> {
    sqlx::query_as(
        "SELECT h.aggregate_type, h.aggregate_id, count(*) AS events, \
           min(h.held_at) AS oldest_held_at, min(h.predecessor) AS waiting_for, \
           coalesce(max(a.last_seq), 0) AS last_applied \
         FROM inbox_held h LEFT JOIN inbox_aggregates a USING (consumer, aggregate_type, aggregate_id) \
         WHERE h.consumer = $1 GROUP BY h.aggregate_type, h.aggregate_id \
         ORDER BY min(h.held_at) LIMIT $2",
    )
    .bind(consumer)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Lets an aggregate go on without the event it waits for: its place is
/// set to that event's, so the consumer releases the held events within a
/// second, as if it had been applied. Returns the place skipped to, or
/// `None` when the aggregate holds nothing. The skipped event, if it is
/// in the dead-letter queue, stays there: replayed later, it would be
/// applied after its successors.
pub async fn skip(
    pool: &PgPool,
    consumer: &str,
    aggregate_type: &str,
    aggregate_id: &str,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "UPDATE inbox_aggregates AS a SET last_seq = greatest(a.last_seq, w.waiting_for), \
           updated_at = now() \
         FROM (SELECT min(predecessor) AS waiting_for FROM inbox_held \
               WHERE consumer = $1 AND aggregate_type = $2 AND aggregate_id = $3) AS w \
         WHERE a.consumer = $1 AND a.aggregate_type = $2 AND a.aggregate_id = $3 \
           AND w.waiting_for IS NOT NULL \
         RETURNING a.last_seq",
    )
    .bind(consumer)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(pool)
    .await
}
