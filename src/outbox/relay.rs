//! The relay: moves due outbox rows to RabbitMQ with publisher confirms,
//! many in flight, each row marked by its own confirm. Its pieces: the
//! [`super::publisher`], the pure [`super::confirms`] settlement, the
//! [`super::batch`], and the [`super::scheduler`] that `run` and `drain`
//! drive. Pruning and the LISTEN wake-up are tasks of their own.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::Wake;
use super::publisher::Publisher;
use super::scheduler::{Batches, State};
use crate::amqp::Subscription;
use crate::config::{AmqpConfig, RelayConfig};
use crate::metrics::Metrics;
use crate::shutdown::Backoff;

/// Why a relay batch failed. Its rows stay due, and are tried again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("claiming outbox rows: {0}")]
    Claim(sqlx::Error),
    #[error("marking rows: {0}")]
    Mark(sqlx::Error),
    #[error("committing the batch: {0}")]
    Commit(sqlx::Error),
    #[error("making returned rows of other batches due again: {0}")]
    Reopen(sqlx::Error),
    #[error("the batch panicked: {0}")]
    Panicked(String),
}

impl RelayError {
    /// How Postgres failed, if it did ([`crate::db::classify`]).
    pub fn database_kind(&self) -> Option<crate::db::ErrorKind> {
        match self {
            Self::Claim(e) | Self::Mark(e) | Self::Commit(e) | Self::Reopen(e) => {
                Some(crate::db::classify(e))
            }
            Self::Panicked(_) => None,
        }
    }
}

/// What [`Relay::drain_counted`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Rows published and marked by their own batch.
    pub published: usize,
    /// Rows a batch made due again for another batch.
    pub reopened: usize,
}

/// Moves outbox rows to RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    pub config: RelayConfig,
    pub metrics: Arc<Metrics>,
    /// Signalled after commits that wrote outbox rows (in-process writers,
    /// and the LISTEN task for writers in other processes).
    pub wake: Wake,
    /// The queues declared before anything is published.
    pub subscriptions: Vec<Subscription>,
}

impl Relay {
    /// Opens a publisher with this relay's topology and a lane for each
    /// batch that may be open.
    pub async fn publisher(&self, cancel: &CancellationToken) -> anyhow::Result<Publisher> {
        let lanes = self.config.batches_open();
        Publisher::open_lanes(&self.amqp, &self.subscriptions, lanes, cancel).await
    }

    /// Runs until `cancel` fires. A wake-up (in-process, a NOTIFY or the poll
    /// interval) starts a batch at once unless `workers + 2` are open, even
    /// while other batches wait for their confirms; a batch that comes back
    /// full keeps every batch open until the backlog is gone. Reconnects to
    /// RabbitMQ and Postgres with backoff and never returns an error for
    /// their outages. On cancel, the batches in hand finish.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut backoff = Backoff::default();
        let mut publisher: Option<Publisher> = None;
        let mut batches = Batches::new(&self.config);
        // Claim at once at start: rows may have waited while the relay was down.
        let mut state = State::Backlog;
        tracing::info!(exchange = %self.amqp.exchange, "relay started");
        while !cancel.is_cancelled() {
            let Some(current) = publisher.as_ref().filter(|p| p.is_usable()).cloned() else {
                // The batches on a failed channel end first (their confirms
                // are bounded), then a new one is opened.
                batches.finish().await;
                if let Some(old) = publisher.take() {
                    old.close().await;
                }
                publisher = self.reconnect(&cancel, &mut backoff).await;
                state = state.woken();
                continue;
            };
            let now = tokio::time::Instant::now();
            if state.may_start(now) && batches.start(&self, &current) {
                state = state.started();
                continue;
            }
            let hold = match state {
                State::Holding { until } => Some(until),
                _ => None,
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep_until(hold.unwrap_or(now)), if hold.is_some() => {}
                Some(result) = batches.next() => {
                    state = self.ended(state, result, &mut backoff);
                }
                _ = self.wake.notified() => state = state.woken(),
                _ = tokio::time::sleep(poll) => state = state.woken(),
            }
        }
        batches.finish().await;
        batches.reopen.finish(&self.pool).await;
        if let Some(p) = publisher {
            p.close().await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }

    /// Publishes due rows, with the same batches in flight as [`Relay::run`],
    /// until a batch comes back short (not full), or none may start (a hold
    /// after unconfirmed rows, an unusable publisher), and the batches in
    /// flight have ended: rows that become due meanwhile may be left. Returns
    /// the rows published; the first failed batch is the error, after the
    /// others have ended.
    pub async fn drain(&self, publisher: &Publisher) -> Result<usize, RelayError> {
        Ok(self.drain_counted(publisher).await?.published)
    }

    /// [`Relay::drain`], saying also how many rows of one batch another
    /// batch made due again (a return that rode on its ack).
    pub async fn drain_counted(&self, publisher: &Publisher) -> Result<Drained, RelayError> {
        let mut batches = Batches::new(&self.config);
        let mut backoff = Backoff::default();
        let (mut published, mut reopened) = (0, 0);
        let mut failure = None;
        let mut state = State::Backlog;
        loop {
            let now = tokio::time::Instant::now();
            if publisher.is_usable() && state.may_start(now) && batches.start(self, publisher) {
                state = state.started();
                continue;
            }
            let Some(result) = batches.next().await else {
                break;
            };
            match result {
                Ok(outcome) => {
                    published += outcome.published;
                    reopened += outcome.reopened;
                    state = self.ended(state, Ok(outcome), &mut backoff);
                }
                Err(error) => {
                    tracing::warn!(%error, "relay batch failed; draining stops");
                    failure.get_or_insert(error);
                    state = State::Stopping;
                }
            }
        }
        batches.reopen.finish(&self.pool).await;
        match failure {
            Some(error) => Err(error),
            None => Ok(Drained {
                published,
                reopened,
            }),
        }
    }

    /// The state after a batch ended, logging a failure.
    fn ended(
        &self,
        state: State,
        result: Result<super::batch::BatchOutcome, RelayError>,
        backoff: &mut Backoff,
    ) -> State {
        let now = tokio::time::Instant::now();
        match result {
            // Rows the broker did not confirm: hold like a failed batch.
            Ok(outcome) if outcome.unconfirmed > 0 => {
                tracing::warn!(
                    rows = outcome.unconfirmed,
                    "the broker confirmed no publish in time; holding"
                );
                state.ended(Err(()), backoff.next_delay(), now)
            }
            Ok(outcome) => {
                backoff.reset();
                state.ended(Ok(outcome), Duration::ZERO, now)
            }
            Err(error) => {
                tracing::warn!(%error, kind = ?error.database_kind(), "relay batch failed; will retry");
                state.ended(Err(()), backoff.next_delay(), now)
            }
        }
    }

    async fn reconnect(
        &self,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Option<Publisher> {
        match self.publisher(cancel).await {
            Ok(p) => Some(p),
            Err(error) if cancel.is_cancelled() => {
                tracing::debug!(%error, "relay stopped while connecting");
                None
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "relay could not open a publisher"
                );
                crate::shutdown::sleep_or_cancel(backoff.next_delay(), cancel).await;
                None
            }
        }
    }
}
