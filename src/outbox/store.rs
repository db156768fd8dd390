//! Writing and reading outbox rows. Writers take `&mut PgConnection` so the
//! caller's transaction covers the business row and its outbox row together.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::confirms::Failed;

/// An event to be written in the same transaction as the change it describes.
#[derive(Debug, Clone)]
pub struct NewOutboxEvent {
    /// Unique id of this event; becomes the AMQP `message_id` and the
    /// consumers' dedup key.
    pub transaction_id: Uuid,
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    /// Also the routing key and the AMQP `type`.
    pub event_type: &'static str,
    pub payload: serde_json::Value,
    /// W3C trace context of the writer (`traceparent`, `tracestate`).
    pub headers: serde_json::Value,
}

/// Writes one outbox row on `conn` (the caller's transaction).
pub async fn insert(conn: &mut PgConnection, event: &NewOutboxEvent) -> sqlx::Result<()> {
    insert_many(conn, std::slice::from_ref(event)).await
}

/// Writes outbox rows on `conn`, in one statement: the caller's transaction
/// (a request's, or a consumer's dedup transaction) covers them together
/// with the change they describe.
pub async fn insert_many(conn: &mut PgConnection, events: &[NewOutboxEvent]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])",
    )
    .bind(events.iter().map(|e| e.transaction_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.aggregate_type).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.event_type).collect::<Vec<_>>())
    .bind(events.iter().map(|e| &e.payload).collect::<Vec<_>>())
    .bind(events.iter().map(|e| &e.headers).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// A row claimed by the relay.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub transaction_id: Uuid,
    pub event_type: String,
    /// The message body, as JSON text: published as it is, never re-parsed.
    pub payload: String,
    pub headers: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
}

/// Locks up to `limit` due rows, oldest first, skipping rows another relay
/// holds. The locks last until the caller's transaction ends.
pub async fn claim_due(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(
        "SELECT id, transaction_id, event_type, payload::text AS payload, headers, created_at, attempts \
         FROM outbox \
         WHERE published_at IS NULL AND next_attempt_at <= now() \
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

pub async fn mark_published(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "UPDATE outbox SET published_at = clock_timestamp(), last_error = NULL WHERE id = ANY($1)",
    )
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Records a failed attempt for each row, found by its `transaction_id`: its
/// message did not reach a queue. The row becomes due again (`published_at`
/// back to NULL, for a row its own batch had marked published before the
/// broker's return was matched to it), with `attempts + 1`, `last_error`, and
/// a retry time that grows with the attempts (1 s, 2 s, 4 s … capped at 5
/// minutes).
pub async fn mark_failed(conn: &mut PgConnection, failures: &[Failed]) -> sqlx::Result<u64> {
    if failures.is_empty() {
        return Ok(0);
    }
    let (transaction_ids, errors): (Vec<Uuid>, Vec<String>) = failures
        .iter()
        .map(|f| (f.transaction_id, f.error.to_string()))
        .unzip();
    let result = sqlx::query(
        "UPDATE outbox AS o SET published_at = NULL, attempts = o.attempts + 1, last_error = f.error, \
             next_attempt_at = now() + least(interval '1 second' * power(2, o.attempts), interval '5 minutes') \
         FROM unnest($1::uuid[], $2::text[]) AS f(transaction_id, error) \
         WHERE o.transaction_id = ANY($1) AND o.transaction_id = f.transaction_id",
    )
    .bind(&transaction_ids)
    .bind(&errors)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// What `order-service outbox status` and the metrics report. Reads only
/// unpublished rows (the partial index), so it stays cheap as the table grows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct OutboxStatus {
    pub pending: i64,
    pub oldest_pending_age_secs: Option<f64>,
    pub with_errors: i64,
}

pub async fn status(conn: &mut PgConnection) -> sqlx::Result<OutboxStatus> {
    sqlx::query_as(
        "SELECT count(*) AS pending, \
           extract(epoch FROM now() - min(created_at))::float8 AS oldest_pending_age_secs, \
           count(*) FILTER (WHERE last_error IS NOT NULL) AS with_errors \
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(conn)
    .await
}

/// Recent failures, newest first.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct FailedRow {
    pub id: i64,
    pub transaction_id: Uuid,
    pub event_type: String,
    pub attempts: i32,
    pub last_error: String,
    pub next_attempt_at: DateTime<Utc>,
}

pub async fn recent_failures(conn: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<FailedRow>> {
    sqlx::query_as(
        "SELECT id, transaction_id, event_type, attempts, last_error, next_attempt_at FROM outbox \
         WHERE published_at IS NULL AND last_error IS NOT NULL ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}
