//! Held events go on: once a commit applied their predecessor (or an
//! operator skipped it), they are published again to the consumer's queue,
//! and applied like any delivery (most follow in the transaction of their
//! predecessor instead: [`crate::follow`]). After a commit, only the
//! aggregates it moved on whose held events did not all follow are looked
//! at. A sweep every second looks at all, and so
//! catches what a crash, another process or an operator's skip left; it
//! also dead-letters events held past the hold limit (so the table stays
//! bounded: nothing is deleted unapplied), and samples the held gauges.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use outbox_common::amqp::Doing;
use outbox_common::amqp::headers::ERROR_HEADER;
use tokio_util::sync::CancellationToken;

use crate::Consumer;
use crate::error::report;
use crate::handler::Handler;
use crate::held::{self, HeldRow};
use crate::message::{self, BrokerCallError};

/// How often the held events are swept when no commit wakes the sweep.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Held events published again per statement.
const RELEASE_BATCH: i64 = 200;

/// Why a release round stopped; the next one tries again.
#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    #[error("database")]
    Database(#[from] sqlx::Error),
    #[error("broker")]
    Broker(#[from] BrokerCallError),
}

impl<H: Handler> Consumer<H> {
    /// Releases held events after each commit that moved on an aggregate
    /// and left some of its held events, and sweeps every [`SWEEP_EVERY`],
    /// until `cancel`.
    pub(crate) async fn release_held(
        self: Arc<Self>,
        publish: Arc<Channel>,
        cancel: CancellationToken,
    ) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let swept = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.release.notified() => false,
                _ = sweep.tick() => true,
            };
            if let Err(error) = self.release_round(&publish, swept).await {
                tracing::warn!(queue = %self.queues.main, error = report(&error), "releasing held events failed; will retry");
            }
        }
    }

    /// Publishes again the held events whose predecessor is applied; on a
    /// `sweep`, also dead-letters those held past the hold limit and
    /// samples the held gauges.
    async fn release_round(&self, publish: &Channel, sweep: bool) -> Result<(), ReleaseError> {
        // Taken even on a sweep, which looks at every aggregate: if the
        // round fails, the next sweep finds these again.
        let to_release = std::mem::take(&mut *self.to_release.lock().expect("never poisoned"));
        let among = (!sweep).then_some(to_release.as_slice());
        let mut conn = self.pool.acquire().await?;
        loop {
            let rows = held::releasable(&mut conn, self.name(), among, RELEASE_BATCH).await?;
            if rows.is_empty() {
                break;
            }
            let done = self.publish_again(publish, &rows, None).await?;
            held::released(&mut conn, self.name(), &done).await?;
            if (rows.len() as i64) < RELEASE_BATCH {
                break;
            }
        }
        if !sweep {
            return Ok(());
        }
        let limit = self.config.hold_limit();
        let expired = held::expired(&mut conn, self.name(), limit.as_secs_f64(), RELEASE_BATCH);
        let expired = expired.await?;
        if !expired.is_empty() {
            let reason = format!("held longer than {limit:?} waiting for its predecessor");
            tracing::warn!(queue = %self.queues.main, events = expired.len(), %reason, "dead-lettering held events");
            let done = self.publish_again(publish, &expired, Some(&reason)).await?;
            held::released(&mut conn, self.name(), &done).await?;
        }
        // A place marked waiting whose held events are all gone: a commit
        // that moves it on need not look for events to release.
        held::clear_waiting(&mut conn, self.name()).await?;
        let (count, oldest) = held::held_count(&mut conn, self.name()).await?;
        self.metrics.held_events.set(count);
        self.metrics.held_oldest.set(oldest);
        Ok(())
    }

    /// Publishes `rows` to the main queue (or, with a `dead` reason, to the
    /// DLQ), all of them before the first confirm is awaited; returns them
    /// all once every confirm says routed and stored, or the first failure
    /// (then none is deleted: the next round publishes them again, and the
    /// dedup rows absorb the copies that did arrive).
    async fn publish_again(
        &self,
        publish: &Channel,
        rows: &[HeldRow],
        dead: Option<&str>,
    ) -> Result<HashSet<uuid::Uuid>, ReleaseError> {
        let queue = match dead {
            None => &self.queues.main,
            Some(_) => &self.queues.dlq,
        };
        // Nothing else on the shared channel meanwhile (see `forward`): a
        // return rides on whichever confirm comes next, so it must be one
        // of these, and any failure fails them all.
        let _one_at_a_time = self.forwarding.lock().await;
        let confirms = async {
            let mut pending = Vec::with_capacity(rows.len());
            for row in rows {
                let mut properties = row.properties();
                if let Some(reason) = dead {
                    let mut headers = properties.headers().clone().unwrap_or_default();
                    headers.insert(
                        ERROR_HEADER.into(),
                        lapin::types::AMQPValue::LongString(reason.into()),
                    );
                    properties = properties.with_headers(headers);
                }
                pending.push(message::publish(publish, "", queue, &row.body, properties).await?);
            }
            let mut done = HashSet::with_capacity(rows.len());
            for (row, confirm) in rows.iter().zip(pending) {
                let confirm = confirm
                    .await
                    .doing(|| format!("waiting for the confirm from {queue}"))?;
                message::confirmed(queue, confirm)?;
                done.insert(row.transaction_id);
            }
            Ok::<_, BrokerCallError>(done)
        };
        let done = tokio::time::timeout(message::AMQP_TIMEOUT, confirms)
            .await
            .map_err(|source| BrokerCallError::ConfirmTimedOut {
                routing_key: queue.clone(),
                source,
            })??;
        Ok(done)
    }
}
