//! An outbox whose sink is not RabbitMQ (SMTP, say): the same rows, claims,
//! attempts, backoff and `last_error` as the relay's, with a [`Sink`] that
//! delivers one row at a time, several at once. A row is marked published
//! only after the sink has accepted it; a crash before the commit delivers
//! it again, under the same `transaction_id`, so the sink can recognise it.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use outbox_common::shutdown::{Backoff, sleep_or_cancel};
use outbox_common::wake::Wake;

use crate::Table;
use crate::confirms::{Failed, PublishFailure};
use crate::rows::OutboxRow;

/// Why a sink did not take a row.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Try again later (a 4xx, a refused connection, a timeout).
    #[error("temporary: {0}")]
    Temporary(String),
    /// Never (a 5xx, a malformed row): the row is given up on, the others go on.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Where the rows of an outbox go.
pub trait Sink: Send + Sync + 'static {
    /// Delivers one row; `Ok` only once the other side has accepted it.
    fn deliver(&self, row: &OutboxRow) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows the sink accepted, marked published.
    pub delivered: usize,
    /// Rows refused for now, due again after a backoff.
    pub temporary: usize,
    /// Rows refused for good, given up on.
    pub permanent: usize,
}

/// Claims due rows of `table` and hands them to `sink`.
pub struct Dispatcher<S> {
    pool: PgPool,
    table: Table,
    sink: Arc<S>,
    /// Rows claimed per round.
    batch_size: i64,
    /// Deliveries in flight at once.
    concurrency: usize,
    poll: Duration,
    wake: Wake,
    /// Longest one delivery may take; past it, it is retried (temporary).
    timeout: Duration,
    /// Hands one aggregate's rows over one at a time, in sequence.
    in_sequence_per_aggregate: bool,
}

impl<S: Sink> Dispatcher<S> {
    /// Delivers `table`'s rows to `sink`: by default 8 at once, 16 claimed
    /// a round (two waves, so a round in hand at shutdown ends within two
    /// timeouts), a 1 s poll, 30 s a delivery, a wake-up of its own.
    pub fn new(pool: PgPool, table: Table, sink: S) -> Self {
        Self {
            pool,
            table,
            sink: Arc::new(sink),
            batch_size: 16,
            concurrency: 8,
            poll: Duration::from_secs(1),
            wake: Wake::default(),
            timeout: Duration::from_secs(30),
            in_sequence_per_aggregate: false,
        }
    }

    /// Hands one aggregate's rows to the sink one at a time, in sequence:
    /// a row is delivered only after every earlier row of its
    /// aggregate was accepted (or given up on); different aggregates are
    /// still delivered in parallel
    /// ([`Table::claim_due_in_sequence`]).
    pub fn in_sequence_per_aggregate(mut self) -> Self {
        self.in_sequence_per_aggregate = true;
        self
    }

    /// Deliveries in flight at once (at least 1); a round claims twice as
    /// many rows.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self.batch_size = 2 * self.concurrency as i64;
        self
    }

    /// Rows claimed a round (at least 1).
    pub fn with_batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// The fallback poll when nothing wakes it.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The wake-up that writers signal after a commit.
    pub fn with_wake(mut self, wake: Wake) -> Self {
        self.wake = wake;
        self
    }

    /// The longest one delivery may take; past it, the row is retried.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// One round: claim, deliver each (at most `concurrency` at once), mark
    /// each by its own result, commit.
    pub async fn run_once(&self) -> sqlx::Result<Delivered> {
        let mut tx = self.pool.begin().await?;
        let rows = if self.in_sequence_per_aggregate {
            let claim = self.table.claim_due_in_sequence(&mut tx, self.batch_size);
            claim.await?
        } else {
            self.table.claim_due(&mut tx, self.batch_size).await?
        };
        let deliveries = rows.iter().cloned().map(|row| {
            let (sink, timeout) = (self.sink.clone(), self.timeout);
            async move {
                let result = match tokio::time::timeout(timeout, sink.deliver(&row)).await {
                    Ok(result) => result,
                    Err(_) => Err(SinkError::Temporary(format!(
                        "no answer within {timeout:?}"
                    ))),
                };
                (row, result)
            }
        });
        let results: Vec<(OutboxRow, Result<(), SinkError>)> = stream::iter(deliveries)
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await;
        let mut done = Vec::new();
        let (mut temporary, mut permanent) = (Vec::new(), Vec::new());
        for (row, result) in results {
            match result {
                Ok(()) => done.push(row.id),
                Err(SinkError::Temporary(e)) => temporary.push(failed(&row, e)),
                Err(SinkError::Permanent(e)) => permanent.push(failed(&row, e)),
            }
        }
        self.table.mark_published(&mut tx, &done).await?;
        self.table.mark_failed(&mut tx, &temporary).await?;
        self.table.mark_given_up(&mut tx, &permanent).await?;
        tx.commit().await?;
        Ok(Delivered {
            claimed: rows.len(),
            delivered: done.len(),
            temporary: temporary.len(),
            permanent: permanent.len(),
        })
    }

    /// Runs rounds until `cancel`: at once while they come back full, else
    /// on a wake-up or the poll. A round in hand finishes before it stops
    /// (each delivery is bounded by the sink's own timeout).
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::default();
        tracing::info!(table = self.table.name(), "dispatcher started");
        while !cancel.is_cancelled() {
            match self.run_once().await {
                Ok(round) => {
                    backoff.reset();
                    if round.claimed as i64 >= self.batch_size {
                        continue;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.poll) => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, table = self.table.name(), "dispatch round failed; will retry");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
        tracing::info!(table = self.table.name(), "dispatcher stopped");
    }
}

fn failed(row: &OutboxRow, error: String) -> Failed {
    Failed {
        transaction_id: row.transaction_id,
        error: PublishFailure::Sink(error),
    }
}
