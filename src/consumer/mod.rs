//! Idempotent consumers. The deliveries in hand are handled in ONE Postgres
//! statement, so one transaction: their dedup rows in `processed_messages`
//! and, only for the new ones, the side effect; then ack each. A failing handler is retried
//! through delay queues, then dead-lettered; nothing is dropped.

pub mod dlq;
pub mod handlers;
mod message;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::amqp::QueueNames;
use crate::config::{AmqpConfig, ConsumerConfig};
use crate::metrics::{ConsumerMetrics, Metrics};
use crate::orders::OrderEvent;
use crate::shutdown::{Backoff, sleep_or_cancel};
pub use message::{Incoming, ParseError};

/// A consumer's side effect, written as SQL that runs in the SAME statement
/// as the dedup insert: one statement is one transaction, so the dedup rows
/// and the effect commit together, or neither does, in one round trip.
pub trait Handler: Send + Sync + 'static {
    /// The consumer's name: its dedup key and its queue's base name.
    fn name(&self) -> &'static str;

    /// The side effect: one or more comma-separated `name AS (INSERT|UPDATE
    /// ...)` CTEs over `events`, the batch's events not seen before, with the
    /// columns `transaction_id` (the dedup key: the message's `message_id`),
    /// `order_id`, `product_id`, `user_id`, `amount` and `occurred_at` (the
    /// event's `timestamp`). An error the statement raises on the data (a
    /// constraint, a bad value, a `RAISE` in a trigger) rolls back the dedup
    /// rows with the effect and fails the events; a batch is then applied
    /// again one event at a time, so a failing event only sends itself to
    /// retry. Any other Postgres error is an outage: the deliveries go back
    /// to the queue without using up an attempt.
    fn effect(&self) -> &'static str;

    /// Runs before the statement, outside the database, on every event
    /// offered: duplicates too, which are known only inside the statement,
    /// so it must have no side effect of its own. An error fails the events
    /// with nothing written (the e-mail demo's simulated failures).
    fn check(&self, _events: &[&OrderEvent]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Whether Postgres refused the statement for its data (SQLSTATE classes 22
/// data exception, 23 integrity constraint, 54 program limit such as a value
/// too large for an index, P0 raised by a trigger): the events fail. Every
/// other error (a lost connection, a refused login, a read-only or full
/// database, a deadlock) is an outage, retried as such.
fn refused_data(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code().is_some_and(|c| {
        ["22", "23", "54", "P0"]
            .iter()
            .any(|class| c.starts_with(class))
    })
}

/// Wraps a handler's effect into the statement that also inserts the dedup
/// rows (sorted, so two batches sharing ids cannot deadlock) and returns the
/// ids that were new. Binds: `$1` the consumer's name, then the events'
/// fields as arrays.
fn apply_statement(effect: &str) -> SqlStr {
    let statement = format!(
        "WITH incoming AS ( \
             SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::text[], $5::text[], \
                                  $6::bigint[], $7::timestamptz[]) \
             AS e(transaction_id, order_id, product_id, user_id, amount, occurred_at)), \
         fresh AS ( \
             INSERT INTO processed_messages (consumer, transaction_id) \
             SELECT $1, transaction_id FROM incoming ORDER BY transaction_id \
             ON CONFLICT DO NOTHING RETURNING transaction_id), \
         events AS (SELECT incoming.* FROM incoming JOIN fresh USING (transaction_id)), \
         {effect} \
         SELECT transaction_id FROM fresh"
    );
    // The effect is the handler's own constant SQL, never a message's data.
    AssertSqlSafe(Arc::<str>::from(statement)).into_sql_str()
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
    /// The dedup insert and the handler's effect, as one statement.
    statement: SqlStr,
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
            statement: apply_statement(handler.effect()),
            handler: Arc::new(handler),
            pool,
            amqp,
            config,
            queues,
        }
    }

    /// Handles deliveries to the end, their database work in ONE transaction:
    /// commit, then ack each; or retry/dead-letter and ack. One result per
    /// delivery, in order. `Err` means an infrastructure failure (Postgres,
    /// broker): that delivery is left unacked for redelivery.
    pub async fn process_batch(
        &self,
        deliveries: &[Delivery],
        publish: &Channel,
    ) -> Vec<anyhow::Result<Outcome>> {
        let started = Instant::now();
        let parsed: Vec<Result<Incoming, ParseError>> =
            deliveries.iter().map(Incoming::parse).collect();
        let spans: Vec<tracing::Span> = deliveries
            .iter()
            .zip(&parsed)
            .map(|(delivery, incoming)| {
                message::process_span(&self.queues.main, delivery, incoming)
            })
            .collect();
        let incoming: Vec<&Incoming> = parsed.iter().filter_map(|p| p.as_ref().ok()).collect();
        let mut applied = self.apply_batch(&incoming).await.into_iter();
        let settles: Vec<_> = deliveries
            .iter()
            .zip(parsed)
            .zip(&spans)
            .map(|((delivery, incoming), span)| {
                let applied = incoming.is_ok().then(|| applied.next()).flatten();
                self.settle(delivery, publish, incoming, applied)
                    .instrument(span.clone())
            })
            .collect();
        let outcomes = join_all(settles).await;
        let elapsed = started.elapsed();
        for (outcome, span) in outcomes.iter().zip(&spans) {
            self.record(outcome, span);
            self.metrics.handling.observe(elapsed);
        }
        outcomes
    }

    fn record(&self, outcome: &anyhow::Result<Outcome>, span: &tracing::Span) {
        match outcome {
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
                self.metrics.requeued.inc();
                tracing::warn!(parent: span, error = format!("{error:#}"), "delivery left for redelivery");
            }
        }
    }

    /// Acks a delivery whose database work is done, or forwards it to a delay
    /// queue or the DLQ first. `applied` is `None` only for an unparseable one.
    async fn settle(
        &self,
        delivery: &Delivery,
        publish: &Channel,
        incoming: Result<Incoming, ParseError>,
        applied: Option<anyhow::Result<Applied>>,
    ) -> anyhow::Result<Outcome> {
        let (incoming, applied) = match (incoming, applied) {
            (Ok(incoming), Some(applied)) => (incoming, applied?),
            (Ok(_), None) => anyhow::bail!("no database result for this delivery"),
            (Err(error), _) => {
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
        match applied {
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

    /// The database half of handling one message; see [`Consumer::apply_batch`].
    pub async fn apply(&self, incoming: &Incoming) -> anyhow::Result<Applied> {
        Ok(match self.transact(&[incoming]).await? {
            Ok(mut applied) => applied.pop().expect("one result per message"),
            Err(reason) => Applied::Failed(reason),
        })
    }

    /// The database half of handling messages: ONE transaction holding their
    /// dedup rows and, for the new ones, the side effect. Does not ack. One
    /// result per message, in order: `Err` is an infrastructure failure; a
    /// handler failure is `Applied::Failed` and leaves nothing behind. When
    /// the handler fails on a batch, each message is applied again on its
    /// own, so only the failing ones fail.
    pub async fn apply_batch(&self, batch: &[&Incoming]) -> Vec<anyhow::Result<Applied>> {
        match self.transact(batch).await {
            Ok(Ok(applied)) => applied.into_iter().map(Ok).collect(),
            Ok(Err(reason)) if batch.len() == 1 => vec![Ok(Applied::Failed(reason))],
            Ok(Err(reason)) => {
                tracing::debug!(%reason, messages = batch.len(), "batch failed; applying one at a time");
                let mut applied = Vec::with_capacity(batch.len());
                for incoming in batch {
                    applied.push(self.apply(incoming).await);
                }
                applied
            }
            Err(error) => {
                let error = format!("{error:#}");
                batch
                    .iter()
                    .map(|_| Err(anyhow::anyhow!("{error}")))
                    .collect()
            }
        }
    }

    /// One statement, so one transaction, over `batch`: `Ok(Err(reason))`
    /// when the handler's check or its effect failed and nothing was written.
    async fn transact(&self, batch: &[&Incoming]) -> anyhow::Result<Result<Vec<Applied>, String>> {
        if batch.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        // The first copy of an id is offered; any other copy is a duplicate.
        let mut offered = HashSet::new();
        let offered_batch: Vec<&Incoming> = batch
            .iter()
            .copied()
            .filter(|i| offered.insert(i.transaction_id))
            .collect();
        let events: Vec<&OrderEvent> = offered_batch.iter().map(|i| &i.event).collect();
        if let Err(error) = self.handler.check(&events) {
            return Ok(Err(format!("{error:#}")));
        }
        let mut fresh: HashSet<Uuid> = match self.run_statement(&offered_batch).await {
            Ok(fresh) => fresh.into_iter().collect(),
            // The database refused the data (a constraint, say): the effect
            // failed, and the statement's dedup rows went with it.
            Err(error) if refused_data(&error) => return Ok(Err(format!("{error:#}"))),
            Err(error) => {
                return Err(anyhow::Error::new(error).context("applying the consumer statement"));
            }
        };
        self.metrics.transactions.inc();
        // A new id is applied once, by its first copy; later copies find it
        // taken, as an id seen before does.
        Ok(Ok(batch
            .iter()
            .map(|i| {
                if fresh.remove(&i.transaction_id) {
                    Applied::Committed
                } else {
                    Applied::Duplicate
                }
            })
            .collect()))
    }

    /// Runs the consumer's statement on `batch` (distinct dedup keys);
    /// returns the keys it saw for the first time.
    async fn run_statement(&self, batch: &[&Incoming]) -> Result<Vec<Uuid>, sqlx::Error> {
        let keys: Vec<Uuid> = batch.iter().map(|i| i.transaction_id).collect();
        let events: Vec<&OrderEvent> = batch.iter().map(|i| &i.event).collect();
        let order_ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
        let product_ids: Vec<&str> = events.iter().map(|e| e.product_id.as_str()).collect();
        let user_ids: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
        let amounts: Vec<i64> = events.iter().map(|e| e.amount).collect();
        let timestamps: Vec<DateTime<Utc>> = events.iter().map(|e| e.timestamp).collect();
        sqlx::query_scalar(self.statement.clone())
            .bind(self.handler.name())
            .bind(&keys)
            .bind(&order_ids)
            .bind(&product_ids)
            .bind(&user_ids)
            .bind(&amounts)
            .bind(&timestamps)
            .fetch_all(&self.pool)
            .await
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
        let deliveries = consume
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
        // Each batch is what has arrived when a transaction can start.
        let mut batches = deliveries.ready_chunks(self.config.batch_size.max(1));
        let limit = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let publish = Arc::new(publish);
        let result = loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let next = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                next = batches.next() => next,
            };
            let Some(items) = next else {
                break Err(anyhow::anyhow!("consumer was cancelled by the broker"));
            };
            let batch: Result<Vec<Delivery>, lapin::Error> = items.into_iter().collect();
            let batch = match batch {
                Ok(batch) => batch,
                // Unacked deliveries go back to the queue with the channel.
                Err(error) => {
                    break Err(anyhow::Error::new(error).context("consumer stream failed"));
                }
            };
            backoff.reset();
            let this = self.clone();
            let publish = publish.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let outcomes = this.process_batch(&batch, &publish).await;
                let failed: Vec<&Delivery> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, outcome)| outcome.is_err())
                    .map(|(delivery, _)| delivery)
                    .collect();
                if failed.is_empty() {
                    return;
                }
                // Postgres or the broker failed: leave these for redelivery
                // after a pause, so an outage does not spin.
                tokio::time::sleep(Duration::from_millis(500)).await;
                for delivery in failed {
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
