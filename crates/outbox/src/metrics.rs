//! The relay's metrics and an outbox table's gauges, registered in a
//! registry the service gives. Names: `relay_published`, `relay_failed`,
//! `relay_confirm_duration_seconds`, `relay_batch_duration_seconds`, and
//! per table `<prefix>_pending_rows`, `<prefix>_oldest_pending_age_seconds`,
//! `<prefix>_failed_rows`, `<prefix>_given_up_rows`.

use std::sync::atomic::AtomicU64;

use outbox_common::metrics::latency_histogram;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::rows::OutboxStatus;

type FloatGauge = Gauge<f64, AtomicU64>;

/// What a relay counts. [`RelayMetrics::default`] is registered nowhere
/// (for a relay whose figures nobody scrapes, or a test).
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    /// Rows confirmed by the broker.
    pub published: Counter,
    /// Publishes nacked or returned.
    pub failed: Counter,
    /// From a publish to its confirm.
    pub confirm_latency: Histogram,
    /// One batch, from its claim to its last confirm.
    pub batch_latency: Histogram,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self {
            published: Counter::default(),
            failed: Counter::default(),
            confirm_latency: latency_histogram(),
            batch_latency: latency_histogram(),
        }
    }
}

impl RelayMetrics {
    /// The relay's metrics, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        registry.register(
            "relay_published",
            "Outbox rows confirmed by the broker",
            this.published.clone(),
        );
        registry.register(
            "relay_failed",
            "Publishes nacked or returned (the row is retried later with backoff)",
            this.failed.clone(),
        );
        registry.register(
            "relay_confirm_duration_seconds",
            "From a publish to its confirm",
            this.confirm_latency.clone(),
        );
        registry.register(
            "relay_batch_duration_seconds",
            "A relay batch, from its first publish to its last confirm",
            this.batch_latency.clone(),
        );
        this
    }
}

/// The gauges of one outbox table, set from [`crate::Table::status`] when
/// the service is scraped.
#[derive(Debug, Clone, Default)]
pub struct OutboxGauges {
    /// Rows not yet published (given-up ones excluded).
    pub pending: Gauge,
    /// Age of the oldest of them: the lag.
    pub oldest_pending_age: FloatGauge,
    /// Unpublished rows with an error.
    pub failed: Gauge,
    /// Rows given up on.
    pub given_up: Gauge,
}

impl OutboxGauges {
    /// The gauges of the table whose rows `what` names (`outbox rows`,
    /// say), registered under `prefix` (`outbox`: `outbox_pending_rows`...).
    pub fn register(registry: &mut Registry, prefix: &str, what: &str) -> Self {
        let this = Self::default();
        registry.register(
            format!("{prefix}_pending_rows"),
            format!("{what} not yet published (given-up ones excluded)"),
            this.pending.clone(),
        );
        registry.register(
            format!("{prefix}_oldest_pending_age_seconds"),
            format!("Age of the oldest of the {what} not yet published (the lag)"),
            this.oldest_pending_age.clone(),
        );
        registry.register(
            format!("{prefix}_failed_rows"),
            format!("{what} not yet published, with an error"),
            this.failed.clone(),
        );
        registry.register(
            format!("{prefix}_given_up_rows"),
            format!("{what} given up on"),
            this.given_up.clone(),
        );
        this
    }

    /// Sets the gauges from a table's status.
    pub fn set(&self, status: &OutboxStatus) {
        self.pending.set(status.pending);
        self.oldest_pending_age
            .set(status.oldest_pending_age_secs.unwrap_or(0.0));
        self.failed.set(status.with_errors);
        self.given_up.set(status.given_up);
    }
}
