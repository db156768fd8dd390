//! One request, one trace: the HTTP server span, `create_order`, the relay's
//! PRODUCER span and each consumer's CONSUMER span share the caller's trace,
//! each a child of the step before; a retried message stays in it.

use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry_sdk::trace::SpanData;
use order_service::amqp::{BILLING, BINDING_KEY, EMAIL};
use order_service::config::ConsumerConfig;
use order_service::startup::ConsumerKind;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::fixtures::{Caller, System, eventually, finished_spans};

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

/// POSTs an order on behalf of `caller` and returns its id and its event's
/// `transaction_id` (the AMQP `message_id`).
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
    let transaction_id =
        sqlx::query_scalar("SELECT transaction_id FROM outbox WHERE aggregate_id = $1")
            .bind(order_id.to_string())
            .fetch_one(&system.pool)
            .await
            .expect("the order's outbox row");
    (order_id, transaction_id)
}

/// The ended spans of one order's journey, each found by what identifies it
/// rather than by trace, so a span that lost its trace is still found.
struct Journey {
    all: Vec<SpanData>,
    server: SpanData,
    handler: SpanData,
    publish: SpanData,
    /// The CONSUMER spans of `message_id`, oldest first.
    processes: Vec<SpanData>,
}

impl Journey {
    fn find(caller: &Caller, order_id: Uuid, message_id: Uuid) -> Option<Self> {
        let all = finished_spans();
        let (order_id, message_id) = (order_id.to_string(), message_id.to_string());
        let find = |kind: SpanKind, f: &dyn Fn(&SpanData) -> bool| {
            all.iter().find(|s| s.span_kind == kind && f(s)).cloned()
        };
        let server = find(SpanKind::Server, &|s| s.parent_span_id == caller.span_id)?;
        let handler = find(SpanKind::Internal, &|s| {
            s.name == "create_order" && has(s, "order.id", &order_id)
        })?;
        let publish = find(SpanKind::Producer, &|s| {
            has(s, "messaging.message.id", &message_id)
        })?;
        let mut processes: Vec<SpanData> = all
            .iter()
            .filter(|s| s.span_kind == SpanKind::Consumer)
            .filter(|s| has(s, "messaging.message.id", &message_id))
            .cloned()
            .collect();
        processes.sort_by_key(|s| s.start_time);
        Some(Self {
            all,
            server,
            handler,
            publish,
            processes,
        })
    }

    fn process_spans_of(&self, queue: &str) -> Vec<&SpanData> {
        let queue_span = format!("{queue} process");
        self.processes
            .iter()
            .filter(|s| s.name == queue_span)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_post_makes_one_trace_through_relay_and_both_consumers() {
    let system = System::start(
        &[ConsumerKind::Email, ConsumerKind::Billing],
        &ConsumerConfig::default(),
    )
    .await;
    let caller = Caller::random();
    let (email, billing) = (system.queue(EMAIL), system.queue(BILLING));
    let exchange = system.amqp.exchange.clone();

    let (order_id, message_id) = post_order(&system, &caller).await;

    eventually(
        "the order to be CONFIRMED",
        Duration::from_secs(30),
        || async {
            let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
                .bind(order_id)
                .fetch_one(&system.pool)
                .await
                .ok()?;
            (status == "CONFIRMED").then_some(())
        },
    )
    .await;
    let journey = eventually(
        "the server, create_order, publish and both process spans",
        Duration::from_secs(30),
        || async {
            let journey = Journey::find(&caller, order_id, message_id)?;
            let both = [&email, &billing]
                .iter()
                .all(|q| !journey.process_spans_of(q).is_empty());
            both.then_some(journey)
        },
    )
    .await;
    system.stop().await;

    let Journey {
        all,
        server,
        handler,
        publish,
        ..
    } = &journey;
    let consumers = [&email, &billing].map(|q| journey.process_spans_of(q));
    assert!(
        consumers.iter().all(|spans| spans.len() == 1),
        "one delivery each"
    );
    let consumers = consumers.map(|spans| spans[0]);
    for span in [server, handler, publish].into_iter().chain(consumers) {
        assert_eq!(
            span.span_context.trace_id(),
            caller.trace_id,
            "{} is in the caller's trace",
            span.name
        );
    }

    assert_eq!(server.name, "POST /orders");
    assert!(
        server.parent_span_is_remote,
        "the server span continues the caller's"
    );
    assert_eq!(handler.parent_span_id, server.span_context.span_id());
    assert_eq!(publish.name, format!("{exchange} publish"));
    assert!(
        ancestors(all, publish).contains(&server.span_context.span_id()),
        "the publish span descends from the server span"
    );
    for (queue, consumer) in [&email, &billing].into_iter().zip(consumers) {
        assert_eq!(consumer.name, format!("{queue} process"));
        assert_eq!(
            consumer.parent_span_id,
            publish.span_context.span_id(),
            "{queue} process is a child of the publish span"
        );
        assert!(
            consumer.parent_span_is_remote,
            "its parent came in the AMQP headers"
        );
    }

    let message_id = message_id.to_string();
    let expected = [
        (publish, "publish", exchange.as_str()),
        (consumers[0], "process", email.as_str()),
        (consumers[1], "process", billing.as_str()),
    ];
    for (span, operation, destination) in expected {
        for (key, value) in [
            ("messaging.system", "rabbitmq"),
            ("messaging.operation.type", operation),
            ("messaging.destination.name", destination),
            ("messaging.rabbitmq.destination.routing_key", BINDING_KEY),
            ("messaging.message.id", message_id.as_str()),
        ] {
            assert_eq!(
                attr(span, key).as_deref(),
                Some(value),
                "{} {key}",
                span.name
            );
        }
    }
    for consumer in consumers {
        assert_eq!(attr(consumer, "order.id"), Some(order_id.to_string()));
        assert_eq!(attr(consumer, "outcome").as_deref(), Some("Processed"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_message_keeps_its_trace() {
    // Every send fails: attempts 0, 1 and 2 (two retry queues), then the DLQ.
    let failing = ConsumerConfig {
        email_failure_rate: 1.0,
        ..ConsumerConfig::default()
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
                .process_spans_of(&email)
                .iter()
                .any(|s| attr(s, "outcome").is_some_and(|o| o.starts_with("DeadLettered")));
            done.then_some(journey)
        },
    )
    .await;
    system.stop().await;

    let attempts = journey.process_spans_of(&email);
    let outcomes: Vec<String> = attempts
        .iter()
        .map(|s| attr(s, "outcome").unwrap_or_default())
        .collect();
    assert_eq!(attempts.len(), 3, "outcomes: {outcomes:?}");
    for (attempt, span) in attempts.iter().enumerate() {
        assert_eq!(span.span_context.trace_id(), caller.trace_id);
        assert_eq!(
            span.parent_span_id,
            journey.publish.span_context.span_id(),
            "attempt {attempt} is a child of the original publish span"
        );
        assert_eq!(
            attr(span, "messaging.consumer.attempt"),
            Some(attempt.to_string())
        );
        // A retry comes back from its delay queue, dead-lettered to the queue's name.
        let routing_key = if attempt == 0 { BINDING_KEY } else { &email };
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
