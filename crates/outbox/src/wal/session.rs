//! One session of the WAL relay: a replication stream from the slot's
//! confirmed position and a publisher, until either fails or the relay is
//! cancelled.
//!
//! Transactions are published in batches, one batch per free lane: while
//! the lanes are busy, the transactions received meanwhile make the next
//! batch (up to the batch size; past it the stream is not read, and the
//! server waits). Batches settle in any sequence; the position told to
//! Postgres advances over the transactions whose batches, and every
//! earlier one's, have settled.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use pgwire_replication::{FeedbackObserver, Lsn, ReplicationClient, ReplicationEvent};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use outbox_common::shutdown::Backoff;

use super::horizons::Horizons;
use super::stream::{Settled, Stream};
use super::{WalError, WalRelay};
use crate::publisher::Publisher;

impl WalRelay {
    /// One session: see the module's documentation.
    pub(super) async fn session(
        &self,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), WalError> {
        let publisher = self.relay.publisher(cancel).await?;
        let result = self.stream(&publisher, cancel, backoff).await;
        if result.is_err() {
            publisher.retire();
        }
        publisher.close().await;
        result
    }

    async fn stream(
        &self,
        publisher: &Publisher,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), WalError> {
        let source = self
            .source
            .clone()
            .with_feedback_observer(FeedbackObserver::new(|_| {}));
        let table: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::bigint")
            .bind(self.relay.table.name())
            .fetch_one(self.pool())
            .await?;
        let mut client = ReplicationClient::connect(source).await?;
        if let Err(error) = client.wait_started().await {
            let busy = error.to_string();
            if busy.contains("55006") || busy.contains("is active for PID") {
                return Err(WalError::SlotBusy);
            }
            return Err(error.into());
        }
        tracing::info!(slot = self.slot(), "WAL relay reading its slot");
        backoff.reset();
        let horizons = Horizons::new(self.relay.table.name());
        let mut stream = Stream::new(self, publisher, table as u32);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut next_horizon = Instant::now();
        let result = loop {
            let full = stream.gathering.len() as i64 >= self.relay.config.batch_size();
            let step = tokio::select! {
                biased;
                _ = cancel.cancelled() => Step::Cancelled,
                Some(settled) = stream.in_flight.next() => Step::Settled(settled),
                event = client.recv(), if !full => Step::Event(event),
                _ = tick.tick() => Step::Tick,
            };
            let done = match step {
                Step::Cancelled => break Ok(()),
                Step::Settled(settled) => stream.settle(settled).await,
                Step::Event(Ok(Some(event))) => stream.receive(event),
                Step::Event(Ok(None)) => break Err(WalError::StreamEnded),
                Step::Event(Err(error)) => break Err(error.into()),
                Step::Tick => {
                    let oldest = stream.commits.front().map(|c| c.committed_at);
                    let ticked = self.tick(oldest, stream.acked, &horizons, &mut next_horizon);
                    // The stream goes on: the gauges and horizons wait for
                    // the next tick.
                    if let Err(error) = ticked.await {
                        tracing::warn!(%error, "WAL relay: reading the lag or taking a horizon failed");
                    }
                    Ok(())
                }
            };
            if let Err(error) = done {
                break Err(error);
            }
            stream.start_batch();
            if let Some(lsn) = stream.advance() {
                client.update_applied_lsn(lsn);
            }
            if !publisher.is_usable() {
                break Err(WalError::PublisherLost);
            }
        };
        // The batches in hand settle (their confirms are bounded in time),
        // so what they published is not sent again by the next session.
        if result.is_ok() {
            while let Some(settled) = stream.in_flight.next().await {
                if stream.settle(settled).await.is_err() {
                    break;
                }
                if let Some(lsn) = stream.advance() {
                    client.update_applied_lsn(lsn);
                }
            }
        }
        // The last position reaches the server (it is sent each status
        // interval, a second) before the stream ends.
        let deadline = Instant::now() + Duration::from_secs(3);
        while client.is_running()
            && client.feedback_pending_since().is_some()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client.stop();
        let _ = tokio::time::timeout(Duration::from_secs(3), client.shutdown()).await;
        result
    }

    /// Once a second: the lag gauges (`oldest`: when the oldest transaction
    /// not yet confirmed committed); each horizon interval, the horizons
    /// passed by `acked` and a new one.
    async fn tick(
        &self,
        oldest: Option<DateTime<Utc>>,
        acked: Lsn,
        horizons: &Horizons,
        next_horizon: &mut Instant,
    ) -> Result<(), WalError> {
        let age = oldest.map_or(0.0, |t| {
            (Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3
        });
        self.metrics.lag_seconds.set(age);
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.slot())
        .fetch_optional(self.pool())
        .await?
        .flatten();
        self.metrics.lag_bytes.set(bytes.unwrap_or(0));
        if Instant::now() >= *next_horizon {
            *next_horizon = Instant::now() + self.horizon_interval;
            let retention = self.relay.config.retention().as_secs_f64();
            if !acked.is_zero() {
                let acked = acked.to_pg_string();
                horizons
                    .pass(self.pool(), self.slot(), &acked, retention)
                    .await?;
            }
            horizons.take(self.pool(), self.slot()).await?;
        }
        Ok(())
    }
}

enum Step {
    Cancelled,
    Settled(Settled),
    Event(pgwire_replication::Result<Option<ReplicationEvent>>),
    Tick,
}
