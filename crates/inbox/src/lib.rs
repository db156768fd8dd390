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

mod config;
pub mod dlq;
mod error;
mod handler;
pub mod message;
mod metrics;
pub mod schema;
mod session;
mod settle;
mod transact;

use std::sync::Arc;
use std::time::Duration;

use outbox_common::amqp::{AmqpConfig, QueueNames};
use outbox_common::prune::Prune;
use outbox_common::status::Flag;
use outbox_common::wake::Wake;
use sqlx::{PgPool, SqlStr};

pub use config::ConsumerConfig;
pub use error::InboxError;
pub use handler::{BoxError, Event, Handler, HandlerError};
pub use metrics::{ConsumerFamilies, ConsumerMetrics};
pub use outbox_common::amqp::Subscription;
pub use settle::Outcome;
pub use transact::Applied;

/// One consumer: a handler, its queues and its connections.
pub struct Consumer<H> {
    handler: Arc<H>,
    pool: PgPool,
    amqp: AmqpConfig,
    config: ConsumerConfig,
    queues: QueueNames,
    metrics: ConsumerMetrics,
    /// Signalled after a commit that handled new events, so a relay (or a
    /// mailer) in this process sends the outbox rows a handler wrote at once.
    wakes: Vec<Wake>,
    /// True while a session is subscribed to the queue (for `/readyz`).
    subscribed: Flag,
    /// Held while a delivery is forwarded to a delay queue or the DLQ.
    forwarding: tokio::sync::Mutex<()>,
}

impl<H: Handler> Consumer<H> {
    /// `handler`'s consumer of the queues `amqp` names for it, with the
    /// default [`ConsumerConfig`] and metrics registered nowhere.
    pub fn new(handler: H, pool: PgPool, amqp: AmqpConfig) -> Self {
        let queues = QueueNames::new(&amqp, handler.subscription().consumer);
        Self {
            metrics: ConsumerFamilies::default().consumer(&queues.main),
            handler: Arc::new(handler),
            pool,
            amqp,
            config: ConsumerConfig::default(),
            queues,
            wakes: Vec::new(),
            subscribed: Flag::default(),
            forwarding: tokio::sync::Mutex::new(()),
        }
    }

    /// How it takes deliveries.
    pub fn with_config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// Reports into `families`, under its main queue's name.
    pub fn with_metrics(mut self, families: &ConsumerFamilies) -> Self {
        self.metrics = families.consumer(&self.queues.main);
        self
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

    /// Its queues.
    pub fn queues(&self) -> &QueueNames {
        &self.queues
    }

    /// Its handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Its metrics.
    pub fn metrics(&self) -> &ConsumerMetrics {
        &self.metrics
    }
}

/// The pruning of `consumer`'s dedup rows older than `retention` (the
/// `processed_messages` index on `(consumer, processed_at)` keeps it a
/// range scan). A redelivery of a message older than that would be
/// applied again: keep it longer than any message can wait in a queue.
pub fn dedup_prune(consumer: &'static str, retention: Duration) -> Prune {
    Prune::new(
        "dedup rows",
        SqlStr::from_static(
            "DELETE FROM processed_messages WHERE (consumer, transaction_id) IN ( \
             SELECT consumer, transaction_id FROM processed_messages \
             WHERE consumer = $3 AND processed_at < now() - make_interval(secs => $1) \
             ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        retention,
    )
    .with_key(consumer)
}
