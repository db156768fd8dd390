//! What one session holds between the stream and the broker: the
//! transaction being received, the batch being gathered, the batches in
//! flight, and the transactions whose end may be told to Postgres once
//! their batches, and every earlier one's, have settled.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use pgwire_replication::{Lsn, ReplicationEvent};
use tokio::sync::Semaphore;

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
pub(super) struct Commit {
    end: Lsn,
    pub(super) committed_at: DateTime<Utc>,
    batch: u64,
}

/// A batch's lane and how its confirms settled.
pub(super) type Settled = (u64, usize, PublishedBatch);

/// The state of one session.
pub(super) struct Stream<'a> {
    pub(super) relay: &'a WalRelay,
    pub(super) publisher: &'a Publisher,
    pub(super) window: Arc<Semaphore>,
    pub(super) decoder: Decoder,
    /// Rows of the transaction being received.
    pub(super) in_tx: Option<Vec<OutboxRow>>,
    /// Its transaction id (32 bits, as the stream gives it).
    pub(super) in_tx_xid: u32,
    /// The ids of the gathered batch's transactions with rows.
    pub(super) gathering_xids: Vec<i64>,
    /// Rows of the batch being gathered (number `next`).
    pub(super) gathering: Vec<OutboxRow>,
    pub(super) next: u64,
    pub(super) commits: VecDeque<Commit>,
    pub(super) settled: HashSet<u64>,
    pub(super) free: Vec<usize>,
    pub(super) in_flight: FuturesUnordered<BoxFuture<'static, Settled>>,
    /// The position last given to Postgres.
    pub(super) acked: Lsn,
}

impl<'a> Stream<'a> {
    /// A session's state over `relay`'s `publisher`, for the outbox table
    /// of oid `table`.
    pub(super) fn new(relay: &'a WalRelay, publisher: &'a Publisher, table: u32) -> Self {
        Self {
            relay,
            publisher,
            window: Arc::new(Semaphore::new(relay.relay.config.confirm_window())),
            decoder: Decoder::new(table),
            in_tx: None,
            in_tx_xid: 0,
            gathering_xids: Vec::new(),
            gathering: Vec::new(),
            next: 0,
            commits: VecDeque::new(),
            settled: HashSet::new(),
            free: (0..publisher.lanes()).rev().collect(),
            in_flight: FuturesUnordered::new(),
            acked: Lsn::ZERO,
        }
    }

    pub(super) fn receive(&mut self, event: ReplicationEvent) -> Result<(), WalError> {
        match event {
            ReplicationEvent::Begin { xid, .. } => {
                self.in_tx = Some(Vec::new());
                self.in_tx_xid = xid;
            }
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
                if !rows.is_empty() {
                    self.gathering_xids.push(i64::from(self.in_tx_xid));
                }
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
    pub(super) fn start_batch(&mut self) {
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
        let xids = std::mem::take(&mut self.gathering_xids);
        self.next += 1;
        let relay = self.relay.relay.clone();
        let publisher = self.publisher.on_lane(lane);
        let window = self.window.clone();
        self.in_flight.push(Box::pin(async move {
            if let Err(error) = super::visible::wait_until_visible(&relay.pool, &xids).await {
                tracing::warn!(%error, "WAL relay: the batch's transactions are not known visible");
                return (number, lane, not_sent(&rows));
            }
            let published = relay.publish_rows(&rows, &publisher, Some(&window)).await;
            (number, lane, published)
        }));
    }

    /// A batch's confirms: refused rows go to the polling relay, and the
    /// batch counts as settled. Rows the broker did not confirm end the
    /// session (the next one sends them again).
    pub(super) async fn settle(&mut self, (number, lane, batch): Settled) -> Result<(), WalError> {
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
    pub(super) fn advance(&mut self) -> Option<Lsn> {
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

/// A batch not published: every row unconfirmed, so the session ends and
/// the next one sends them again.
fn not_sent(rows: &[OutboxRow]) -> PublishedBatch {
    let mut batch = PublishedBatch {
        claimed: rows.len(),
        ..PublishedBatch::default()
    };
    batch.settlement.unconfirmed = rows.iter().map(|r| r.transaction_id).collect();
    batch
}
