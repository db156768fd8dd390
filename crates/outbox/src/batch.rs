//! One relay batch: claim due rows (`FOR UPDATE SKIP LOCKED`), publish them
//! within the shared confirm window, settle their confirms, mark each row by
//! its own confirm and commit. At least once: a crash before the commit
//! leaves the rows due, and they are published again with the same
//! `message_id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Semaphore;

use outbox_common::metrics::seconds;

use crate::confirms::{self, Failed, PublishFailure, Settlement};
use crate::publisher::Publisher;
use crate::rows::OutboxRow;
use crate::{Relay, RelayError, Table};

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows confirmed and marked published.
    pub published: usize,
    /// Rows nacked or returned, due again after a backoff.
    pub failed: usize,
    /// Rows the broker did not confirm, left due without using an attempt.
    pub unconfirmed: usize,
    /// Rows of other batches that this batch made due again: their returns
    /// rode on its confirms. None while each batch has a lane of its own
    /// and a batch with unconfirmed publishes retires the publisher.
    pub reopened: usize,
    /// It claimed as many rows as it asked for: more are probably due.
    pub full: bool,
}

/// The rows of one claimed batch, settled by their confirms.
#[derive(Debug, Default, Clone)]
pub struct PublishedBatch {
    /// Rows claimed.
    pub claimed: usize,
    /// What their confirms said.
    pub settlement: Settlement,
}

impl Relay {
    /// Claims one batch, publishes it, waits for every confirm and marks each
    /// row by its own confirm, all inside the claiming transaction so no other
    /// relay can take these rows meanwhile.
    pub async fn run_once(&self, publisher: &Publisher) -> Result<BatchOutcome, RelayError> {
        self.run_batch(publisher, None, &Reopen::default()).await
    }

    /// [`Relay::run_once`], with the publishes awaiting confirms bounded by
    /// `window`, shared with the other batches in flight.
    #[tracing::instrument(
        name = "relay batch",
        skip_all,
        fields(claimed, published, failed),
        err
    )]
    pub(super) async fn run_batch(
        &self,
        publisher: &Publisher,
        window: Option<Arc<Semaphore>>,
        reopen: &Reopen,
    ) -> Result<BatchOutcome, RelayError> {
        let mut tx = self.pool.begin().await.map_err(RelayError::Claim)?;
        let batch = self
            .claim_and_publish_in(&mut tx, publisher, window.as_ref())
            .await?;
        let settlement = &batch.settlement;
        // Their acks and returns may still come on this lane: no later
        // batch may publish there (the relay reconnects first). A nack
        // retires the channels too, so the rows are tried again on new ones:
        // once, after a cluster node stopped, the relay's batches were still
        // nacked 40 s later while other publishes got through (RabbitMQ
        // 3.10, quorum queues), and a broker that nacks keeps nothing of a
        // channel worth keeping.
        let nacked = settlement
            .failed
            .iter()
            .any(|f| f.error == PublishFailure::Nacked);
        if !settlement.unconfirmed.is_empty() || nacked {
            publisher.retire();
        }
        // Kept before anything can fail: a later batch reopens them then.
        reopen.keep(&settlement.returned_elsewhere);
        // Both marks do nothing for an empty claim, which still commits and
        // reopens what earlier batches left.
        self.table
            .mark_published(&mut tx, &settlement.published)
            .await
            .map_err(RelayError::Mark)?;
        self.table
            .mark_failed(&mut tx, &settlement.failed)
            .await
            .map_err(RelayError::Mark)?;
        tx.commit().await.map_err(RelayError::Commit)?;
        // After the commit: the other batches' rows may wait for their own
        // batch's commit, and this one holds no lock they could wait for.
        // This batch is done whatever happens here; rows left wait for the next.
        let reopened = match reopen.apply(&self.pool, &self.table).await {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "will retry with the next batch");
                0
            }
        };
        let metrics = &self.metrics;
        metrics.published.inc_by(settlement.published.len() as u64);
        metrics
            .failed
            .inc_by((settlement.failed.len() + reopened) as u64);
        let outcome = BatchOutcome {
            claimed: batch.claimed,
            published: settlement.published.len(),
            failed: settlement.failed.len(),
            unconfirmed: settlement.unconfirmed.len(),
            reopened,
            full: batch.claimed as i64 >= self.config.batch_size(),
        };
        let span = tracing::Span::current();
        span.record("claimed", outcome.claimed);
        span.record("published", outcome.published);
        span.record("failed", outcome.failed);
        Ok(outcome)
    }

    /// The first half of [`Relay::run_once`]: claims due rows on `conn` (a
    /// transaction) and publishes them, returning how they settled. Rows are
    /// not marked: if the transaction is dropped now (a crash), they stay due
    /// and are published again.
    pub async fn claim_and_publish(
        &self,
        conn: &mut PgConnection,
        publisher: &Publisher,
    ) -> Result<PublishedBatch, RelayError> {
        self.claim_and_publish_in(conn, publisher, None).await
    }

    async fn claim_and_publish_in(
        &self,
        conn: &mut PgConnection,
        publisher: &Publisher,
        window: Option<&Arc<Semaphore>>,
    ) -> Result<PublishedBatch, RelayError> {
        let rows = self
            .table
            .claim_due(conn, self.config.batch_size())
            .await
            .map_err(RelayError::Claim)?;
        Ok(self.publish_rows(&rows, publisher, window).await)
    }

    /// Publishes `rows` and settles their confirms. With a `window`, each
    /// publish first takes one permit and gives it back with its confirm, so
    /// the publishes awaiting confirms never exceed the window, as in a raw
    /// confirmed-publish loop; without one, every confirm is in flight at once.
    pub(crate) async fn publish_rows(
        &self,
        rows: &[OutboxRow],
        publisher: &Publisher,
        window: Option<&Arc<Semaphore>>,
    ) -> PublishedBatch {
        if rows.is_empty() {
            return PublishedBatch::default();
        }
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(rows.len());
        let mut pending = FuturesUnordered::new();
        // Once one publish could not be written in time, the broker is not
        // taking any: the rest of the batch is left due, not tried one by one.
        let mut broker_down = false;
        for row in rows {
            if broker_down {
                confirms.push(Publisher::not_tried(row));
                continue;
            }
            let permit = match window {
                // Collect the confirms already in while waiting for room.
                Some(window) => Some(loop {
                    tokio::select! {
                        biased;
                        permit = window.clone().acquire_owned() => {
                            break permit.expect("the window is never closed");
                        }
                        Some(done) = pending.next() => confirms.push(done),
                    }
                }),
                None => None,
            };
            match publisher.publish(self.amqp.exchange(), row).await {
                Ok(confirm) => {
                    let (sent, latency) = (Instant::now(), &self.metrics.confirm_latency);
                    pending.push(confirm.settle(permit).inspect(move |_| {
                        latency.observe(seconds(sent.elapsed()));
                    }));
                }
                Err(failed) => {
                    broker_down = failed
                        .outcome
                        .as_ref()
                        .is_err_and(PublishFailure::is_outage);
                    confirms.push(failed);
                }
            }
        }
        while let Some(done) = pending.next().await {
            confirms.push(done);
        }
        let by_id: HashMap<_, _> = rows.iter().map(|r| (r.transaction_id, r.id)).collect();
        self.metrics
            .batch_latency
            .observe(seconds(started.elapsed()));
        PublishedBatch {
            claimed: rows.len(),
            settlement: confirms::settle(&by_id, confirms),
        }
    }
}

