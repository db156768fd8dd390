//! One request, one trace, through both events: the HTTP server span,
//! `create_order`, the relay's PRODUCER span of `order.created`, each
//! consumer's CONSUMER span of it; then, from the billing CONSUMER span
//! (whose dedup transaction wrote `order.confirmed`), the PRODUCER span of
//! `order.confirmed` and e-mail's CONSUMER span of it. Each is a child of
//! the step before; a retried message stays in the trace.

use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry_sdk::trace::SpanData;
use order_service::config::MailConfig;
use order_service::orders::{BILLING, EMAIL, ORDER_CONFIRMED, ORDER_CREATED};
use order_service::startup::ConsumerKind;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::fixtures::{Caller, RelayMode, System, eventually, finished_spans};

/// The CONSUMER span attribute naming the order.
const CONVERSATION_ID: &str = "messaging.message.conversation_id";

/// An attribute's value as text.
fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn has(span: &SpanData, key: &str, value: &str) -> bool {
    attr(span, key).as_deref() == Some(value)
}

/// The deliveries among `spans` that the consumer applied (outcome
/// `Processed`), not held, retried or found duplicate.
fn applied<'a>(spans: &[&'a SpanData]) -> Vec<&'a SpanData> {
    spans
        .iter()
        .copied()
        .filter(|s| has(s, "outcome", "Processed"))
        .collect()
}

/// The span ids above `span` among `spans`, nearest first.
fn ancestors(spans: &[SpanData], span: &SpanData) -> Vec<SpanId> {
    let mut chain = Vec::new();
    let mut parent = span.parent_span_id;
    while let Some(next) = spans.iter().find(|s| s.span_context.span_id() == parent) {
        chain.push(parent);
        parent = next.parent_span_id;
    }
    chain.push(parent);
    chain
}

/// POSTs an order on behalf of `caller` and returns its id and its
/// `order.created` event's `transaction_id` (the AMQP `message_id`).
async fn post_order(system: &System, caller: &Caller) -> (Uuid, Uuid) {
    let response = reqwest::Client::new()
        .post(system.url("/orders"))
        .header("traceparent", caller.traceparent())
        .json(&serde_json::json!({"productId": "p-1", "userId": "user_1", "amount": 500}))
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    let order_id = Uuid::parse_str(body["orderId"].as_str().expect("orderId")).unwrap();
    let transaction_id = sqlx::query_scalar(
        "SELECT transaction_id FROM outbox WHERE aggregate_id = $1 AND event_type = $2",
    )
    .bind(order_id.to_string())
    .bind(ORDER_CREATED)
    .fetch_one(&system.pool)
    .await
    .expect("the order's order.created outbox row");
    (order_id, transaction_id)
}

/// One message's hop: its PRODUCER span and its CONSUMER spans (every
/// consumer, every attempt), oldest first.
struct Hop {
    publish: SpanData,
    processes: Vec<SpanData>,
}

impl Hop {
    fn find(all: &[SpanData], message_id: Uuid) -> Option<Self> {
        let message_id = message_id.to_string();
        let of_message = |s: &&SpanData| has(s, "messaging.message.id", &message_id);
        let publish = all
            .iter()
            .filter(|s| s.span_kind == SpanKind::Producer)
            .find(of_message)?
            .clone();
        let mut processes: Vec<SpanData> = all
            .iter()
            .filter(|s| s.span_kind == SpanKind::Consumer)
            .filter(of_message)
            .cloned()
            .collect();
        processes.sort_by_key(|s| s.start_time);
        Some(Self { publish, processes })
    }

    fn process_spans_of(&self, queue: &str) -> Vec<&SpanData> {
        let queue_span = format!("{queue} process");
        self.processes
            .iter()
            .filter(|s| s.name == queue_span)
            .collect()
    }
}

/// The ended spans of one order's journey, each found by what identifies it
/// rather than by trace, so a span that lost its trace is still found.
struct Journey {
    all: Vec<SpanData>,
    server: SpanData,
    handler: SpanData,
    /// `order.created`: published by the relay for the API's row.
    created: Hop,
}

