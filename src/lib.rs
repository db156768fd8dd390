//! order-service: the transactional outbox with idempotent consumers.
//!
//! ```text
//! client --POST /orders--> api ──one Postgres transaction──> orders + outbox
//!                                                               │ wake / poll
//!                                                   relay ──────┘ publish with confirms
//!                                     exchange order_events (topic)
//!                           ┌──────────────┴───────────────┐
//!             email_notification_service            billing_service
//!             (dedup row + side effect in one transaction, then ack;
//!              failures go through delay queues, then <queue>.dlq)
//! ```
//!
//! The generic machinery is in the workspace's library crates, which never
//! name an order and depend on nothing of this crate:
//! - [`outbox`] (`crates/outbox`): outbox tables, the relay (publisher,
//!   confirm settlement, batch, scheduler), other sinks, pruning.
//! - [`inbox`] (`crates/inbox`): the idempotent-consumer framework: dedup
//!   rows, batching, retries, DLQ, acks, and the [`inbox::Handler`] trait
//!   whose Rust code runs in the dedup transaction and may write outbox
//!   rows there.
//! - [`outbox_common`] (`crates/common`): what both share: RabbitMQ
//!   connections and topology, backoff, the SQLSTATE classifier, trace
//!   propagation, wake-ups, pruning, TLS.
//!
//! This crate is the order service, plugged into them:
//! - [`orders`]: validation, the `orders` table, the events
//!   (`order.created`, `order.confirmed`), the group-commit writer, and the
//!   billing and e-mail handlers.
//!
//! Around them: [`api`] (HTTP, axum), [`telemetry`] (logs, OpenTelemetry,
//! W3C propagation), [`cli`] and [`startup`] (the roles), and the small
//! service's modules [`config`], [`db`], [`metrics`] (one registry, in which
//! the crates register theirs), [`retention`] (what each role prunes),
//! [`probe`] (every role's `/healthz`, `/readyz`, `/metrics`).

pub mod api;
pub mod cli;
pub mod config;
pub mod db;
pub mod metrics;
pub mod orders;
pub mod probe;
pub mod retention;
pub mod startup;
pub mod telemetry;
