//! W3C trace context in and out of the places it travels between the
//! outbox and the inbox: the outbox row's `headers` column and AMQP
//! message headers. Uses the global propagator: a no-op until the process
//! installs one (`opentelemetry_sdk::propagation::TraceContextPropagator`).

use std::collections::HashMap;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current span's context as `traceparent`/`tracestate` entries, ready to
/// store in `outbox.headers`. Empty when tracing is off.
pub fn current_context_headers() -> serde_json::Value {
    span_context_headers(&tracing::Span::current())
}

/// `span`'s context as `traceparent`/`tracestate` entries, ready to store in
/// `outbox.headers`. Empty when tracing is off.
pub fn span_context_headers(span: &tracing::Span) -> serde_json::Value {
    let mut carrier: HashMap<String, String> = HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    serde_json::Value::Object(
        carrier
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
    )
}

/// The context stored in an outbox row's `headers`.
pub fn context_from_json(headers: &serde_json::Value) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = headers
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}

/// Writes `cx` into AMQP headers.
pub fn inject_amqp(cx: &opentelemetry::Context, headers: &mut FieldTable) {
    struct AmqpInjector<'a>(&'a mut FieldTable);
    impl Injector for AmqpInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0
                .insert(ShortString::from(key), AMQPValue::LongString(value.into()));
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(cx, &mut AmqpInjector(headers))
    });
}

/// Reads the context a publisher put in AMQP headers.
pub fn extract_amqp(headers: Option<&FieldTable>) -> opentelemetry::Context {
    let carrier: HashMap<String, String> = headers
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        AMQPValue::ShortString(s) => s.as_str().to_owned(),
                        _ => return None,
                    };
                    Some((k.as_str().to_owned(), value))
                })
                .collect()
        })
        .unwrap_or_default();
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier))
}