impl Journey {
    fn find(caller: &Caller, order_id: Uuid, created_id: Uuid) -> Option<Self> {
        let all = finished_spans();
        let order_id = order_id.to_string();
        let find = |kind: SpanKind, f: &dyn Fn(&SpanData) -> bool| {
            all.iter().find(|s| s.span_kind == kind && f(s)).cloned()
        };
        let server = find(SpanKind::Server, &|s| s.parent_span_id == caller.span_id)?;
        let handler = find(SpanKind::Internal, &|s| {
            s.name == "create_order" && has(s, "order.id", &order_id)
        })?;
        let created = Hop::find(&all, created_id)?;
        Some(Self {
            all,
            server,
            handler,
            created,
        })
    }

    /// `order.confirmed`'s hop: published by the relay for the row billing
    /// wrote.
    fn confirmed(&self, confirmed_id: Uuid) -> Option<Hop> {
        Hop::find(&self.all, confirmed_id)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_post_makes_one_trace_through_both_events_and_both_consumers() {
    one_trace_through_both_events(RelayMode::Poll).await;
}

/// The same trace with the WAL relay publishing: its PRODUCER spans take
/// their parent from the row's trace context, as the polling relay's do.
#[tokio::test(flavor = "multi_thread")]
async fn the_wal_relay_keeps_the_trace_through_both_events() {
    one_trace_through_both_events(RelayMode::Wal).await;
}

async fn one_trace_through_both_events(relay: RelayMode) {
    let system = System::start_with(
        &[ConsumerKind::Email, ConsumerKind::Billing],
        &MailConfig::default(),
        relay,
    )
    .await;
    let caller = Caller::random();
    let (email, billing) = (system.queue(EMAIL), system.queue(BILLING));
    let exchange = system.amqp.exchange().to_owned();

    let (order_id, created_id) = post_order(&system, &caller).await;
    // Billing's order.confirmed row: its id is derived from order.created's.
    let confirmed_id = Uuid::new_v5(&created_id, ORDER_CONFIRMED.as_bytes());

    eventually(
        "the order CONFIRMED and its payment-confirmed mail recorded",
        Duration::from_secs(30),
        || async {
            let (status, mails): (String, i64) = sqlx::query_as(
                "SELECT status, (SELECT count(*) FROM notifications \
                   WHERE order_id = $1 AND event_type = $2 AND transaction_id = $3) \
                 FROM orders WHERE id = $1",
            )
            .bind(order_id)
            .bind(ORDER_CONFIRMED)
            .bind(confirmed_id)
            .fetch_one(&system.pool)
            .await
            .ok()?;
            (status == "CONFIRMED" && mails == 1).then_some(())
        },
    )
    .await;
    let stored: Uuid = sqlx::query_scalar(
        "SELECT transaction_id FROM outbox WHERE aggregate_id = $1 AND event_type = $2",
    )
    .bind(order_id.to_string())
    .bind(ORDER_CONFIRMED)
    .fetch_one(&system.pool)
    .await
    .expect("the order's order.confirmed outbox row");
    assert_eq!(
        stored, confirmed_id,
        "order.confirmed's id is UUIDv5(order.created's)"
    );
    if let RelayMode::Wal = relay {
        // Published from the slot: the polling relay never marked them.
        let polled: Vec<Uuid> = sqlx::query_scalar(
            "SELECT transaction_id FROM outbox WHERE published_at IS DISTINCT FROM 'infinity'",
        )
        .fetch_all(&system.pool)
        .await
        .expect("reading the outbox");
        assert!(
            polled.is_empty(),
            "rows published by the polling relay: {polled:?}"
        );
    }
    let (journey, confirmed) = eventually(
        "the server, create_order, both publish spans and the three process spans",
        Duration::from_secs(30),
        || async {
            let journey = Journey::find(&caller, order_id, created_id)?;
            let confirmed = journey.confirmed(confirmed_id)?;
            let done = [&email, &billing]
                .iter()
                .all(|q| !journey.created.process_spans_of(q).is_empty())
                && !applied(&confirmed.process_spans_of(&email)).is_empty();
            done.then_some((journey, confirmed))
        },
    )
    .await;
    system.stop().await;

    let Journey {
        all,
        server,
        handler,
        created,
    } = &journey;
    let created_processes = [&email, &billing].map(|q| created.process_spans_of(q));
    assert!(
        created_processes.iter().all(|spans| spans.len() == 1),
        "one delivery of order.created to each consumer"
    );
    let [email_created, billing_created] = created_processes.map(|spans| spans[0]);
    // The e-mail consumer applies an order's events in sequence: an
    // order.confirmed that comes before its order.created is applied is
    // held, then delivered again, in the same trace.
    let confirmed_processes = confirmed.process_spans_of(&email);
    let confirmed_applied = applied(&confirmed_processes);
    assert_eq!(
        confirmed_applied.len(),
        1,
        "order.confirmed applied once by e-mail"
    );
    let email_confirmed = confirmed_applied[0];
    let outcomes: Vec<Option<String>> = confirmed_processes
        .iter()
        .map(|s| attr(s, "outcome"))
        .collect();
    assert!(
        confirmed_processes
            .iter()
            .all(|s| std::ptr::eq(*s, email_confirmed) || has(s, "outcome", "Held")),
        "any other delivery of order.confirmed to e-mail is its hold: {outcomes:?}"
    );
    for held in &confirmed_processes {
        assert_eq!(
            held.span_context.trace_id(),
            caller.trace_id,
            "a held delivery of order.confirmed is in the caller's trace"
        );
    }
    assert!(
        confirmed.process_spans_of(&billing).is_empty(),
        "billing does not take order.confirmed"
    );

    // One trace, the caller's.
    let everything = [
        server,
        handler,
        &created.publish,
        email_created,
        billing_created,
        &confirmed.publish,
        email_confirmed,
    ];
    for span in everything {
        assert_eq!(
            span.span_context.trace_id(),
            caller.trace_id,
            "{} ({:?}) is in the caller's trace",
            span.name,
            span.span_kind
        );
    }

    // POST -> create_order -> publish order.created.
    assert_eq!(server.name, "POST /orders");
    assert!(
        server.parent_span_is_remote,
        "the server span continues the caller's"
    );
    assert_eq!(handler.parent_span_id, server.span_context.span_id());
    assert_eq!(created.publish.name, format!("{exchange} publish"));
    assert!(
        ancestors(all, &created.publish).contains(&server.span_context.span_id()),
        "the order.created publish span descends from the server span"
    );
    // publish order.created -> each consumer's process.
    for (queue, consumer) in [(&email, email_created), (&billing, billing_created)] {
        assert_eq!(consumer.name, format!("{queue} process"));
        assert_eq!(
            consumer.parent_span_id,
            created.publish.span_context.span_id(),
            "{queue} process of order.created is a child of its publish span"
        );
        assert!(
            consumer.parent_span_is_remote,
            "its parent came in the AMQP headers"
        );
    }
    // billing process -> publish order.confirmed -> e-mail process.
    assert_eq!(confirmed.publish.name, format!("{exchange} publish"));
    assert_eq!(
        confirmed.publish.parent_span_id,
        billing_created.span_context.span_id(),
        "the order.confirmed publish span is a child of the billing CONSUMER span \
         whose transaction wrote the row"
    );
    assert!(
        confirmed.publish.parent_span_is_remote,
        "its parent came through the outbox row's headers"
    );
    assert_eq!(email_confirmed.name, format!("{email} process"));
    assert_eq!(
        email_confirmed.parent_span_id,
        confirmed.publish.span_context.span_id(),
        "e-mail's process of order.confirmed is a child of its publish span"
    );
    assert!(email_confirmed.parent_span_is_remote);
    let chain = ancestors(all, email_confirmed);
    for (step, span) in [
        ("billing process", billing_created),
        ("order.created publish", &created.publish),
        ("POST /orders", server),
    ] {
        assert!(
            chain.contains(&span.span_context.span_id()),
            "e-mail's process of order.confirmed descends from {step}"
        );
    }

    let (created_id, confirmed_id) = (created_id.to_string(), confirmed_id.to_string());
    let expected = [
        (
            &created.publish,
            "publish",
            exchange.as_str(),
            ORDER_CREATED,
            &created_id,
        ),
        (
            email_created,
            "process",
            email.as_str(),
            ORDER_CREATED,
            &created_id,
        ),
        (
            billing_created,
            "process",
            billing.as_str(),
            ORDER_CREATED,
            &created_id,
        ),
        (
            &confirmed.publish,
            "publish",
            exchange.as_str(),
            ORDER_CONFIRMED,
            &confirmed_id,
        ),
        (
            email_confirmed,
            "process",
            email.as_str(),
            ORDER_CONFIRMED,
            &confirmed_id,
        ),
    ];
    for (span, operation, destination, routing_key, message_id) in expected {
        for (key, value) in [
            ("messaging.system", "rabbitmq"),
            ("messaging.operation.type", operation),
            ("messaging.destination.name", destination),
            ("messaging.message.id", message_id.as_str()),
        ] {
            assert_eq!(
                attr(span, key).as_deref(),
                Some(value),
                "{} ({routing_key}) {key}",
                span.name
            );
        }
        // The delivery's own routing key: the event type through the
        // exchange; the queue's name when the consumer published it to its
        // queue again (an ordered consumer's event that came before its
        // predecessor, held, then released; on a loaded machine
        // order.confirmed can reach the e-mail consumer first).
        let key = "messaging.rabbitmq.destination.routing_key";
        let routed = attr(span, key);
        let released = operation == "process" && routed.as_deref() == Some(destination);
        assert!(
            routed.as_deref() == Some(routing_key) || released,
            "{} ({routing_key}) {key}: {routed:?}",
            span.name
        );
    }
    for consumer in [email_created, billing_created, email_confirmed] {
        assert_eq!(
            attr(consumer, CONVERSATION_ID),
            Some(order_id.to_string()),
            "{} names the order as the conversation",
            consumer.name
        );
        assert_eq!(
            attr(consumer, "order.id"),
            None,
            "order.id is replaced by {CONVERSATION_ID}"
        );
        assert_eq!(attr(consumer, "outcome").as_deref(), Some("Processed"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_message_keeps_its_trace() {
    // Every send fails: attempts 0, 1 and 2 (two retry queues), then the DLQ.
    let failing = MailConfig {
        email_failure_rate: 1.0,
        ..MailConfig::default()
    };
    let system = System::start(&[ConsumerKind::Email], &failing).await;
    let caller = Caller::random();
    let email = system.queue(EMAIL);

    let (order_id, message_id) = post_order(&system, &caller).await;

    let journey = eventually(
        "three process spans, the last dead-lettering",
        Duration::from_secs(30),
        || async {
            let journey = Journey::find(&caller, order_id, message_id)?;
            let done = journey
                .created
                .process_spans_of(&email)
                .iter()
                .any(|s| attr(s, "outcome").is_some_and(|o| o.starts_with("DeadLettered")));
            done.then_some(journey)
        },
    )
    .await;
    system.stop().await;

    let attempts = journey.created.process_spans_of(&email);
    let outcomes: Vec<String> = attempts
        .iter()
        .map(|s| attr(s, "outcome").unwrap_or_default())
        .collect();
    assert_eq!(attempts.len(), 3, "outcomes: {outcomes:?}");
    for (attempt, span) in attempts.iter().enumerate() {
        assert_eq!(span.span_context.trace_id(), caller.trace_id);
        assert_eq!(
            span.parent_span_id,
            journey.created.publish.span_context.span_id(),
            "attempt {attempt} is a child of the original publish span"
        );
        assert_eq!(
            attr(span, "messaging.consumer.attempt"),
            Some(attempt.to_string())
        );
        assert_eq!(attr(span, CONVERSATION_ID), Some(order_id.to_string()));
        // A retry comes back from its delay queue, dead-lettered to the queue's name.
        let routing_key = if attempt == 0 { ORDER_CREATED } else { &email };
        assert!(has(
            span,
            "messaging.rabbitmq.destination.routing_key",
            routing_key
        ));
    }
    assert!(outcomes[0].starts_with("Retried"), "{outcomes:?}");
    assert!(outcomes[1].starts_with("Retried"), "{outcomes:?}");
    assert!(outcomes[2].starts_with("DeadLettered"), "{outcomes:?}");
}
