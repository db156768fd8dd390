//! The relay's scheduler: when to start a batch, as a named [`State`], and
//! the batches in flight ([`Batches`]). Both [`super::Relay::run`] and
//! [`super::Relay::drain`] drive it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use outbox_common::shutdown::panic_text;

use crate::batch::{BatchOutcome, Reopen};
use crate::publisher::Publisher;
use crate::{Relay, RelayConfig, RelayError};

/// How a batch ended, for the scheduler: what it did, or a failure (an
/// error, or publishes the broker did not confirm) after which new batches
/// hold for a backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// The batch committed.
    Done(BatchOutcome),
    /// The batch failed, or left publishes unconfirmed.
    Failed,
}

/// Whether the scheduler should start a batch now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing known to be due: wait for a wake-up, the poll or a batch's end.
    Idle,
    /// Woken (a commit, a NOTIFY, the poll): start one batch.
    Due,
    /// Batches come back full: keep every batch open until one is not.
    Backlog,
    /// A batch failed: start none before `until`; those in flight carry on.
    Holding { until: Instant },
    /// Start nothing more; let the batches in flight end (a drain that failed).
    Stopping,
}

impl State {
    /// Whether a batch may start at `now`.
    pub fn may_start(self, now: Instant) -> bool {
        match self {
            Self::Due | Self::Backlog => true,
            Self::Holding { until } => now >= until,
            Self::Idle | Self::Stopping => false,
        }
    }

    /// After a batch started: a wake-up starts one; a backlog opens them all.
    pub fn started(self) -> Self {
        match self {
            Self::Due | Self::Holding { .. } => Self::Idle,
            other => other,
        }
    }

    /// A wake-up or the poll: something may be due.
    pub fn woken(self) -> Self {
        match self {
            Self::Idle => Self::Due,
            other => other,
        }
    }

    /// After a batch ended: a full one means a backlog; one that was not
    /// full ends it; a failure holds new batches for `hold`.
    pub fn ended(self, end: BatchEnd, hold: Duration, now: Instant) -> Self {
        match (self, end) {
            (Self::Stopping, _) => Self::Stopping,
            (_, BatchEnd::Failed) => Self::Holding { until: now + hold },
            (_, BatchEnd::Done(outcome)) if outcome.full => Self::Backlog,
            (Self::Backlog, BatchEnd::Done(_)) => Self::Idle,
            (other, BatchEnd::Done(_)) => other,
        }
    }
}

/// The batches in flight: at most `workers + 2` claim transactions open,
/// and between them at most `batch_size × workers` publishes awaiting
/// confirms (the confirm window). Each publish takes a permit of the window
/// and gives it back with its confirm, so the window rolls as in a raw
/// publish loop. The two extra batches keep the window full: while one
/// batch marks and commits and the next claims, a third has claimed rows
/// waiting for permits. With one extra batch, a fifth of the window sat
/// empty in a backlog (sampled: 300 of 1,500 permits free on average,
/// against 100 with two). Batches make progress
/// only while [`Batches::next`] is polled, so every wait of the scheduler
/// includes it: one task drives every batch, as the raw publish loop it is
/// measured against does.
///
/// Each open batch publishes on a lane (channel) of the publisher that no
/// other open batch uses, so a return rides on an ack of its own batch:
/// the broker sends `basic.return` before the message's ack, on the
/// message's channel, and a batch ends once all its acks are in, or else
/// (an outage: publishes left unconfirmed) retires the publisher, so that
/// no later batch publishes on a lane with acks still to come.
pub(super) struct Batches {
    window: Arc<Semaphore>,
    pub(super) reopen: Reopen,
    /// Which lanes an open batch holds: one place for each batch that may
    /// be open.
    busy: Vec<bool>,
    set: FuturesUnordered<BoxFuture<'static, (usize, Result<BatchOutcome, RelayError>)>>,
}

impl Batches {
    pub(super) fn new(config: &RelayConfig) -> Self {
        Self {
            window: Arc::new(Semaphore::new(config.confirm_window())),
            reopen: Reopen::default(),
            busy: vec![false; config.batches_open()],
            set: FuturesUnordered::new(),
        }
    }