/// Rows of other batches whose messages were returned (see
/// [`Settlement::returned_elsewhere`]), waiting to be made due again. No
/// two open batches share a publisher lane, and a batch that gave up on
/// confirms retires the publisher, so this should stay empty: it is the
/// guard for a return that still reaches the wrong batch, kept until the
/// update succeeds so that an outage of Postgres then cannot leave a
/// returned row marked published.
#[derive(Debug, Clone, Default)]
pub(super) struct Reopen(Arc<std::sync::Mutex<Vec<Failed>>>);

impl Reopen {
    fn keep(&self, rows: &[Failed]) {
        self.lock().extend_from_slice(rows);
    }

    /// Makes every waiting row due again (each row's own batch has committed
    /// or holds it until it does: the update waits for its lock). On failure
    /// they wait for the next batch.
    async fn apply(&self, pool: &PgPool, table: &Table) -> Result<usize, RelayError> {
        let waiting = std::mem::take(&mut *self.lock());
        if waiting.is_empty() {
            return Ok(0);
        }
        let result = async {
            let mut conn = pool.acquire().await?;
            table.mark_failed(&mut conn, &waiting).await
        }
        .await;
        match result {
            Ok(_) => Ok(waiting.len()),
            Err(error) => {
                self.lock().extend(waiting);
                Err(RelayError::Reopen(error))
            }
        }
    }

    /// Makes the rows still waiting due again, a last time; logs those
    /// Postgres still refuses: an operator must reset them.
    pub(super) async fn finish(&self, pool: &PgPool, table: &Table) {
        if let Err(error) = self.apply(pool, table).await {
            tracing::warn!(%error, "could not reopen returned rows");
        }
        let waiting = self.lock();
        if !waiting.is_empty() {
            let ids: Vec<String> = waiting
                .iter()
                .map(|f| f.transaction_id.to_string())
                .collect();
            tracing::error!(
                transaction_ids = ids.join(","),
                "returned by the broker but perhaps marked published: set published_at = NULL on these outbox rows if so"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Failed>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
