//! What the [`outbox`](https://docs.rs/outbox) and `inbox` crates share, and
//! what a service built on them uses to wire them: nothing here names a
//! domain.
//!
//! - [`amqp`]: RabbitMQ settings ([`amqp::AmqpConfig`]), connections over
//!   rustls to one node or a cluster, the topology (an exchange, and per
//!   consumer its queue, delay queues and dead-letter queue) and the header
//!   names of the messages.
//! - [`shutdown`]: backoff, waiting for a dependency, retry loops and
//!   cancellation.
//! - [`sqlstate`]: what a Postgres error means for the work that met it.
//! - [`propagation`]: W3C trace context in outbox rows and AMQP headers.
//! - [`wake`]: LISTEN/NOTIFY wake-ups between writers and relays.
//! - [`prune`]: bounded tables, pruned in small batches.
//! - [`status`]: the flags `/healthz` and `/readyz` read.
//! - [`secret`], [`tls`], [`metrics`]: URLs that never print their
//!   password, the one TLS stack (rustls with ring), histogram buckets.
//!
//! ```
//! use std::time::Duration;
//! use outbox_common::amqp::{AmqpConfig, QueueNames};
//!
//! let amqp = AmqpConfig::new("amqp://guest:guest@localhost:5672/%2f")
//!     .with_exchange("loyalty_events")
//!     .with_queue_prefix("test_")
//!     .with_retry_delays(vec![Duration::from_secs(1)]);
//! let queues = QueueNames::new(&amqp, "points_service");
//! assert_eq!(queues.main, "test_points_service");
//! assert_eq!(queues.dlq, "test_points_service.dlq");
//! ```

#![warn(missing_docs)]

pub mod amqp;
pub mod metrics;
pub mod propagation;
pub mod prune;
pub mod secret;
pub mod shutdown;
pub mod sqlstate;
pub mod status;
pub mod tls;
pub mod wake;