    /// Starts a batch on a free lane unless `workers + 2` batches, or as
    /// many as the publisher has lanes, are open already. A batch that
    /// panics ends as a failed batch: its transaction is dropped, so its
    /// rows stay due, and the relay carries on.
    pub(super) fn start(&mut self, relay: &Relay, publisher: &Publisher) -> bool {
        let lanes = self.busy.len().min(publisher.lanes());
        let Some(lane) = (0..lanes).find(|&lane| !self.busy[lane]) else {
            return false;
        };
        let (relay, publisher) = (relay.clone(), publisher.on_lane(lane));
        let (window, reopen) = (self.window.clone(), self.reopen.clone());
        self.push(lane, async move {
            relay.run_batch(&publisher, Some(window), &reopen).await
        });
        true
    }

    /// Adds a batch on `lane` to those in flight, a panic in it caught as
    /// its error.
    fn push<F>(&mut self, lane: usize, batch: F)
    where
        F: Future<Output = Result<BatchOutcome, RelayError>> + Send + 'static,
    {
        self.busy[lane] = true;
        self.set
            .push(Box::pin(AssertUnwindSafe(batch).catch_unwind().map(
                move |result| {
                    let result = result
                        .unwrap_or_else(|panic| Err(RelayError::Panicked(panic_text(&*panic))));
                    (lane, result)
                },
            )));
    }

    /// The next batch to end, its lane free again; `None` when none is in
    /// flight.
    pub(super) async fn next(&mut self) -> Option<Result<BatchOutcome, RelayError>> {
        let (lane, result) = self.set.next().await?;
        self.busy[lane] = false;
        Some(result)
    }

    /// Waits for every batch in flight to end (each is bounded by its
    /// confirms' timeout), logging failures: their rows stay due.
    pub(super) async fn finish(&mut self) {
        while let Some(result) = self.next().await {
            if let Err(error) = result {
                tracing::warn!(%error, "relay batch failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(full: bool) -> BatchEnd {
        BatchEnd::Done(BatchOutcome {
            full,
            ..Default::default()
        })
    }

    #[test]
    fn a_wake_up_starts_one_batch_and_a_full_batch_opens_them_all() {
        let now = Instant::now();
        let hold = Duration::from_secs(1);
        let state = State::Idle.woken();
        assert!(state.may_start(now));
        let state = state.started();
        assert_eq!(state, State::Idle);
        let state = state.ended(outcome(true), hold, now);
        assert_eq!(state, State::Backlog);
        assert_eq!(state.started(), State::Backlog);
        assert_eq!(state.ended(outcome(false), hold, now), State::Idle);
    }

    #[test]
    fn a_failed_batch_holds_new_batches_until_its_backoff_has_passed() {
        let now = Instant::now();
        let hold = Duration::from_secs(1);
        let state = State::Backlog.ended(BatchEnd::Failed, hold, now);
        assert!(!state.may_start(now));
        assert!(state.may_start(now + hold));
        // A wake-up during the hold does not cut it short.
        assert_eq!(state.woken(), state);
        assert_eq!(state.started(), State::Idle);
    }

    #[tokio::test]
    async fn a_batch_that_panics_ends_as_a_failed_batch_and_the_others_carry_on() {
        let mut batches = Batches::new(&RelayConfig::default());
        batches.push(0, async { panic!("a bug in a batch") });
        batches.push(1, async { Ok(BatchOutcome::default()) });
        let mut results = Vec::new();
        while let Some(result) = batches.next().await {
            results.push(result);
        }
        assert_eq!(results.len(), 2, "both batches end");
        assert!(!batches.busy.contains(&true), "their lanes are free again");
        let panicked = results
            .iter()
            .find_map(|r| match r {
                Err(RelayError::Panicked(message)) => Some(message.clone()),
                _ => None,
            })
            .expect("the panic is a failed batch");
        assert_eq!(panicked, "a bug in a batch");
        assert!(results.iter().any(|r| r.is_ok()));
        // The scheduler treats it as any failed batch: it holds, then goes on.
        let now = Instant::now();
        let state = State::Backlog.ended(BatchEnd::Failed, Duration::from_millis(10), now);
        assert!(state.may_start(now + Duration::from_millis(10)));
    }

    #[test]
    fn a_stopping_scheduler_starts_nothing_more() {
        let now = Instant::now();
        let state = State::Stopping.ended(outcome(true), Duration::ZERO, now);
        assert_eq!(state, State::Stopping);
        assert!(!state.woken().may_start(now));
    }
}
