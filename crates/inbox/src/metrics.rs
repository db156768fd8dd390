//! The consumers' metrics, families labelled `queue`, registered in a
//! registry the service gives: `consumer_processed`, `consumer_duplicates`,
//! `consumer_retried`, `consumer_dead_lettered`, `consumer_requeued`,
//! `consumer_transactions`, `consumer_handling_duration_seconds`,
//! `consumer_event_age_seconds` and `dead_letter_queue_messages`.

use outbox_common::metrics::latency_histogram;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

type Histograms = Family<QueueLabel, Histogram, fn() -> Histogram>;

/// The families every consumer of a process reports into, one series per
/// queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConsumerFamilies {
    processed: Family<QueueLabel, Counter>,
    duplicates: Family<QueueLabel, Counter>,
    retried: Family<QueueLabel, Counter>,
    dead_lettered: Family<QueueLabel, Counter>,
    requeued: Family<QueueLabel, Counter>,
    transactions: Family<QueueLabel, Counter>,
    handling: Histograms,
    event_age: Histograms,
    dead_letters: Family<QueueLabel, Gauge>,
    held: Family<QueueLabel, Counter>,
    held_events: Family<QueueLabel, Gauge>,
    held_oldest: Family<QueueLabel, FloatGauge>,
}

impl Default for ConsumerFamilies {
    /// Families registered nowhere (a consumer whose figures nobody reads).
    fn default() -> Self {
        Self {
            processed: Family::default(),
            duplicates: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            requeued: Family::default(),
            transactions: Family::default(),
            handling: Family::new_with_constructor(latency_histogram),
            event_age: Family::new_with_constructor(latency_histogram),
            dead_letters: Family::default(),
            held: Family::default(),
            held_events: Family::default(),
            held_oldest: Family::default(),
        }
    }
}

impl ConsumerFamilies {
    /// The families, registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        let r = registry;
        r.register(
            "consumer_processed",
            "Deliveries whose effect was committed (held events applied with what they waited for included)",
            this.processed.clone(),
        );
        r.register(
            "consumer_duplicates",
            "Deliveries seen before, acked without effect",
            this.duplicates.clone(),
        );
        r.register(
            "consumer_retried",
            "Refused deliveries sent to a delay queue",
            this.retried.clone(),
        );
        r.register(
            "consumer_dead_lettered",
            "Deliveries sent to the dead-letter queue",
            this.dead_lettered.clone(),
        );
        r.register(
            "consumer_requeued",
            "Deliveries left for redelivery after an outage",
            this.requeued.clone(),
        );
        r.register(
            "consumer_transactions",
            "Dedup transactions committed",
            this.transactions.clone(),
        );
        r.register(
            "consumer_handling_duration_seconds",
            "Time to handle a batch, per delivery",
            this.handling.clone(),
        );
        r.register(
            "consumer_event_age_seconds",
            "From the event's outbox write to this consumer's commit",
            this.event_age.clone(),
        );
        r.register(
            "dead_letter_queue_messages",
            "Messages in a dead-letter queue, sampled",
            this.dead_letters.clone(),
        );
        r.register(
            "consumer_held",
            "Deliveries that came before their predecessor and were held",
            this.held.clone(),
        );
        r.register(
            "inbox_held_events",
            "Events held waiting for their predecessor, sampled",
            this.held_events.clone(),
        );
        r.register(
            "inbox_held_oldest_age_seconds",
            "Age of the oldest held event, sampled",
            this.held_oldest.clone(),
        );
        this
    }

    /// The series of the consumer of `queue`.
    pub fn consumer(&self, queue: &str) -> ConsumerMetrics {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        ConsumerMetrics {
            processed: self.processed.get_or_create(&label).clone(),
            duplicates: self.duplicates.get_or_create(&label).clone(),
            retried: self.retried.get_or_create(&label).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&label).clone(),
            requeued: self.requeued.get_or_create(&label).clone(),
            transactions: self.transactions.get_or_create(&label).clone(),
            handling: self.handling.get_or_create(&label).clone(),
            event_age: self.event_age.get_or_create(&label).clone(),
            dead_letters: self.dead_letters.get_or_create(&label).clone(),
            held: self.held.get_or_create(&label).clone(),
            held_events: self.held_events.get_or_create(&label).clone(),
            held_oldest: self.held_oldest.get_or_create(&label).clone(),
        }
    }
}

/// What one consumer reports: its series of each family.
#[derive(Debug, Clone)]
pub struct ConsumerMetrics {
    /// Deliveries whose effect was committed, held events applied in the
    /// transaction of the event they waited for included.
    pub processed: Counter,
    /// Deliveries seen before, acked without effect.
    pub duplicates: Counter,
    /// Refused deliveries sent to a delay queue.
    pub retried: Counter,
    /// Deliveries sent to the dead-letter queue.
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
    /// Deliveries that came before their predecessor and were held.
    pub held: Counter,
    /// Events held now, sampled.
    pub held_events: Gauge,
    /// Age of the oldest held event in seconds, sampled.
    pub held_oldest: FloatGauge,
}
