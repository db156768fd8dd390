//! Idempotent RabbitMQ consumers on Postgres. A [`Consumer`] takes the
//! deliveries of one queue and, for each batch, in ONE Postgres
//! transaction: inserts their `(consumer, transaction_id)` rows into
//! `processed_messages` (`ON CONFLICT DO NOTHING`), runs your [`Handler`] on
//! the events that were new, commits; then acks each. A redelivered or
//! republished event finds its row and is acked without effect. A refused
//! event is retried through delay queues, then dead-lettered; an outage
//! (Postgres, the broker, something the handler needs) leaves the
//! deliveries for redelivery; nothing is dropped. The crate never names a
//! domain's types: the domain plugs in its handlers.
//!
//! A handler crediting loyalty points, and its consumer run until Ctrl-C
//! (the `processed_messages` table comes from [`schema::SQL`], applied by
//! the service's migrations):
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use inbox::{Consumer, ConsumerConfig, Event, Handler, HandlerError, Subscription};
//! use outbox_common::amqp::AmqpConfig;
//! use sqlx::PgConnection;
//! use tokio_util::sync::CancellationToken;
//!
//! /// Points a member earned, as the publisher serialises them.
//! #[derive(Debug, Clone, serde::Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct PointsEarned {
//!     member_id: String,
//!     points: i64,
//! }
//!
//! /// Credits each member's balance, once per event.
//! struct Balances;
//!
//! impl Handler for Balances {
//!     type Event = PointsEarned;
//!
//!     fn subscription(&self) -> Subscription {
//!         Subscription {
//!             consumer: "points_balance",
//!             routing_keys: &["points.earned"],
//!         }
//!     }
//!
//!     async fn handle(
//!         &self,
//!         tx: &mut PgConnection,
//!         events: &[Event<PointsEarned>],
//!     ) -> Result<(), HandlerError> {
//!         for event in events {
//!             if event.body.points <= 0 {
//!                 // Retried, then dead-lettered: no retry will make it valid.
//!                 return Err(HandlerError::refused(format!(
//!                     "{} points for {}",
//!                     event.body.points, event.body.member_id
//!                 )));
//!             }
//!             // A constraint violation refuses the events; any other
//!             // Postgres error is an outage (`From<sqlx::Error>`).
//!             sqlx::query(
//!                 "INSERT INTO balances (member_id, points) VALUES ($1, $2) \
//!                  ON CONFLICT (member_id) DO UPDATE SET points = balances.points + $2",
//!             )
//!             .bind(&event.body.member_id)
//!             .bind(event.body.points)
//!             .execute(&mut *tx)
//!             .await?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), sqlx::Error> {
//!     let pool = sqlx::PgPool::connect("postgres://postgres@localhost/loyalty").await?;
//!     let amqp = AmqpConfig::new("amqp://guest:guest@localhost:5672/%2f")
//!         .with_exchange("loyalty_events");
//!     let consumer = Consumer::new(Balances, pool, amqp)
//!         .with_config(ConsumerConfig::default().with_batch_size(16));
//!
//!     let cancel = CancellationToken::new();
//!     let stop = cancel.clone();
//!     tokio::spawn(async move {
//!         let _ = tokio::signal::ctrl_c().await;
//!         stop.cancel();
//!     });
//!     // Reconnects on its own; returns once the deliveries in hand are
//!     // settled after the cancel.
//!     Arc::new(consumer).run(cancel).await;
//!     Ok(())
//! }
//! ```
//!
//! Also here: [`dlq`], to list and replay dead letters; [`dedup_prune`], to
//! keep the dedup table bounded; [`message`], to parse and publish messages
//! the way the consumers do; [`ConsumerFamilies`], the consumers' metrics.

#![warn(missing_docs)]

mod chain;
mod config;
pub mod dlq;
mod error;
mod follow;
mod handler;
mod held;
mod hold;
mod in_flight;
pub mod message;
mod metrics;
mod release;
pub mod schema;
mod sequence;
mod session;
mod settle;
mod transact;
pub mod waiting;

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
pub use sequence::{Sequence, topic_matches};
pub use settle::{Outcome, Settled};
pub use transact::{Applied, Results};

/// One consumer: a handler, its queues and its connections.
pub struct Consumer<H> {
    handler: Arc<H>,
    pool: PgPool,
    amqp: AmqpConfig,
    config: ConsumerConfig,
    queues: QueueNames,
    metrics: ConsumerMetrics,
    /// Signalled after a commit that handled new events, so a relay in this
    /// process sends the outbox rows a handler wrote at once.
    wakes: Vec<Wake>,
    /// True while a session is subscribed to the queue (for `/readyz`).
    subscribed: Flag,
    /// Held while a delivery is forwarded to a delay queue or the DLQ.
    forwarding: tokio::sync::Mutex<()>,
    /// Signalled after a commit moved on an aggregate some of whose held
    /// events did not follow in it: they may go now
    /// ([`Handler::in_sequence`]).
    release: tokio::sync::Notify,
    /// Those aggregates, as (type, id), for the next release to look at
    /// (only theirs: never a scan of every held event).
    to_release: std::sync::Mutex<Vec<(String, String)>>,
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
            release: tokio::sync::Notify::new(),
            to_release: std::sync::Mutex::default(),
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
///
/// ```
/// use std::time::Duration;
///
/// // Pruned in batches of 500 by the service's retention task.
/// let prune = inbox::dedup_prune("points_balance", Duration::from_secs(7 * 24 * 3600))
///     .with_batch(500);
/// # let _ = prune;
/// ```
pub fn dedup_prune(consumer: &'static str, retention: Duration) -> Prune {
    Prune::new(
        "dedup rows",
        // No sort: every expired row goes in the end, so any batch of them
        // will do, and the index scan bounds the work either way.
        SqlStr::from_static(
            "DELETE FROM processed_messages WHERE (consumer, transaction_id) IN ( \
             SELECT consumer, transaction_id FROM processed_messages \
             WHERE consumer = $3 AND processed_at < now() - make_interval(secs => $1) \
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        retention,
    )
    .with_key(consumer)
}

/// The pruning of `consumer`'s per-aggregate places ([`Handler::in_sequence`])
/// not written (moved on, or locked to hold an event) for `retention`,
/// unless the aggregate has held events: keep it to the dedup window. An aggregate pruned and written to again
/// starts afresh, its first event new having no predecessor to wait for.
pub fn sequence_prune(consumer: &'static str, retention: Duration) -> Prune {
    Prune::new(
        "per-aggregate places",
        SqlStr::from_static(
            "DELETE FROM inbox_aggregates AS a WHERE (consumer, aggregate_type, aggregate_id) IN ( \
             SELECT consumer, aggregate_type, aggregate_id FROM inbox_aggregates \
             WHERE consumer = $3 AND updated_at < now() - make_interval(secs => $1) \
             LIMIT $2 FOR UPDATE SKIP LOCKED) \
             AND NOT EXISTS (SELECT 1 FROM inbox_held h WHERE h.consumer = a.consumer \
               AND h.aggregate_type = a.aggregate_type AND h.aggregate_id = a.aggregate_id)",
        ),
        retention,
    )
    .with_key(consumer)
}
