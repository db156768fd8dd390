//! The views of the registry that the roles hold: one consumer's series,
//! and one outbox table's gauges.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

type FloatGauge = Gauge<f64, AtomicU64>;

/// What one consumer reports. Each field is that consumer's series of a
/// family labelled `queue`.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    pub processed: Counter,
    pub duplicates: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    /// Deliveries left for redelivery because Postgres or the broker failed.
    pub requeued: Counter,
    /// Postgres transactions committed (one per batch of deliveries).
    pub transactions: Counter,
    /// Time to handle a batch, per delivery.
    pub handling: Histogram,
    /// From the event's outbox write to this consumer's commit.
    pub event_age: Histogram,
    /// Messages in the consumer's dead-letter queue, sampled.
    pub dead_letters: Gauge,
}

/// The gauges of one outbox table, read from Postgres at each scrape.
#[derive(Debug, Clone, Default)]
pub struct OutboxGauges {
    pub pending: Gauge,
    pub oldest_pending_age: FloatGauge,
    pub failed: Gauge,
    pub given_up: Gauge,
}

impl OutboxGauges {
    pub fn set(&self, status: &crate::outbox::store::OutboxStatus) {
        self.pending.set(status.pending);
        self.oldest_pending_age
            .set(status.oldest_pending_age_secs.unwrap_or(0.0));
        self.failed.set(status.with_errors);
        self.given_up.set(status.given_up);
    }
}
