//! Held events go on: once a commit applied their predecessor (or an
//! operator skipped it), they are published again to the consumer's queue,
//! and applied like any delivery. A sweep every second catches what a
//! crash or another process left, dead-letters events held past the hold
//! limit (so the table stays bounded: nothing is deleted unapplied), and
//! samples the held gauges.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use outbox_common::amqp::headers::ERROR_HEADER;
use tokio_util::sync::CancellationToken;

use crate::Consumer;
use crate::error::report;
use crate::handler::Handler;
use crate::held::HeldRow;
use crate::hold;
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
    /// Releases held events after each commit that moved an aggregate on,
    /// and every [`SWEEP_EVERY`], until `cancel`.
    pub(crate) async fn release_held(
        self: Arc<Self>,
        publish: Arc<Channel>,
        cancel: CancellationToken,
    ) {
        loop {
            if let Err(error) = self.release_round(&publish).await {
                tracing::warn!(queue = %self.queues.main, error = report(&error), "releasing held events failed; will retry");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.release.notified() => {}
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
    }

    async fn release_round(&self, publish: &Channel) -> Result<(), ReleaseError> {
        let mut conn = self.pool.acquire().await?;
        loop {
            let rows = hold::releasable(&mut conn, self.name(), RELEASE_BATCH).await?;
            let done = self.publish_again(publish, &rows, None).await?;
            hold::released(&mut conn, self.name(), &done).await?;
            if (rows.len() as i64) < RELEASE_BATCH {
                break;
            }
        }
        let limit = self.config.hold_limit();
        let expired = hold::expired(&mut conn, self.name(), limit.as_secs_f64(), RELEASE_BATCH);
        let expired = expired.await?;
        if !expired.is_empty() {
            let reason = format!("held longer than {limit:?} waiting for its predecessor");
            tracing::warn!(queue = %self.queues.main, events = expired.len(), %reason, "dead-lettering held events");
            let done = self.publish_again(publish, &expired, Some(&reason)).await?;
            hold::released(&mut conn, self.name(), &done).await?;
        }
        let (count, oldest) = hold::held_count(&mut conn, self.name()).await?;
        self.metrics.held_events.set(count);
        self.metrics.held_oldest.set(oldest);
        Ok(())
    }

    /// Publishes `rows` to the main queue (or, with a `dead` reason, to the
    /// DLQ), each confirmed; returns those the broker took.
    async fn publish_again(
        &self,
        publish: &Channel,
        rows: &[HeldRow],
        dead: Option<&str>,
    ) -> Result<HashSet<uuid::Uuid>, ReleaseError> {
        let mut done = HashSet::new();
        for row in rows {
            let (queue, mut properties) = (&self.queues.main, row.properties());
            let queue = match dead {
                None => queue,
                Some(reason) => {
                    let mut headers = properties.headers().clone().unwrap_or_default();
                    headers.insert(
                        ERROR_HEADER.into(),
                        lapin::types::AMQPValue::LongString(reason.into()),
                    );
                    properties = properties.with_headers(headers);
                    &self.queues.dlq
                }
            };
            // One publish at a time on the shared channel (see `forward`).
            let _one_at_a_time = self.forwarding.lock().await;
            message::publish_confirmed(publish, "", queue, &row.body, properties).await?;
            done.insert(row.transaction_id);
        }
        Ok(done)
    }
}
