//! The rows of an outbox table: one to write, one claimed, and what the
//! status and failure reports read.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An event to be written in the same transaction as the change it describes.
#[derive(Debug, Clone)]
pub struct NewOutboxEvent {
    /// Unique id of this event; becomes the AMQP `message_id` and the
    /// consumers' dedup key (or, for another sink, the id it deduplicates on).
    pub transaction_id: Uuid,
    /// The kind of thing the event is about (`customer`, say).
    pub aggregate_type: &'static str,
    /// Which one.
    pub aggregate_id: String,
    /// Also the routing key and the AMQP `type`.
    pub event_type: &'static str,
    /// The message body.
    pub payload: serde_json::Value,
    /// W3C trace context of the writer (`traceparent`, `tracestate`).
    pub headers: serde_json::Value,
}

/// A claimed row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    /// The row's key.
    pub id: i64,
    /// The event's id (the AMQP `message_id`).
    pub transaction_id: Uuid,
    /// The kind of thing the event is about.
    pub aggregate_type: String,
    /// Which one.
    pub aggregate_id: String,
    /// The routing key.
    pub event_type: String,
    /// The body, as JSON text: published as it is, never re-parsed.
    pub payload: String,
    /// The writer's trace context.
    pub headers: serde_json::Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Failed publishes so far.
    pub attempts: i32,
    /// Its place in its aggregate's history, in a table with sequences.
    pub seq: Option<i64>,
    /// For each event type, the place of the latest earlier event of that
    /// type in the aggregate (`{}` for the first).
    pub previous: Option<serde_json::Value>,
}

/// What an `outbox status` command and the metrics report. Reads only
/// unpublished rows (the partial index), so it stays cheap as the table grows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct OutboxStatus {
    /// Rows still to publish (not given up on).
    pub pending: i64,
    /// The age of the oldest of them, in seconds: the lag.
    pub oldest_pending_age_secs: Option<f64>,
    /// Unpublished rows with an error.
    pub with_errors: i64,
    /// Rows given up on after a permanent refusal: an operator's to look at.
    pub given_up: i64,
}

/// Recent failures, newest first.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct FailedRow {
    /// The row's key.
    pub id: i64,
    /// The event's id.
    pub transaction_id: Uuid,
    /// Its routing key.
    pub event_type: String,
    /// Failed publishes so far.
    pub attempts: i32,
    /// The last failure.
    pub last_error: String,
    /// `None` once given up on (never due again).
    pub next_attempt_at: Option<DateTime<Utc>>,
}
