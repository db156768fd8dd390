//! The WAL relay: publishes the outbox's committed inserts from a logical
//! replication slot (`pgoutput`), with no claim and no `UPDATE` per row.
//!
//! It reads the slot through `pgwire-replication`, decodes each insert of
//! the outbox table into the row the polling relay would have claimed
//! (the `pgoutput` module), and publishes whole transactions on the polling relay's
//! [`Publisher`](crate::Publisher): the same lanes, confirm window, properties, headers and
//! PRODUCER spans. A batch is the transactions received while the lanes
//! were busy, so batches grow with the load. Postgres is told a position
//! (the flush LSN) only at the end of a transaction all of whose rows, and
//! those of every earlier one, the broker confirmed: never a single
//! event's LSN (Debezium lost rows that way, debezium#7531). With nothing
//! to publish, the keepalive's position is acknowledged, so an idle
//! outbox does not hold back WAL.
//!
//! A row the broker refuses (nacked, or returned unroutable) does not stall
//! the slot: it is handed to the polling relay, which runs beside this one,
//! by the polling relay's own failure mark (`published_at` NULL, an
//! attempt, its error, a backoff). A broker that confirms nothing in time,
//! a lost connection or an outage of Postgres ends the session: the next
//! one restarts from the slot's confirmed position and sends again what
//! was not confirmed (duplicates, which the consumers deduplicate).
//!
//! One reader per slot: Postgres refuses a second reader of an active slot,
//! so a second WAL relay waits, and takes over when the first one's
//! connection ends. See [`setup`] for what the relay makes at its start,
//! and [`horizons`] for retention without a mark per row.

pub mod horizons;
mod pgoutput;
mod session;
pub mod setup;
mod status;
mod stream;
mod visible;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use pgwire_replication::{Lsn, ReplicationConfig, SslMode, TlsConfig};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use outbox_common::shutdown::{Backoff, sleep_or_cancel};

pub use pgoutput::DecodeError;
pub use setup::Setup;
pub use status::{SlotStatus, slots};

use crate::{PublisherError, Relay};

/// The replication session's settings that the decoder relies on: ISO
/// timestamps in UTC, whatever the server's defaults.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC";

/// Why the WAL relay stopped or restarts its session.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A setting is wrong: a clear stop at start.
    #[error("{0}")]
    Config(String),
    /// A statement failed.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// The replication stream failed or refused (a busy slot, say).
    #[error("replication stream: {0}")]
    Stream(#[from] pgwire_replication::PgWireError),
    /// A message of the stream could not be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// No broker connection.
    #[error(transparent)]
    Publisher(#[from] PublisherError),
    /// The broker confirmed nothing in time for some rows: they are sent
    /// again by the next session.
    #[error("the broker did not confirm {0} rows in time")]
    Unconfirmed(usize),
    /// Another session reads the slot.
    #[error("another WAL relay reads the slot")]
    SlotBusy,
    /// The server ended the stream.
    #[error("the replication stream ended")]
    StreamEnded,
    /// The broker connection or a channel failed, or a nack retired them.
    #[error("the publisher's connection or a channel is gone")]
    PublisherLost,
}

/// The WAL relay's gauges and counters.
#[derive(Debug, Clone, Default)]
pub struct WalMetrics {
    /// Bytes of WAL between the server's position and the slot's confirmed one.
    pub lag_bytes: Gauge,
    /// Age of the oldest transaction received and not yet confirmed (0 when
    /// every one is).
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Rows handed to the polling relay after a refusal.
    pub handed_off: Counter,
}

impl WalMetrics {
    /// Registers them as `outbox_wal_lag_bytes`, `outbox_wal_lag_seconds`
    /// and `outbox_wal_handed_off_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        registry.register(
            "outbox_wal_lag_bytes",
            "WAL bytes between the server's position and the WAL relay's slot",
            this.lag_bytes.clone(),
        );
        registry.register(
            "outbox_wal_lag_seconds",
            "Age of the oldest transaction the WAL relay received and the broker has not confirmed",
            this.lag_seconds.clone(),
        );
        registry.register(
            "outbox_wal_handed_off",
            "Rows the broker refused, handed by the WAL relay to the polling relay",
            this.handed_off.clone(),
        );
        this
    }
}

/// Publishes a [`Relay`]'s table from a logical slot. Cheap to clone.
#[derive(Clone)]
pub struct WalRelay {
    relay: Relay,
    source: ReplicationConfig,
    horizon_interval: Duration,
    metrics: WalMetrics,
}

impl WalRelay {
    /// The WAL relay of `relay`'s table, exchange, subscriptions, settings
    /// and metrics, reading the slot and publication that `source` names
    /// (both plain identifiers) over its connection settings.
    pub fn new(relay: Relay, source: ReplicationConfig) -> Result<Self, WalError> {
        setup::check_name("slot", &source.slot)?;
        for publication in source.publication.names() {
            setup::check_name("publication", publication)?;
        }
        if source.publication.names().len() != 1 {
            return Err(WalError::Config(
                "the WAL relay reads one publication".into(),
            ));
        }
        let source = source
            .with_options(SESSION_OPTIONS)
            .with_status_interval(Duration::from_secs(1))
            .with_wakeup_interval(Duration::from_secs(1))
            .with_application_name(format!("outbox wal relay ({})", relay.table.name()));
        Ok(Self {
            relay,
            source,
            horizon_interval: Duration::from_secs(60),
            metrics: WalMetrics::default(),
        })
    }

    /// How often it takes a horizon (see [`horizons`]); a minute by default.
    pub fn with_horizon_interval(mut self, interval: Duration) -> Self {
        self.horizon_interval = interval;
        self
    }

    /// Where it counts.
    pub fn with_metrics(mut self, metrics: WalMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The slot it reads.
    pub fn slot(&self) -> &str {
        &self.source.slot
    }

    fn publication(&self) -> &str {
        &self.source.publication.names()[0]
    }

    fn pool(&self) -> &PgPool {
        &self.relay.pool
    }

    /// Makes what it needs (see [`setup`]); an error is a clear stop.
    pub async fn setup(&self) -> Result<Setup, WalError> {
        setup::run(
            self.pool(),
            self.relay.table.name(),
            self.publication(),
            self.slot(),
        )
        .await
    }

    /// Runs sessions until `cancel` fires: each reads the slot from its
    /// confirmed position. A failed session (an outage, a busy slot) is
    /// followed by another after a backoff; the setup is run again first,
    /// so a dropped slot is made again (and its rows handed back).
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        tracing::info!(
            slot = self.slot(),
            table = self.relay.table.name(),
            "WAL relay started"
        );
        while !cancel.is_cancelled() {
            // A relay that waits for the slot opens nothing meanwhile.
            let result = match setup::slot_in_use(self.pool(), self.slot()).await {
                Ok(true) => Err(WalError::SlotBusy),
                Ok(false) => match self.setup().await {
                    Ok(_) => self.session(&cancel, &mut backoff).await,
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {}
                Err(WalError::SlotBusy) => {
                    tracing::debug!(
                        slot = self.slot(),
                        "another WAL relay reads the slot; waiting"
                    );
                    sleep_or_cancel(Duration::from_secs(1), &cancel).await;
                }
                Err(error) => {
                    tracing::warn!(%error, slot = self.slot(), "WAL relay session ended; will restart");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
        tracing::info!("WAL relay stopped");
    }
}
