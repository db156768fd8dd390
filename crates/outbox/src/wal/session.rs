//! One session of the WAL relay: a replication stream from the slot's
//! confirmed position and a publisher, until either fails or the relay is
//! cancelled.
//!
//! Transactions are published in batches, one batch per free lane: while
//! the lanes are busy, the transactions received meanwhile make the next
//! batch (up to the batch size; past it the stream is not read, and the
//! server waits). Batches settle in any order; the position told to
//! Postgres advances over the transactions whose batches, and every
//! earlier one's, have settled.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use pgwire_replication::{FeedbackObserver, Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use outbox_common::shutdown::Backoff;

use super::horizons::Horizons;
use super::pgoutput::{Change, Decoder};
use super::{WalError, WalRelay};
use crate::PublishedBatch;
use crate::confirms::{Failed, PublishFailure};
use crate::publisher::Publisher;
use crate::rows::OutboxRow;

/// Microseconds from the Unix epoch to Postgres's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A transaction received: where it ends, when it committed, and the batch
/// that publishes its rows.
struct Commit {
    end: Lsn,
    committed_at: DateTime<Utc>,
    batch: u64,
}

/// A batch's lane and how its confirms settled.
type Settled = (u64, usize, PublishedBatch);

/// The state of one session.
struct Stream<'a> {
    relay: &'a WalRelay,
    publisher: &'a Publisher,
    window: Arc<Semaphore>,
    decoder: Decoder,
    /// Rows of the transaction being received.
    in_tx: Option<Vec<OutboxRow>>,
    /// Rows of the batch being gathered (number `next`).
    gathering: Vec<OutboxRow>,
    next: u64,
    commits: VecDeque<Commit>,
    settled: HashSet<u64>,
    free: Vec<usize>,
    in_flight: FuturesUnordered<BoxFuture<'static, Settled>>,
    /// The position last given to Postgres.
    acked: Lsn,
}

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
        let mut stream = Stream {
            relay: self,
            publisher,
            window: Arc::new(Semaphore::new(self.relay.config.confirm_window())),
            decoder: Decoder::new(table as u32),
            in_tx: None,
            gathering: Vec::new(),
            next: 0,
            commits: VecDeque::new(),
            settled: HashSet::new(),
            free: (0..publisher.lanes()).rev().collect(),
            in_flight: FuturesUnordered::new(),
            acked: Lsn::ZERO,
        };
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
        let age = oldest.map_or(0.0, |t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1e3);
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
                horizons.pass(self.pool(), self.slot(), &acked, retention).await?;
            }
            horizons.take(self.pool(), self.slot()).await?;
        }
        Ok(())
    }
}

impl Stream<'_> {
    fn receive(&mut self, event: ReplicationEvent) -> Result<(), WalError> {
        match event {
            ReplicationEvent::Begin { .. } => self.in_tx = Some(Vec::new()),
            ReplicationEvent::XLogData { data, .. } => {
                if let Change::Row(row) = self.decoder.decode(&data)? {
                    self.in_tx.get_or_insert_with(Vec::new).push(*row);
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let rows = self.in_tx.take().unwrap_or_default();
                let committed_at =
                    DateTime::from_timestamp_micros(commit_time_micros + POSTGRES_EPOCH_MICROS)
                        .unwrap_or_else(Utc::now);
                self.gathering.extend(rows);
                self.commits.push_back(Commit {
                    end: end_lsn,
                    committed_at,
                    batch: self.next,
                });
            }
            // Nothing received is unconfirmed, and no transaction is open:
            // the server's position can be acknowledged as it is.
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.in_tx.is_none() && self.commits.is_empty() && wal_end > self.acked {
                    self.commits.push_back(Commit {
                        end: wal_end,
                        committed_at: Utc::now(),
                        batch: self.next,
                    });
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Starts the batch being gathered on a free lane; a batch of no rows
    /// (empty transactions, a keepalive) is settled at once.
    fn start_batch(&mut self) {
        let has_commits = self.commits.back().is_some_and(|c| c.batch == self.next);
        if !has_commits {
            return;
        }
        if self.gathering.is_empty() {
            self.settled.insert(self.next);
            self.next += 1;
            return;
        }
        let Some(lane) = self.free.pop() else {
            return;
        };
        let (number, rows) = (self.next, std::mem::take(&mut self.gathering));
        self.next += 1;
        let relay = self.relay.relay.clone();
        let publisher = self.publisher.on_lane(lane);
        let window = self.window.clone();
        self.in_flight.push(Box::pin(async move {
            let published = relay.publish_rows(&rows, &publisher, Some(&window)).await;
            (number, lane, published)
        }));
    }

    /// A batch's confirms: refused rows go to the polling relay, and the
    /// batch counts as settled. Rows the broker did not confirm end the
    /// session (the next one sends them again).
    async fn settle(&mut self, (number, lane, batch): Settled) -> Result<(), WalError> {
        self.free.push(lane);
        let settlement = &batch.settlement;
        if !settlement.unconfirmed.is_empty() {
            return Err(WalError::Unconfirmed(settlement.unconfirmed.len()));
        }
        let refused: Vec<Failed> = settlement
            .failed
            .iter()
            .chain(&settlement.returned_elsewhere)
            .cloned()
            .collect();
        if !refused.is_empty() {
            let relay = &self.relay.relay;
            let mut conn = relay.pool.acquire().await?;
            relay.table.mark_failed(&mut conn, &refused).await?;
            self.relay.metrics.handed_off.inc_by(refused.len() as u64);
            relay.metrics.failed.inc_by(refused.len() as u64);
            tracing::warn!(
                rows = refused.len(),
                error = %refused[0].error,
                "refused by the broker: handed to the polling relay"
            );
            // As the polling relay does: a broker that nacks keeps nothing
            // of a channel worth keeping.
            if refused.iter().any(|f| f.error == PublishFailure::Nacked) {
                self.publisher.retire();
            }
        }
        let published = settlement.published.len() as u64;
        self.relay.relay.metrics.published.inc_by(published);
        self.settled.insert(number);
        Ok(())
    }

    /// The end of the last transaction whose batch, and every earlier
    /// one's, has settled, if it is further than what Postgres was told.
    fn advance(&mut self) -> Option<Lsn> {
        let mut last = None;
        while let Some(front) = self.commits.front() {
            if !self.settled.contains(&front.batch) {
                break;
            }
            last = Some(front.end);
            self.commits.pop_front();
        }
        match self.commits.front() {
            Some(front) => {
                let oldest = front.batch;
                self.settled.retain(|b| *b >= oldest);
            }
            None => self.settled.clear(),
        }
        let lsn = last.filter(|lsn| *lsn > self.acked)?;
        self.acked = lsn;
        Some(lsn)
    }
}

enum Step {
    Cancelled,
    Settled(Settled),
    Event(pgwire_replication::Result<Option<ReplicationEvent>>),
    Tick,
}
