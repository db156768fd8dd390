//! Prometheus metrics through `prometheus-client`: one [`Registry`] per
//! process (no global, so every test has its own), rendered as OpenMetrics
//! text on `GET /metrics` by every role. The outbox and inbox crates
//! register their own metrics in it; the service adds the HTTP, order and
//! mail ones. Names are the dashboard's (`grafana/dashboard.json`).

use std::time::Duration;

use inbox::ConsumerFamilies;
use outbox::wal::WalMetrics;
use outbox::{OutboxGauges, RelayMetrics};
use outbox_common::metrics::{latency_histogram, seconds};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    route: String,
    status: u16,
}

/// Every metric of the process. Shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    pub http_latency: Histogram,
    pub orders_created: Counter,
    /// The relay's (outbox crate).
    pub relay: RelayMetrics,
    /// The events' outbox table (outbox crate).
    pub outbox: OutboxGauges,
    /// The WAL relay's (outbox crate; zero unless `RELAY_MODE=wal`).
    pub wal: WalMetrics,
    /// Mails the SMTP server accepted.
    pub mail_sent: Counter,
    /// Sends that failed (temporary or permanent).
    pub mail_failed: Counter,
    /// The mails' outbox table (outbox crate).
    pub mail_outbox: OutboxGauges,
    /// Every consumer's (inbox crate).
    pub consumers: ConsumerFamilies,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let r = &mut registry;
        let http_requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests by method, route and status",
            http_requests.clone(),
        );
        let http_latency = latency_histogram();
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            http_latency.clone(),
        );
        let orders_created = Counter::default();
        r.register(
            "orders_created",
            "Orders accepted and written",
            orders_created.clone(),
        );
        let mail_sent = Counter::default();
        r.register(
            "mailer_sent",
            "Mails accepted by the SMTP server",
            mail_sent.clone(),
        );
        let mail_failed = Counter::default();
        r.register(
            "mailer_failed",
            "Mail sends that failed (retried, or given up on a permanent refusal)",
            mail_failed.clone(),
        );
        Self {
            relay: RelayMetrics::register(r),
            outbox: OutboxGauges::register(r, "outbox", "Outbox rows"),
            wal: WalMetrics::register(r),
            mail_outbox: OutboxGauges::register(r, "mail_outbox", "Mails"),
            consumers: ConsumerFamilies::register(r),
            http_requests,
            http_latency,
            orders_created,
            mail_sent,
            mail_failed,
            registry,
        }
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
        metrics
            .consumers
            .consumer("billing_service")
            .processed
            .inc_by(3);
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
        assert!(text.contains("relay_published_total 0"), "{text}");
        assert!(
            text.contains("outbox_oldest_pending_age_seconds 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
