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
//! - [`api`]: the HTTP API (axum). Writes an order and its outbox row in one
//!   transaction and answers 202; never talks to RabbitMQ.
//! - [`outbox`]: the outbox table, the relay that moves rows to RabbitMQ with
//!   publisher confirms, and its status/pruning.
//! - [`consumer`]: the idempotent consumer framework and the two consumers,
//!   with retry queues, dead letters and replay.
//! - [`amqp`]: connections and the broker topology shared by relay and consumers.
//! - [`telemetry`]: logs, OpenTelemetry tracing and W3C context propagation.
//! - [`cli`]: the roles (`run`, `api`, `relay`, `consume`, `migrate`, `dlq`, `outbox`).

pub mod amqp;
pub mod api;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod db;
pub mod metrics;
pub mod orders;
pub mod outbox;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
