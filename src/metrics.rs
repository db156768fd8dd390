//! Prometheus metrics, kept in atomics and rendered as text on `GET /metrics`.
//! Hand-rolled to stay small: counters, and histograms with fixed buckets.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Count per bucket (not cumulative; summed when rendered).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// What one consumer reports.
#[derive(Debug, Default)]
pub struct ConsumerMetrics {
    pub processed: Counter,
    pub duplicates: Counter,
    pub retried: Counter,
    pub dead_lettered: Counter,
    /// Deliveries left for redelivery because Postgres or the broker failed.
    pub requeued: Counter,
    /// Postgres transactions committed (one per batch of deliveries).
    pub transactions: Counter,
    pub handling: Histogram,
}

/// Every metric of the process. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by (method, route, status).
    http_requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    pub http_latency: Histogram,
    pub orders_created: Counter,
    pub relay_published: Counter,
    pub relay_failed: Counter,
    pub relay_publish_latency: Histogram,
    consumers: Mutex<BTreeMap<String, std::sync::Arc<ConsumerMetrics>>>,
}

impl Metrics {
    pub fn record_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut map = self.http_requests.lock().expect("metrics lock");
        *map.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        drop(map);
        self.http_latency.observe(elapsed);
    }

    /// The metrics of consumer `name`, created on first use.
    pub fn consumer(&self, name: &str) -> std::sync::Arc<ConsumerMetrics> {
        self.consumers
            .lock()
            .expect("metrics lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Prometheus text exposition. `outbox` is read from Postgres by the caller.
    pub fn render(&self, outbox: Option<&crate::outbox::store::OutboxStatus>) -> String {
        let mut out = String::new();
        out.push_str("# TYPE http_requests_total counter\n");
        for ((method, route, status), n) in self.http_requests.lock().expect("metrics lock").iter()
        {
            let _ = writeln!(
                out,
                "http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        self.http_latency
            .render(&mut out, "http_request_duration_seconds", "");
        let counters = [
            ("orders_created_total", &self.orders_created),
            ("relay_published_total", &self.relay_published),
            ("relay_failed_total", &self.relay_failed),
        ];
        for (name, counter) in counters {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", counter.get());
        }
        out.push_str("# TYPE relay_publish_duration_seconds histogram\n");
        self.relay_publish_latency
            .render(&mut out, "relay_publish_duration_seconds", "");
        if let Some(status) = outbox {
            let _ = writeln!(
                out,
                "# TYPE outbox_pending_rows gauge\noutbox_pending_rows {}",
                status.pending
            );
            let _ = writeln!(
                out,
                "# TYPE outbox_oldest_pending_age_seconds gauge\noutbox_oldest_pending_age_seconds {}",
                status.oldest_pending_age_secs.unwrap_or(0.0)
            );
            let _ = writeln!(
                out,
                "# TYPE outbox_failed_rows gauge\noutbox_failed_rows {}",
                status.with_errors
            );
        }
        let consumers = self.consumers.lock().expect("metrics lock");
        for (kind, pick) in [
            (
                "processed",
                (|c: &ConsumerMetrics| c.processed.get()) as fn(&ConsumerMetrics) -> u64,
            ),
            ("duplicates", |c| c.duplicates.get()),
            ("retried", |c| c.retried.get()),
            ("dead_lettered", |c| c.dead_lettered.get()),
            ("requeued", |c| c.requeued.get()),
            ("transactions", |c| c.transactions.get()),
        ] {
            let _ = writeln!(out, "# TYPE consumer_{kind}_total counter");
            for (name, c) in consumers.iter() {
                let _ = writeln!(out, "consumer_{kind}_total{{queue=\"{name}\"}} {}", pick(c));
            }
        }
        out.push_str("# TYPE consumer_handling_duration_seconds histogram\n");
        for (name, c) in consumers.iter() {
            c.handling.render(
                &mut out,
                "consumer_handling_duration_seconds",
                &format!("queue=\"{name}\""),
            );
        }
        out
    }
}
