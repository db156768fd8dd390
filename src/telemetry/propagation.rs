//! W3C trace context: the outbox's and the inbox's carriers (the outbox
//! row's `headers`, AMQP headers) from `outbox_common`, and the one the API
//! reads, HTTP headers.

use opentelemetry::propagation::Extractor;
pub use outbox_common::propagation::*;

/// The context sent by an HTTP client in `traceparent`/`tracestate`.
pub fn context_from_http(headers: &axum::http::HeaderMap) -> opentelemetry::Context {
    struct HttpExtractor<'a>(&'a axum::http::HeaderMap);
    impl Extractor for HttpExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HttpExtractor(headers)))
}
