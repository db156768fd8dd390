//! The relay: moves due outbox rows to RabbitMQ with publisher confirms,
//! many in flight, each row marked by its own confirm. Its pieces: the
//! [`super::publisher`], the pure [`super::confirms`] settlement, the
//! [`super::batch`], and the [`super::scheduler`] that `run` and `drain`
//! drive. Pruning and the LISTEN wake-up are tasks of their own.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use outbox_common::amqp::{AmqpConfig, BrokerError, StartError, Subscription};
use outbox_common::shutdown::{Backoff, sleep_or_cancel};
use outbox_common::sqlstate::{ErrorKind, classify};
use outbox_common::wake::Wake;

use crate::batch::BatchOutcome;
use crate::publisher::Publisher;
use crate::scheduler::{BatchEnd, Batches, State};
use crate::{RelayConfig, RelayMetrics, Table};

/// Why a relay batch failed. Its rows stay due, and are tried again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The claim (or its transaction's start) failed.
    #[error("claiming outbox rows: {0}")]
    Claim(#[source] sqlx::Error),
    /// Marking the rows by their confirms failed.
    #[error("marking rows: {0}")]
    Mark(#[source] sqlx::Error),
    /// The batch's commit failed: its rows stay due.
    #[error("committing the batch: {0}")]
    Commit(#[source] sqlx::Error),
    /// Rows another batch's confirms returned could not be made due again.
    #[error("making returned rows of other batches due again: {0}")]
    Reopen(#[source] sqlx::Error),
    /// The batch's task panicked.
    #[error("the batch panicked: {0}")]
    Panicked(String),
}

/// Why a publisher could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// No broker connection (only when cancelled, or on a refusal).
    #[error(transparent)]
    Connect(#[from] StartError),
    /// A channel or the topology could not be declared.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl RelayError {
    /// How Postgres failed, if it did ([`classify`]).
    pub fn database_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Claim(e) | Self::Mark(e) | Self::Commit(e) | Self::Reopen(e) => Some(classify(e)),
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

/// Moves the rows of one outbox [`Table`] to RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    pub(crate) pool: PgPool,
    pub(crate) table: Table,
    pub(crate) amqp: AmqpConfig,
    pub(crate) config: RelayConfig,
    pub(crate) metrics: Arc<RelayMetrics>,
    /// Signalled after commits that wrote outbox rows (in-process writers,
    /// and the LISTEN task for writers in other processes).
    wake: Wake,
    /// The queues declared before anything is published.
    subscriptions: Vec<Subscription>,
}

impl Relay {
    /// A relay of `table`'s rows to `amqp`'s exchange, with the default
    /// [`RelayConfig`], metrics registered nowhere, no subscriptions and a
    /// wake-up of its own.
    pub fn new(pool: PgPool, table: Table, amqp: AmqpConfig) -> Self {
        Self {
            pool,
            table,
            amqp,
            config: RelayConfig::default(),
            metrics: Arc::new(RelayMetrics::default()),
            wake: Wake::default(),
            subscriptions: Vec::new(),
        }
    }

    /// How it claims and publishes.
    pub fn with_config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Where it counts.
    pub fn with_metrics(mut self, metrics: RelayMetrics) -> Self {
        self.metrics = Arc::new(metrics);
        self
    }

    /// The wake-up that writers signal after a commit.
    pub fn with_wake(mut self, wake: Wake) -> Self {
        self.wake = wake;
        self
    }

    /// The consumers' queues, declared before anything is published, so no
    /// event is published before the queues that take it exist.
    pub fn with_subscriptions(mut self, subscriptions: Vec<Subscription>) -> Self {
        self.subscriptions = subscriptions;
        self
    }

    /// The wake-up this relay waits on.
    pub fn wake(&self) -> &Wake {
        &self.wake
    }

    /// Its settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }
    /// Opens a publisher with this relay's topology and a lane for each
    /// batch that may be open.
    pub async fn publisher(&self, cancel: &CancellationToken) -> Result<Publisher, PublisherError> {
        let lanes = self.config.batches_open();
        Publisher::open_lanes(&self.amqp, &self.subscriptions, lanes, cancel).await
    }

    /// Runs until `cancel` fires. A wake-up (in-process, a NOTIFY or the poll
    /// interval) starts a batch at once unless `workers + 2` are open, even
    /// while other batches wait for their confirms; a batch that comes back
    /// full keeps every batch open until the backlog is gone. Reconnects to
    /// RabbitMQ and Postgres with backoff and never returns an error for
    /// their outages. On cancel, the batches in hand finish.
    pub async fn run(self, cancel: CancellationToken) {
        let poll = self.config.poll_interval();
        let mut backoff = Backoff::default();
        let mut publisher: Option<Publisher> = None;
        let mut batches = Batches::new(&self.config);
        // Claim at once at start: rows may have waited while the relay was down.
        let mut state = State::Backlog;
        tracing::info!(exchange = %self.amqp.exchange(), table = self.table.name(), "relay started");
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
        batches.reopen.finish(&self.pool, &self.table).await;
        if let Some(p) = publisher {
            p.close().await;
        }
        tracing::info!("relay stopped");
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
        batches.reopen.finish(&self.pool, &self.table).await;
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
        result: Result<BatchOutcome, RelayError>,
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
                state.ended(BatchEnd::Failed, backoff.next_delay(), now)
            }
            Ok(outcome) => {
                backoff.reset();
                state.ended(BatchEnd::Done(outcome), Duration::ZERO, now)
            }
            Err(error) => {
                tracing::warn!(%error, kind = ?error.database_kind(), "relay batch failed; will retry");
                state.ended(BatchEnd::Failed, backoff.next_delay(), now)
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
                sleep_or_cancel(backoff.next_delay(), cancel).await;
                None
            }
        }
    }
}
