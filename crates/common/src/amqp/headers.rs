//! The AMQP message headers the relay and the consumers agree on, named once
//! so a writer and its reader cannot drift apart.

/// When the relay published the message (ms since the epoch), so consumers
/// can report how long it waited in its queue.
pub const PUBLISHED_AT_HEADER: &str = "x-published-at-ms";
/// When the outbox row was written (ms since the epoch): with the consumer's
/// commit, how long the event took end to end.
pub const WRITTEN_AT_HEADER: &str = "x-outbox-written-at-ms";
/// How many times this message has been handled and failed.
pub const ATTEMPT_HEADER: &str = "x-attempt";
/// Why the last attempt failed.
pub const ERROR_HEADER: &str = "x-last-error";
/// The queue the message was consumed from before a retry or DLQ move.
pub const ORIGIN_HEADER: &str = "x-original-queue";
/// The attempt count a message had in the dead-letter queue before a
/// `dlq replay` reset it to 0.
pub const REPLAYED_AFTER_ATTEMPTS_HEADER: &str = "x-replayed-after-attempts";
/// W3C trace context: the parent span. Written and read by the
/// OpenTelemetry propagator (`telemetry::propagation`), named here for the
/// readers of the headers (tests, benches).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// W3C trace context: vendor state, beside [`TRACEPARENT_HEADER`].
pub const TRACESTATE_HEADER: &str = "tracestate";
/// The kind of aggregate the event is about (the outbox row's
/// `aggregate_type`), on the events of a table with sequences.
pub const AGGREGATE_TYPE_HEADER: &str = "x-aggregate-type";
/// Which aggregate (the row's `aggregate_id`).
pub const AGGREGATE_ID_HEADER: &str = "x-aggregate-id";
/// The event's place in its aggregate's history: 1, 2, 3...
pub const SEQUENCE_HEADER: &str = "x-sequence";
/// A JSON object: for each event type, the place of the latest earlier
/// event of that type in the aggregate (`{}` for the first event). A
/// consumer bound to some of the types waits for the greatest of theirs.
pub const PREVIOUS_HEADER: &str = "x-previous";
