//! The wiring of the core for this service: a [`Relay`] of `loyalty_outbox`
//! to the service's exchange, a [`Consumer`] of the balances' queue, and
//! the pruning of both tables, all on one task tracker that stops on one
//! cancellation.

use std::sync::Arc;
use std::time::Duration;

use inbox::{Consumer, ConsumerConfig, ConsumerMetrics, Handler};
use outbox::{Relay, RelayConfig, Wake};
use outbox_common::amqp::{AmqpConfig, QueueNames};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::awards::{self, OUTBOX, PointsAwarded};
use crate::balances::BALANCES;

/// How long published outbox rows are kept.
const OUTBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long the consumer's dedup rows are kept: longer than any award can
/// wait in a queue (a redelivery after that would be credited again).
const DEDUP_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the pruning runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The loyalty service over one database and one broker.
#[derive(Debug, Clone)]
pub struct Service {
    pool: PgPool,
    amqp: AmqpConfig,
    /// Signalled after each commit that wrote outbox rows, so the relay in
    /// this process publishes them at once rather than at its next poll.
    wake: Wake,
}

impl Service {
    /// The service on `pool` (its tables created: see [`crate::schema`])
    /// and `amqp` (its exchange and queue prefix).
    pub fn new(pool: PgPool, amqp: AmqpConfig) -> Self {
        Self {
            pool,
            amqp,
            wake: Wake::default(),
        }
    }

    /// Its pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Its RabbitMQ settings.
    pub fn amqp(&self) -> &AmqpConfig {
        &self.amqp
    }

    /// The balances consumer's queues (main, delays, dead letters).
    pub fn queues(&self) -> QueueNames {
        QueueNames::new(&self.amqp, BALANCES.consumer)
    }

    /// Awards `points` to `user_id` in a transaction of its own, and wakes
    /// the relay once it is committed.
    pub async fn award(&self, user_id: &str, points: i64) -> Result<PointsAwarded, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let award = awards::award(&mut tx, user_id, points).await?;
        tx.commit().await?;
        self.wake.notify();
        Ok(award)
    }

    /// Wakes the relay, for a writer of outbox rows other than
    /// [`Service::award`].
    pub fn wake_relay(&self) {
        self.wake.notify();
    }

    /// The relay of `loyalty_outbox`. It declares the balances' queues
    /// before it publishes, so no award is published before its queue exists.
    pub fn relay(&self) -> Relay {
        let config = RelayConfig::default().with_poll_interval(Duration::from_millis(500));
        Relay::new(self.pool.clone(), OUTBOX.clone(), self.amqp.clone())
            .with_config(config)
            .with_wake(self.wake.clone())
            .with_subscriptions(vec![BALANCES])
    }

    /// A consumer running `handler` ([`crate::Balances`], or a test's
    /// wrapper of it) on the balances' queues.
    pub fn consumer<H: Handler>(&self, handler: H) -> Consumer<H> {
        // Two transactions at once: the pool's default ten connections
        // leave room for the relay and the writers.
        let config = ConsumerConfig::default().with_concurrency(2);
        Consumer::new(handler, self.pool.clone(), self.amqp.clone()).with_config(config)
    }

    /// Starts the relay, a consumer running `handler` and the pruning, until
    /// [`Running::stop`] (or the handle is dropped).
    pub fn start<H: Handler>(&self, handler: H) -> Running<H> {
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let relay = self.relay();
        tracker.spawn(relay.run(cancel.clone()));
        let consumer = Arc::new(self.consumer(handler));
        // The consumer rides out outages itself (it reconnects until
        // cancelled), so it returns only on the stop.
        tracker.spawn(consumer.clone().run(cancel.clone()));
        let prunes = vec![
            OUTBOX.prune(OUTBOX_RETENTION),
            inbox::dedup_prune(BALANCES.consumer, DEDUP_RETENTION),
        ];
        tracker.spawn(outbox_common::prune::run(
            self.pool.clone(),
            prunes,
            PRUNE_EVERY,
            cancel.clone(),
        ));
        tracker.close();
        Running {
            consumer,
            tracker,
            cancel,
        }
    }
}

/// The running relay, consumer and pruning. Dropping it stops them without
/// waiting; [`Running::stop`] waits for the work in hand to finish.
pub struct Running<H> {
    consumer: Arc<Consumer<H>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<H: Handler> Running<H> {
    /// The consumer's counters (processed, duplicates, retried,
    /// dead-lettered...).
    pub fn metrics(&self) -> &ConsumerMetrics {
        self.consumer.metrics()
    }

    /// The consumer's handler.
    pub fn handler(&self) -> &H {
        self.consumer.handler()
    }

    /// Whether it stopped by itself (the consumer gave up).
    pub fn is_stopped(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Stops the tasks and waits for them: the relay's batches and the
    /// consumer's transactions in hand finish first.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.wait().await;
    }
}

impl<H> Drop for Running<H> {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
