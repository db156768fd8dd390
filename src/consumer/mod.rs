//! Idempotent consumers. Each delivery is handled in ONE Postgres
//! transaction: the dedup row in `processed_messages`, then (only if it was
//! new) the side effect; commit; then ack. A failing handler is retried
//! through delay queues, then dead-lettered; nothing is dropped.

pub mod dlq;
pub mod handlers;
mod message;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::QueueNames;
use crate::config::{AmqpConfig, ConsumerConfig};
use crate::metrics::{ConsumerMetrics, Metrics};
use crate::orders::OrderEvent;
use crate::shutdown::{Backoff, sleep_or_cancel};
pub use message::{Incoming, ParseError};

/// A consumer's side effect. It runs inside the transaction that holds the
/// dedup row; an error rolls both back and sends the message to retry.
pub trait Handler: Send + Sync + 'static {
    /// The consumer's name: its dedup key and its queue's base name.
    fn name(&self) -> &'static str;

    fn handle(
        &self,
        conn: &mut PgConnection,
        event: &OrderEvent,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Side effect applied and committed, then acked.
    Processed,
    /// Seen before: acked without doing anything.
    Duplicate,
    /// Handler failed; sent to the delay queue for attempt `attempt`.
    Retried { attempt: u32 },
    /// Sent to `<queue>.dlq` (unparseable, or out of attempts).
    DeadLettered { reason: String },
}

/// What [`Consumer::apply`] did in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The dedup row and the side effect were committed.
    Committed,
    /// The dedup row existed: nothing was done.
    Duplicate,
    /// The handler failed; everything was rolled back.
    Failed(String),
}

