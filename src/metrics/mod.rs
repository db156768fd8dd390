//! Prometheus metrics through `prometheus-client`: one [`Registry`] per
//! process (no global, so every test has its own), rendered as OpenMetrics
//! text on `GET /metrics` by every role.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod parts;
pub use parts::{ConsumerMetrics, OutboxGauges};

/// Latency buckets in seconds: 1 ms to about 33 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Seconds of a duration, for a histogram.
pub fn seconds(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of the process. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Histogram,
    pub orders_created: Counter,
    pub relay_published: Counter,
    pub relay_failed: Counter,
    /// From a publish to its confirm.
    pub relay_confirm_latency: Histogram,
    /// One batch, from its claim to its last confirm.
    pub relay_batch_latency: Histogram,
    pub outbox: OutboxGauges,
    /// Mails the SMTP server accepted.
    pub mail_sent: Counter,
    /// Sends that failed (temporary or permanent).
    pub mail_failed: Counter,
    pub mail_outbox: OutboxGauges,
    consumer_processed: Family<QueueLabel, Counter>,
    consumer_duplicates: Family<QueueLabel, Counter>,
    consumer_retried: Family<QueueLabel, Counter>,
    consumer_dead_lettered: Family<QueueLabel, Counter>,
    consumer_requeued: Family<QueueLabel, Counter>,
    consumer_transactions: Family<QueueLabel, Counter>,
    consumer_handling: Histograms<QueueLabel>,
    consumer_event_age: Histograms<QueueLabel>,
    dead_letters: Family<QueueLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let this = Self {
            http_requests: Family::default(),
            http_latency: latency_buckets(),
            orders_created: Counter::default(),
            relay_published: Counter::default(),
            relay_failed: Counter::default(),
            relay_confirm_latency: latency_buckets(),
            relay_batch_latency: latency_buckets(),
            outbox: OutboxGauges::default(),
            mail_sent: Counter::default(),
            mail_failed: Counter::default(),
            mail_outbox: OutboxGauges::default(),
            consumer_processed: Family::default(),
            consumer_duplicates: Family::default(),
            consumer_retried: Family::default(),
            consumer_dead_lettered: Family::default(),
            consumer_requeued: Family::default(),
            consumer_transactions: Family::default(),
            consumer_handling: Family::new_with_constructor(latency_buckets),
            consumer_event_age: Family::new_with_constructor(latency_buckets),
            dead_letters: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "HTTP requests by method, route and status",
            this.http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            this.http_latency.clone(),
        );
        r.register(
            "orders_created",
            "Orders accepted and written",
            this.orders_created.clone(),
        );
        r.register(
            "relay_published",
            "Outbox rows confirmed by the broker",
            this.relay_published.clone(),
        );
        r.register(
            "relay_failed",
            "Publishes nacked or returned (the row is retried later with backoff)",
            this.relay_failed.clone(),
        );
        r.register(
            "relay_confirm_duration_seconds",
            "From a publish to its confirm",
            this.relay_confirm_latency.clone(),
        );
        r.register(
            "relay_batch_duration_seconds",
            "A relay batch, from its first publish to its last confirm",
            this.relay_batch_latency.clone(),
        );
        r.register(
            "outbox_pending_rows",
            "Outbox rows not yet published",
            this.outbox.pending.clone(),
        );
        r.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest unpublished outbox row (the lag)",
            this.outbox.oldest_pending_age.clone(),
        );
        r.register(
            "outbox_failed_rows",
            "Unpublished outbox rows with an error",
            this.outbox.failed.clone(),
        );
        r.register(
            "mailer_sent",
            "Mails accepted by the SMTP server",
            this.mail_sent.clone(),
        );
        r.register(
            "mailer_failed",
            "Mail sends that failed (retried, or given up on a 5xx)",
            this.mail_failed.clone(),
        );
        r.register(
            "mail_outbox_pending_rows",
            "Mails not yet sent (given-up ones excluded)",
            this.mail_outbox.pending.clone(),
        );
        r.register(
            "mail_outbox_oldest_pending_age_seconds",
            "Age of the oldest unsent mail",
            this.mail_outbox.oldest_pending_age.clone(),
        );
        r.register(
            "mail_outbox_given_up_rows",
            "Mails refused for good (a 5xx)",
            this.mail_outbox.given_up.clone(),
        );
        r.register(
            "outbox_given_up_rows",
            "Outbox rows given up on",
            this.outbox.given_up.clone(),
        );
        r.register(
            "consumer_processed",
            "Deliveries whose effect was committed",
            this.consumer_processed.clone(),
        );
        r.register(
            "consumer_duplicates",
            "Deliveries seen before, acked without effect",
            this.consumer_duplicates.clone(),
        );
        r.register(
            "consumer_retried",
            "Refused deliveries sent to a delay queue",
            this.consumer_retried.clone(),
        );
        r.register(
            "consumer_dead_lettered",
            "Deliveries sent to the dead-letter queue",
            this.consumer_dead_lettered.clone(),
        );
        r.register(
            "consumer_requeued",
            "Deliveries left for redelivery after an outage",
            this.consumer_requeued.clone(),
        );
        r.register(
            "consumer_transactions",
            "Dedup transactions committed",
            this.consumer_transactions.clone(),
        );
        r.register(
            "consumer_handling_duration_seconds",
            "Time to handle a batch, per delivery",
            this.consumer_handling.clone(),
        );
        r.register(
            "consumer_event_age_seconds",
            "From the event's outbox write to this consumer's commit",
            this.consumer_event_age.clone(),
        );
        r.register(
            "dead_letter_queue_messages",
            "Messages in a dead-letter queue, sampled",
            this.dead_letters.clone(),
        );
        Self { registry, ..this }
    }
}

impl Metrics {
    pub fn record_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let labels = HttpLabels {
            method: method.to_owned(),
            route: route.to_owned(),
            status,
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_latency.observe(seconds(elapsed));
    }

    /// The metrics of the consumer of `queue`.
    pub fn consumer(&self, queue: &str) -> Arc<ConsumerMetrics> {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        Arc::new(ConsumerMetrics {
            processed: self.consumer_processed.get_or_create(&label).clone(),
            duplicates: self.consumer_duplicates.get_or_create(&label).clone(),
            retried: self.consumer_retried.get_or_create(&label).clone(),
            dead_lettered: self.consumer_dead_lettered.get_or_create(&label).clone(),
            requeued: self.consumer_requeued.get_or_create(&label).clone(),
            transactions: self.consumer_transactions.get_or_create(&label).clone(),
            handling: self.consumer_handling.get_or_create(&label).clone(),
            event_age: self.consumer_event_age.get_or_create(&label).clone(),
            dead_letters: self.dead_letters.get_or_create(&label).clone(),
        })
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_with_its_labels() {
        let metrics = Metrics::default();
        metrics.orders_created.inc();
        metrics.consumer("billing_service").processed.inc_by(3);
        metrics.record_http("POST", "/orders", 202, Duration::from_millis(2));
        let text = metrics.render();
        assert!(text.contains("orders_created_total 1"), "{text}");
        assert!(
            text.contains("consumer_processed_total{queue=\"billing_service\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "http_requests_total{method=\"POST\",route=\"/orders\",status=\"202\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("consumer_event_age_seconds_bucket"), "{text}");
        assert!(text.contains("mailer_sent_total 0"), "{text}");
        assert!(text.contains("mail_outbox_pending_rows 0"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
