//! Tracing, end to end: one request's trace through the outbox, the relay,
//! both consumers of `order.created`, billing's `order.confirmed` (written
//! through the outbox in its dedup transaction) and e-mail's processing of
//! it, retries included; and the OTLP exporter on the wire.
//!
//! Its own test binary, because the span-collecting subscriber is global.

#[path = "tls/certs.rs"]
mod certs;
mod common;
#[path = "tracing/fixtures.rs"]
mod fixtures;
#[path = "tracing/otlp.rs"]
mod otlp;
#[path = "tracing/pipeline.rs"]
mod pipeline;