/// One consumer: a handler, its queues and its connections.
pub struct Consumer<H> {
    pub handler: Arc<H>,
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    pub config: ConsumerConfig,
    pub queues: QueueNames,
    pub metrics: Arc<ConsumerMetrics>,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        handler: H,
        pool: PgPool,
        amqp: AmqpConfig,
        config: ConsumerConfig,
        metrics: &Metrics,
    ) -> Self {
        let queues = QueueNames::new(&amqp, handler.name());
        Self {
            metrics: metrics.consumer(&queues.main),
            handler: Arc::new(handler),
            pool,
            amqp,
            config,
            queues,
        }
    }

    /// Handles one delivery to the end: commit and ack, or retry/dead-letter
    /// and ack. `Err` means an infrastructure failure (Postgres, broker):
    /// the delivery is left unacked for redelivery.
    pub async fn process(&self, delivery: &Delivery, publish: &Channel) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let incoming = Incoming::parse(delivery);
        let span = message::process_span(&self.queues.main, delivery, &incoming);
        let outcome = self
            .process_parsed(delivery, publish, incoming)
            .instrument(span.clone())
            .await;
        match &outcome {
            Ok(o) => {
                span.record("outcome", format!("{o:?}"));
                let m = &self.metrics;
                match o {
                    Outcome::Processed => m.processed.inc(),
                    Outcome::Duplicate => m.duplicates.inc(),
                    Outcome::Retried { .. } => m.retried.inc(),
                    Outcome::DeadLettered { .. } => {
                        span.record("otel.status_code", "ERROR");
                        m.dead_lettered.inc()
                    }
                }
            }
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                tracing::warn!(parent: &span, error = format!("{error:#}"), "delivery left for redelivery");
            }
        }
        self.metrics.handling.observe(started.elapsed());
        outcome
    }

    async fn process_parsed(
        &self,
        delivery: &Delivery,
        publish: &Channel,
        incoming: Result<Incoming, ParseError>,
    ) -> anyhow::Result<Outcome> {
        let incoming = match incoming {
            Ok(incoming) => incoming,
            Err(error) => {
                let reason = format!("unparseable message: {error}");
                message::forward(
                    publish,
                    delivery,
                    &self.queues.dlq,
                    message::attempt(delivery) + 1,
                    &reason,
                )
                .await?;
                message::ack(delivery).await?;
                return Ok(Outcome::DeadLettered { reason });
            }
        };
        match self.apply(&incoming).await? {
            Applied::Committed => {
                message::ack(delivery).await?;
                Ok(Outcome::Processed)
            }
            Applied::Duplicate => {
                message::ack(delivery).await?;
                Ok(Outcome::Duplicate)
            }
            Applied::Failed(reason) => {
                let attempt = incoming.attempt;
                let outcome = match self.queues.retries.get(attempt as usize) {
                    Some((retry_queue, _)) => {
                        tracing::info!(%reason, attempt = attempt + 1, queue = %retry_queue, "handler failed; retrying later");
                        message::forward(publish, delivery, retry_queue, attempt + 1, &reason)
                            .await?;
                        Outcome::Retried {
                            attempt: attempt + 1,
                        }
                    }
                    None => {
                        tracing::warn!(%reason, attempts = attempt + 1, "handler failed; dead-lettering");
                        message::forward(publish, delivery, &self.queues.dlq, attempt + 1, &reason)
                            .await?;
                        Outcome::DeadLettered { reason }
                    }
                };
                // Only now that the broker holds the copy is the original let go.
                message::ack(delivery).await?;
                Ok(outcome)
            }
        }
    }

    /// The database half of handling a message: ONE transaction holding the
    /// dedup row and, if the row is new, the side effect. Does not ack.
    /// `Err` is an infrastructure failure; a handler failure is
    /// `Applied::Failed` and leaves nothing behind.
    pub async fn apply(&self, incoming: &Incoming) -> anyhow::Result<Applied> {
        let mut tx = self
            .pool
            .begin()
            .await
            .context("starting the consumer transaction")?;
        let fresh = sqlx::query(
            "INSERT INTO processed_messages (consumer, transaction_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(self.handler.name())
        .bind(incoming.transaction_id)
        .execute(&mut *tx)
        .await
        .context("recording the dedup row")?
        .rows_affected()
            == 1;
        if !fresh {
            tx.commit().await.context("committing a duplicate")?;
            return Ok(Applied::Duplicate);
        }
        match self.handler.handle(&mut tx, &incoming.event).await {
            Ok(()) => {
                tx.commit().await.context("committing the side effect")?;
                Ok(Applied::Committed)
            }
            // Dropping the transaction rolls back the dedup row with the effect.
            Err(error) => Ok(Applied::Failed(format!("{error:#}"))),
        }
    }

    /// Consumes until `cancel` fires, reconnecting with backoff when the
    /// broker or Postgres goes away. On cancel: `basic_cancel`, finish the
    /// deliveries in hand, close channels and connection.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        while !cancel.is_cancelled() {
            match self.clone().consume_session(&cancel, &mut backoff).await {
                Ok(()) => {}
                Err(error) if cancel.is_cancelled() => {
                    tracing::debug!(error = format!("{error:#}"), "consumer stopped");
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queues.main, error = format!("{error:#}"), "consumer lost its connection; reconnecting");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
        tracing::info!(queue = %self.queues.main, "consumer stopped");
        Ok(())
    }

    /// One connection's life: returns when the connection fails or on cancel.
    async fn consume_session(
        self: Arc<Self>,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let name = format!("order-service {}", self.queues.main);
        let connection = crate::amqp::connect(&self.amqp, &name, cancel).await?;
        let result = self.clone().consume_on(&connection, cancel, backoff).await;
        if connection.status().connected() {
            let close = connection.close(200, "consumer stopping".into());
            let _ = tokio::time::timeout(message::AMQP_TIMEOUT, close).await;
        }
        result
    }

    async fn consume_on(
        self: Arc<Self>,
        connection: &Connection,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> anyhow::Result<()> {
        let consume = connection
            .create_channel()
            .await
            .context("opening the consume channel")?;
        let publish = connection
            .create_channel()
            .await
            .context("opening the publish channel")?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        crate::amqp::declare_exchange(&consume, &self.amqp).await?;
        crate::amqp::declare_consumer_queues(&consume, &self.amqp, self.handler.name()).await?;
        consume
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let mut deliveries = consume
            .basic_consume(
                self.queues.main.as_str().into(),
                format!("{}-{}", self.handler.name(), uuid::Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("starting to consume")?;
        tracing::info!(queue = %self.queues.main, "consumer started");
        let tag = deliveries.tag();
        let limit = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let publish = Arc::new(publish);
        let result = loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => {
                    break Err(anyhow::Error::new(error).context("consumer stream failed"));
                }
                None => break Err(anyhow::anyhow!("consumer was cancelled by the broker")),
            };
            backoff.reset();
            let permit = limit
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let this = self.clone();
            let publish = publish.clone();
            tracker.spawn(async move {
                let _permit = permit;
                if this.process(&delivery, &publish).await.is_err() {
                    // Postgres or the broker failed: leave the message for
                    // redelivery after a pause, so an outage does not spin.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let nack = delivery.nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    });
                    // If the connection is gone the broker requeues it anyway.
                    let _ = tokio::time::timeout(message::AMQP_TIMEOUT, nack).await;
                }
            });
        };
        // Stop new deliveries first, then let those in hand finish.
        // Every broker call below is bounded: on a dead connection lapin can
        // leave a queued command unanswered, and waiting on it would keep this
        // consumer from ever reconnecting.
        if connection.status().connected() {
            let cancel_consumer = consume.basic_cancel(tag, BasicCancelOptions::default());
            let _ = tokio::time::timeout(message::AMQP_TIMEOUT, cancel_consumer).await;
        }
        tracker.close();
        // In-flight deliveries end by themselves: each broker call they make
        // is bounded, and an unacked delivery goes back to the queue.
        tracker.wait().await;
        if connection.status().connected() {
            let close = async {
                let _ = publish.close(200, "consumer stopping".into()).await;
                let _ = consume.close(200, "consumer stopping".into()).await;
            };
            let _ = tokio::time::timeout(message::AMQP_TIMEOUT, close).await;
        }
        result
    }
}
