//! The inbox: an idempotent-consumer framework, generic over the event type.
//! For each batch of deliveries, in ONE Postgres transaction: insert their
//! `(consumer, transaction_id)` rows into `processed_messages`
//! (`ON CONFLICT DO NOTHING`), run the [`Handler`] on the events that were
//! new, commit; then ack each. A refused event is retried through delay
//! queues, then dead-lettered; an outage leaves the deliveries for
//! redelivery; nothing is dropped. It never names a domain's types: the
//! domain plugs in its handlers.
//!
//! - [`handler`]: the [`Handler`] trait, [`Event`] and [`HandlerError`].
//! - [`transact`]: the dedup transaction.
//! - [`settle`]: ack, retry or dead-letter each delivery by its result.
//! - [`session`]: the consume loop, with reconnects and shutdown.
//! - [`message`]: parsing deliveries, forwarding them, their spans.
//! - [`dlq`]: listing and replaying dead letters.

pub mod dlq;
pub mod handler;
pub mod message;
pub mod session;
pub mod settle;
pub mod transact;

use std::sync::Arc;

use sqlx::PgPool;

use crate::amqp::QueueNames;
use crate::config::{AmqpConfig, ConsumerConfig};
use crate::metrics::{ConsumerMetrics, Metrics};
use crate::outbox::Wake;
use crate::probe::Flag;
pub use handler::{Event, Handler, HandlerError};
pub use settle::Outcome;
pub use transact::Applied;

/// An infrastructure failure while handling deliveries (Postgres, the
/// broker, a handler's outage): the deliveries are left for redelivery
/// without using up an attempt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InboxError {
    #[error("outage: {0}")]
    Outage(String),
    #[error("broker: {0}")]
    Broker(String),
}

impl InboxError {
    fn database(error: sqlx::Error) -> Self {
        Self::Outage(format!("database: {error}"))
    }

    fn broker(error: anyhow::Error) -> Self {
        Self::Broker(format!("{error:#}"))
    }
}

/// One consumer: a handler, its queues and its connections.
pub struct Consumer<H> {
    pub handler: Arc<H>,
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    pub config: ConsumerConfig,
    pub queues: QueueNames,
    pub metrics: Arc<ConsumerMetrics>,
    /// Signalled after a commit that handled new events, so a relay (or a
    /// mailer) in this process sends the outbox rows a handler wrote at once.
    pub wakes: Vec<Wake>,
    /// True while a session is subscribed to the queue (for `/readyz`).
    pub subscribed: Flag,
    /// Held while a delivery is forwarded to a delay queue or the DLQ.
    forwarding: tokio::sync::Mutex<()>,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        handler: H,
        pool: PgPool,
        amqp: AmqpConfig,
        config: ConsumerConfig,
        metrics: &Metrics,
    ) -> Self {
        let queues = QueueNames::new(&amqp, handler.subscription().consumer);
        Self {
            metrics: metrics.consumer(&queues.main),
            handler: Arc::new(handler),
            pool,
            amqp,
            config,
            queues,
            wakes: Vec::new(),
            subscribed: Flag::default(),
            forwarding: tokio::sync::Mutex::new(()),
        }
    }

    /// Wakes `wake` (too) after each commit that handled new events.
    pub fn with_wake(mut self, wake: Wake) -> Self {
        self.wakes.push(wake);
        self
    }

    /// Reports the subscription through `flag`.
    pub fn with_subscribed(mut self, flag: Flag) -> Self {
        self.subscribed = flag;
        self
    }

    /// The consumer's name: its dedup key.
    pub fn name(&self) -> &'static str {
        self.handler.subscription().consumer
    }
}
