//! The consume loop: one connection's session at a time, reconnecting with
//! backoff; batches of deliveries handled concurrently on a tracker; on
//! cancel, `basic_cancel`, finish the deliveries in hand, close.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer as Deliveries};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Consumer;
use crate::error::report;
use crate::handler::Handler;
use crate::in_flight::{InFlight, idle};
use crate::message::AMQP_TIMEOUT;
use outbox_common::amqp::{BrokerError, Doing, StartError};
use outbox_common::shutdown::{Backoff, sleep_or_cancel};

/// How long deliveries left by an outage wait before they are requeued, so
/// an outage does not spin.
const REQUEUE_PAUSE: Duration = Duration::from_millis(500);
/// How often the dead-letter queue's depth is sampled.
const DLQ_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Why a session ended before `cancel`: the consumer reconnects.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] StartError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("consumer was cancelled by the broker")]
    CancelledByBroker,
    #[error("the publish channel was closed")]
    PublishChannelClosed,
    #[error("consumer stream failed")]
    Stream(#[source] lapin::Error),
}

/// The two channels of a session: deliveries come in on one, retries and
/// dead letters go out on the other (confirm mode).
struct Channels {
    consume: Channel,
    publish: Arc<Channel>,
}

impl<H: Handler> Consumer<H> {
    /// Consumes until `cancel` fires, reconnecting with backoff when the
    /// broker or Postgres goes away; returns once the deliveries in hand are
    /// settled (or left for redelivery) and the connection is closed.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::default();
        while !cancel.is_cancelled() {
            match self.clone().session(&cancel, &mut backoff).await {
                Ok(()) => {}
                Err(error) if cancel.is_cancelled() => {
                    tracing::debug!(error = report(&error), "consumer stopped");
                }
                Err(error) => {
                    tracing::warn!(queue = %self.queues.main, error = report(&error), "consumer lost its connection; reconnecting");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
        tracing::info!(queue = %self.queues.main, "consumer stopped");
    }

    /// One connection's life: returns when the connection fails or on cancel.
    async fn session(
        self: Arc<Self>,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let name = format!("consumer {}", self.queues.main);
        let connection = outbox_common::amqp::connect(&self.amqp, &name, cancel).await?;
        let result = async {
            let channels = self.open(&connection).await?;
            let deliveries = self.subscribe(&channels.consume).await?;
            self.subscribed.set(true);
            let consumed = self
                .clone()
                .consume(&connection, channels, deliveries, cancel, backoff)
                .await;
            self.subscribed.set(false);
            consumed
        }
        .await;
        if connection.status().connected() {
            let close = connection.close(200, "consumer stopping".into());
            let _ = tokio::time::timeout(AMQP_TIMEOUT, close).await;
        }
        result
    }

    /// Opens the channels and declares this consumer's queues.
    async fn open(&self, connection: &Connection) -> Result<Channels, BrokerError> {
        let consume = connection
            .create_channel()
            .await
            .doing(|| "opening the consume channel".into())?;
        let publish = outbox_common::amqp::confirm_channel(connection).await?;
        outbox_common::amqp::declare_exchange(&consume, &self.amqp).await?;
        outbox_common::amqp::declare_consumer_queues(
            &consume,
            &self.amqp,
            &self.handler.subscription(),
        )
        .await?;
        Ok(Channels {
            consume,
            publish: Arc::new(publish),
        })
    }

    async fn subscribe(&self, consume: &Channel) -> Result<Deliveries, BrokerError> {
        consume
            .basic_qos(self.config.prefetch(), BasicQosOptions::default())
            .await
            .doing(|| "setting prefetch".into())?;
        let deliveries = consume
            .basic_consume(
                self.queues.main.as_str().into(),
                format!("{}-{}", self.name(), uuid::Uuid::new_v4()).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .doing(|| "starting to consume".into())?;
        tracing::info!(queue = %self.queues.main, "consumer started");
        Ok(deliveries)
    }

    /// Hands each batch of what has arrived to a task, at most
    /// `concurrency` at once, until cancel or the stream ends; then stops.
    async fn consume(
        self: Arc<Self>,
        connection: &Connection,
        channels: Channels,
        deliveries: Deliveries,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let tag = deliveries.tag();
        let mut batches = deliveries.ready_chunks(self.config.batch_size());
        let limit = Arc::new(Semaphore::new(self.config.concurrency()));
        let tracker = TaskTracker::new();
        let sampling = cancel.child_token();
        if let Ok(channel) = connection.create_channel().await {
            tracker.spawn(self.clone().sample_dead_letters(channel, sampling.clone()));
        }
        if self.handler.in_sequence() {
            let publish = channels.publish.clone();
            tracker.spawn(self.clone().release_held(publish, sampling.clone()));
        }
        let in_flight = self.handler.in_sequence().then(Arc::<InFlight>::default);
        let result = loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            // Deferred deliveries go with what arrives next, or once no batch
            // is in flight if nothing arrives.
            let (deferring, may_go) = in_flight.as_ref().map_or((false, false), |f| f.deferring());
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                next = batches.next() => next,
                () = std::future::ready(()), if may_go => Some(Vec::new()),
                () = idle(&in_flight), if deferring => Some(Vec::new()),
            };
            let Some(items) = next else {
                break Err(SessionError::CancelledByBroker);
            };
            // Without its publish channel no refused delivery can be
            // forwarded: start a new session rather than requeue forever.
            if !channels.publish.status().connected() {
                break Err(SessionError::PublishChannelClosed);
            }
            // Unacked deliveries go back to the queue with a failed channel.
            let batch = match items.into_iter().collect::<Result<Vec<Delivery>, _>>() {
                Ok(batch) => batch,
                Err(error) => break Err(SessionError::Stream(error)),
            };
            backoff.reset();
            let (this, publish) = (self.clone(), channels.publish.clone());
            if let Some(in_flight) = &in_flight {
                this.hand_over(in_flight, batch, permit, &tracker, publish);
                continue;
            }
            tracker.spawn(async move {
                let _permit = permit;
                this.handle(batch, &publish).await;
            });
        };
        // Stop new deliveries first, then let those in hand finish. Every
        // broker call below is bounded: on a dead connection lapin can leave
        // a command unanswered, and waiting on it would keep this consumer
        // from ever reconnecting.
        if connection.status().connected() {
            let cancel_consumer = channels
                .consume
                .basic_cancel(tag, BasicCancelOptions::default());
            let _ = tokio::time::timeout(AMQP_TIMEOUT, cancel_consumer).await;
        }
        sampling.cancel();
        tracker.close();
        tracker.wait().await;
        // No batch is in flight now: the deferred deliveries may all go. On a
        // lost connection the broker has requeued them: they could not be
        // acked.
        let mut deferred = in_flight.map(|f| f.take_deferred()).unwrap_or_default();
        while [&channels.consume, &*channels.publish].map(|c| c.status().connected()) == [true; 2]
            && !deferred.is_empty()
        {
            let rest = deferred.split_off(deferred.len().min(self.config.batch_size()));
            self.handle(std::mem::replace(&mut deferred, rest), &channels.publish)
                .await;
        }
        if connection.status().connected() {
            let close = async {
                let _ = channels
                    .publish
                    .close(200, "consumer stopping".into())
                    .await;
                let _ = channels
                    .consume
                    .close(200, "consumer stopping".into())
                    .await;
            };
            let _ = tokio::time::timeout(AMQP_TIMEOUT, close).await;
        }
        result
    }

    /// Sets the dead-letter queue's depth gauge every [`DLQ_SAMPLE_EVERY`]
    /// (a passive declare on a channel of its own, so a failure cannot close
    /// the consume channel) until `cancel`.
    async fn sample_dead_letters(self: Arc<Self>, channel: Channel, cancel: CancellationToken) {
        loop {
            let declare = channel.queue_declare(
                self.queues.dlq.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            );
            match tokio::time::timeout(AMQP_TIMEOUT, declare).await {
                Ok(Ok(queue)) => {
                    self.metrics
                        .dead_letters
                        .set(i64::from(queue.message_count()));
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "could not sample the dead-letter queue");
                    return;
                }
                Err(_) => {}
            }
            if !sleep_or_cancel(DLQ_SAMPLE_EVERY, &cancel).await {
                let _ = tokio::time::timeout(AMQP_TIMEOUT, channel.close(200, "done".into())).await;
                return;
            }
        }
    }

    /// Processes one batch; requeues, after a pause, the deliveries an
    /// outage left.
    pub(crate) async fn handle(&self, batch: Vec<Delivery>, publish: &Channel) {
        let settled = self.process_batch(&batch, publish).await;
        let left: Vec<&Delivery> = batch
            .iter()
            .filter(|d| !matches!(settled.get(&d.delivery_tag), Some(Ok(_))))
            .collect();
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(REQUEUE_PAUSE).await;
        // All at once, each bounded: if the connection is gone the broker
        // requeues them anyway.
        let nacks = left.into_iter().map(|delivery| {
            let nack = delivery.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            });
            tokio::time::timeout(AMQP_TIMEOUT, nack)
        });
        futures_util::future::join_all(nacks).await;
    }
}
