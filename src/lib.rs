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
//! Generic machinery, which never names an order:
//! - [`outbox`]: outbox rows, the relay (publisher, confirm settlement,
//!   batch, scheduler) and the wake-up.
//! - [`inbox`]: the idempotent-consumer framework: dedup rows, batching,
//!   retries, DLQ, acks, and the [`inbox::Handler`] trait whose Rust code
//!   runs in the dedup transaction and may write outbox rows there.
//!
//! The domain, plugged into it:
//! - [`orders`]: validation, the `orders` table, the events
//!   (`order.created`, `order.confirmed`), the group-commit writer, and the
//!   billing and e-mail handlers.
//!
//! Around them: [`api`] (HTTP, axum), [`telemetry`] (logs, OpenTelemetry,
//! W3C propagation), [`cli`] and [`startup`] (the roles), and the small
//! shared modules [`config`], [`db`], [`amqp`], [`shutdown`], [`tls`], [`metrics`],
//! [`retention`] (pruning of the bounded tables), [`probe`] (every role's
//! `/healthz`, `/readyz`, `/metrics`).

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
