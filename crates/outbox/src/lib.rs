//! The transactional outbox on Postgres, publishing to RabbitMQ.
//!
//! A service writes an event into an outbox [`Table`] in the same
//! transaction as the change it describes ([`Table::insert_many`] takes the
//! caller's `&mut PgConnection`), so the two commit together or not at all.
//! A [`Relay`] claims due rows (`FOR UPDATE SKIP LOCKED`, so several relays
//! share a table), publishes them to a topic exchange with publisher
//! confirms, many in flight, and marks each row by its own confirm: a row
//! is published at least once, under its `transaction_id` as the AMQP
//! `message_id`, which the `inbox` crate's consumers deduplicate on. A
//! refused row is retried with a growing backoff; a [`Wake`] (in process,
//! or a Postgres `NOTIFY` across processes) starts a batch within
//! milliseconds of a commit, a poll covers the rest. Published rows are
//! pruned after a retention ([`Table::prune`]).
//!
//! An outbox can also have another sink ([`Dispatcher`] with a [`Sink`]:
//! SMTP, say), with the same claims, attempts and backoff.
//!
//! The tables' SQL ships with the crate: see [`schema`].
//!
//! ```no_run
//! use outbox::{NewOutboxEvent, Relay, Table};
//! use outbox_common::amqp::AmqpConfig;
//! use sqlx::PgPool;
//!
//! # async fn example(pool: PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Table::named("outbox");
//!
//! // In the transaction that changes the aggregate:
//! let mut tx = pool.begin().await?;
//! // ... the service's own writes on &mut *tx ...
//! let event = NewOutboxEvent {
//!     transaction_id: uuid::Uuid::now_v7(),
//!     aggregate_type: "customer",
//!     aggregate_id: "42".into(),
//!     event_type: "points.earned",
//!     payload: serde_json::json!({ "customerId": 42, "points": 10 }),
//!     headers: serde_json::json!({}),
//! };
//! outbox.insert_many(&mut tx, &[event]).await?;
//! tx.commit().await?;
//!
//! // Elsewhere, the relay, until cancelled:
//! let amqp = AmqpConfig::new("amqp://guest:guest@localhost:5672/%2f")
//!     .with_exchange("loyalty_events");
//! let relay = Relay::new(pool, outbox, amqp);
//! relay.run(tokio_util::sync::CancellationToken::new()).await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod batch;
mod config;
pub mod confirms;
mod dispatch;
mod insert;
mod metrics;
mod publisher;
mod relay;
mod rows;
mod scheduler;
pub mod schema;
mod statements;
mod store;
pub mod wal;
mod write;

pub use batch::{BatchOutcome, PublishedBatch};
pub use config::RelayConfig;
pub use dispatch::{Delivered, Dispatcher, Sink, SinkError};
pub use metrics::{OutboxGauges, RelayMetrics};
pub use outbox_common::wake::{NOTIFY_CHANNEL, Wake, forward_wakes_as_notify};
pub use publisher::Publisher;
pub use relay::{Drained, PublisherError, Relay, RelayError};
pub use rows::{FailedRow, NewOutboxEvent, OutboxRow, OutboxStatus};
pub use store::Table;
