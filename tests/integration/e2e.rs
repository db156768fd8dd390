//! The whole system in one process: POST orders, and every one is charged
//! once, confirmed through its `order.confirmed` outbox row, and mailed
//! twice (received, then payment confirmed); the metrics follow.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use order_service::config::{ConsumerConfig, HttpConfig, MailConfig, RelayConfig};
use order_service::orders::{BILLING, EMAIL, ORDER_CONFIRMED, ORDER_CREATED, SUBSCRIPTIONS};
use order_service::startup::{ConsumerKind, Roles};
use order_service::telemetry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::{EnvFilter, Registry};
use uuid::Uuid;

use crate::helpers::{self, DeleteQueues, TestDb, eventually, messages_left, test_amqp};

/// The value of the first sample of `name` whose labels contain `labels`.
pub fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (key, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            (key == name || key.starts_with(&format!("{name}{{"))) && key.contains(labels)
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[tokio::test]
async fn every_posted_order_is_confirmed_charged_once_and_notified_twice() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let roles = Roles::new(db.pool.clone(), CancellationToken::new());
    let addr = roles
        .start_api(&HttpConfig::default(), Some(amqp.clone()))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let post = |i: i64| {
        client
            .post(url("/orders"))
            .json(&json!({"productId": format!("p-{i}"), "userId": format!("user_{}", i % 3), "amount": 100 + i}))
            .send()
    };
    let metrics = || async {
        client
            .get(url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    // Before the relay runs, the outbox fills up.
    for i in 0..10 {
        assert_eq!(post(i).await.unwrap().status(), StatusCode::ACCEPTED);
    }
    assert_eq!(
        sample(&metrics().await, "outbox_pending_rows", "").unwrap(),
        10.0
    );

    roles.start_relay(&amqp, &RelayConfig::default(), false);
    roles
        .start_consumer(
            ConsumerKind::Email,
            &amqp,
            &ConsumerConfig::default(),
            &MailConfig::default(),
        )
        .unwrap();
    roles
        .start_consumer(
            ConsumerKind::Billing,
            &amqp,
            &ConsumerConfig::default(),
            &MailConfig::default(),
        )
        .unwrap();
    let mut ids = Vec::new();
    for i in 10..40 {
        let response = post(i).await.unwrap();
        let body: Value = response.json().await.unwrap();
        ids.push(body["orderId"].as_str().unwrap().to_owned());
    }

    eventually(
        "all 40 orders to be CONFIRMED",
        Duration::from_secs(30),
        || async {
            let pending = db
                .count("SELECT count(*) FROM orders WHERE status <> 'CONFIRMED'")
                .await;
            (pending == 0).then_some(())
        },
    )
    .await;
    let last: Value = client
        .get(url(&format!("/orders/{}", ids[29])))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(last["status"], "CONFIRMED");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 40);
    assert_eq!(
        db.count("SELECT count(DISTINCT order_id) FROM ledger")
            .await,
        40
    );
    assert_eq!(
        db.count("SELECT count(*) FROM ledger").await,
        40,
        "one charge per order"
    );
    assert_eq!(
        db.count(
            "SELECT ((SELECT sum(amount) FROM ledger) - (SELECT sum(amount) FROM orders))::bigint"
        )
        .await,
        0,
        "ledger total equals order total"
    );
    eventually(
        "two notifications per order",
        Duration::from_secs(30),
        || async { (db.count("SELECT count(*) FROM notifications").await == 80).then_some(()) },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(DISTINCT (order_id, event_type)) FROM notifications")
            .await,
        80,
        "one mail per order and event"
    );
    let bodies: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT n.subject, n.body, \
                CASE n.event_type \
                    WHEN 'order.created' THEN format('Order %s received', o.id) \
                    WHEN 'order.confirmed' THEN format('Payment confirmed for order %s', o.id) END, \
                CASE n.event_type \
                    WHEN 'order.created' THEN format('Hello %s, we received your order %s for product %s (%s minor units).', \
                        o.user_id, o.id, o.product_id, o.amount) \
                    WHEN 'order.confirmed' THEN format('Hello %s, your payment of %s minor units for order %s (product %s) is confirmed.', \
                        o.user_id, o.amount, o.id, o.product_id) END \
         FROM notifications n JOIN orders o ON o.id = n.order_id AND o.user_id = n.user_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(bodies.len(), 80, "each notification names its order's user");
    for (subject, body, expected_subject, expected_body) in &bodies {
        assert_eq!(subject, expected_subject, "the e-mail names its own order");
        assert_eq!(body, expected_body, "the e-mail names its own order");
    }
    assert!(bodies[0].1.contains(" for product p-"), "{}", bodies[0].1);
    assert_eq!(
        db.count("SELECT count(*) FROM outbox WHERE event_type = 'order.confirmed'")
            .await,
        40,
        "billing wrote one order.confirmed row per order"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM processed_messages").await,
        120,
        "billing saw 40 events, e-mail 80"
    );

    // The last rows' batch may commit just after the e-mails it carried.
    let text = eventually("the outbox to drain", Duration::from_secs(10), || async {
        let text = metrics().await;
        let drained = sample(&text, "outbox_pending_rows", "") == Some(0.0)
            && sample(&text, "relay_published_total", "") == Some(80.0);
        drained.then_some(text)
    })
    .await;
    let billing = format!("queue=\"{}billing_service\"", amqp.queue_prefix());
    let email = format!(
        "queue=\"{}email_notification_service\"",
        amqp.queue_prefix()
    );
    assert_eq!(
        sample(&text, "consumer_processed_total", &billing).unwrap(),
        40.0
    );
    assert_eq!(
        sample(&text, "consumer_processed_total", &email).unwrap(),
        80.0
    );
    assert_eq!(sample(&text, "orders_created_total", "").unwrap(), 40.0);
    assert!(
        sample(
            &text,
            "http_requests_total",
            "route=\"/orders\",status=\"202\""
        )
        .unwrap()
            >= 40.0
    );

    roles.cancel.cancel();
    roles.wait(Duration::from_secs(15)).await.unwrap();
    db.cleanup().await;
}

/// Turns tracing on for this test's thread only (see
/// [`helpers::trace_this_thread`]): the production span filter and
/// OpenTelemetry layer (no exporter: the spans only need their ids), and the
/// W3C propagator, which injects nothing for the other tests' spans: they
/// have no context.
fn trace_with_opentelemetry() -> (tracing::subscriber::DefaultGuard, SdkTracerProvider) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder().build();
    let subscriber = Registry::default()
        .with(EnvFilter::new(telemetry::DEFAULT_FILTER))
        .with(telemetry::otel_layer(&provider));
    (helpers::trace_this_thread(subscriber), provider)
}

/// The trace id of an outbox row's `headers`, if it carries a traceparent.
fn trace_id(headers: &Value) -> Option<String> {
    let traceparent = headers["traceparent"].as_str()?;
    Some(traceparent.split('-').nth(1)?.to_owned())
}

/// One `order.confirmed` outbox row, as the chain test reads it.
#[derive(Debug, sqlx::FromRow)]
struct ConfirmedRow {
    transaction_id: Uuid,
    aggregate_id: String,
    payload: Value,
    headers: Value,
    published: bool,
}

#[tokio::test]
async fn billing_confirms_each_order_through_the_outbox_and_email_mails_both_events() {
    let (_tracing, _provider) = trace_with_opentelemetry();
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let roles = Roles::new(db.pool.clone(), CancellationToken::new());
    let addr = roles
        .start_api(&HttpConfig::default(), Some(amqp.clone()))
        .await
        .unwrap();
    roles.start_relay(&amqp, &RelayConfig::default(), false);
    roles
        .start_consumer(
            ConsumerKind::Billing,
            &amqp,
            &ConsumerConfig::default(),
            &MailConfig::default(),
        )
        .unwrap();
    roles
        .start_consumer(
            ConsumerKind::Email,
            &amqp,
            &ConsumerConfig::default(),
            &MailConfig::default(),
        )
        .unwrap();
    let client = reqwest::Client::new();

    // Each order comes from a caller with a trace of its own.
    let mut traces: HashMap<Uuid, String> = HashMap::new();
    for i in 0..12 {
        let bytes = Uuid::new_v4().into_bytes();
        let (trace, span) = (
            TraceId::from_bytes(bytes),
            SpanId::from_bytes(bytes[..8].try_into().unwrap()),
        );
        let response = client
            .post(format!("http://{addr}/orders"))
            .header("traceparent", format!("00-{trace}-{span}-01"))
            .json(&json!({"productId": format!("p-{i}"), "userId": format!("user_{i}"), "amount": 10 + i}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        let id: Uuid = body["orderId"].as_str().unwrap().parse().unwrap();
        traces.insert(id, trace.to_string());
    }
    let orders = traces.len() as i64;

    eventually(
        "every order confirmed, mailed twice and its outbox drained",
        Duration::from_secs(30),
        || async {
            let done = db
                .count(
                    "SELECT ((SELECT count(*) FROM orders WHERE status <> 'CONFIRMED') \
                           + (SELECT count(*) FROM outbox WHERE published_at IS NULL))::bigint",
                )
                .await
                == 0
                && db.count("SELECT count(*) FROM notifications").await == 2 * orders;
            done.then_some(())
        },
    )
    .await;
    // Stop the roles: each delivery in hand is acked, or goes back to its
    // queue as its channel closes. With every queue then empty, no duplicate
    // is still on its way, so what the tables hold below is final.
    roles.cancel.cancel();
    roles.tracker.close();
    tokio::time::timeout(Duration::from_secs(15), roles.tracker.wait())
        .await
        .expect("the roles stopped in time");
    let consumers: Vec<&str> = SUBSCRIPTIONS.iter().map(|s| s.consumer).collect();
    assert_eq!(
        messages_left(&amqp, &consumers).await,
        Vec::<(String, u32)>::new(),
        "every queue drained and nothing left unacked"
    );

    // The order.created rows, by order: their ids and trace ids.
    let created: Vec<(Uuid, String, Value)> = sqlx::query_as(
        "SELECT transaction_id, aggregate_id, headers FROM outbox WHERE event_type = $1",
    )
    .bind(ORDER_CREATED)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(created.len() as i64, orders);
    let created: HashMap<Uuid, (Uuid, Value)> = created
        .into_iter()
        .map(|(id, order, headers)| (order.parse().unwrap(), (id, headers)))
        .collect();

    // Per order: one charge, one order.confirmed row, published, naming it.
    let ledger: HashMap<Uuid, (i64, i64, i64)> = sqlx::query_as::<_, (Uuid, i64, i64, i64)>(
        "SELECT order_id, count(*), min(id), min(amount) FROM ledger GROUP BY order_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(order, n, id, amount)| (order, (n, id, amount)))
    .collect();
    let confirmed: Vec<ConfirmedRow> = sqlx::query_as(
        "SELECT transaction_id, aggregate_id, payload, headers, published_at IS NOT NULL AS published \
         FROM outbox WHERE event_type = $1",
    )
    .bind(ORDER_CONFIRMED)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        confirmed.len() as i64,
        orders,
        "one order.confirmed row per order"
    );
    let mut confirmed_ids = HashSet::new();
    for row in &confirmed {
        let order: Uuid = row.aggregate_id.parse().unwrap();
        let (created_id, created_headers) = &created[&order];
        let (charges, ledger_id, charged) = ledger[&order];
        let (status, amount, user): (String, i64, String) =
            sqlx::query_as("SELECT status, amount, user_id FROM orders WHERE id = $1")
                .bind(order)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(charges, 1, "order {order} was charged once");
        assert_eq!(charged, amount);
        assert_eq!(status, "CONFIRMED");
        assert!(
            row.published,
            "the order.confirmed row of {order} was published"
        );
        assert_eq!(
            row.transaction_id,
            Uuid::new_v5(created_id, ORDER_CONFIRMED.as_bytes()),
            "the confirmation's id is derived from its order.created id"
        );
        let p = &row.payload;
        assert_eq!(p["transactionId"], row.transaction_id.to_string());
        assert_eq!(p["orderId"], order.to_string());
        assert_eq!(
            (p["amount"].as_i64(), p["userId"].as_str()),
            (Some(amount), Some(user.as_str()))
        );
        assert_eq!(
            p["charge"]["ledgerId"], ledger_id,
            "the charge is the order's ledger row"
        );
        assert_eq!(p["charge"]["amount"], amount);
        assert!(p["charge"]["chargedAt"].is_string(), "{p}");
        // Tracing is on in this test: the confirmation joins the order's trace.
        assert_eq!(
            trace_id(created_headers).as_deref(),
            Some(traces[&order].as_str()),
            "order.created of {order} carries its caller's trace: {created_headers}"
        );
        assert_eq!(
            trace_id(&row.headers).as_deref(),
            Some(traces[&order].as_str()),
            "order.confirmed of {order} continues the order's trace: {}",
            row.headers
        );
        confirmed_ids.insert(row.transaction_id);
    }
    assert_eq!(ledger.len() as i64, orders, "no charge for anything else");

    // Two mails per order: received, then payment confirmed, for its events.
    let mails: Vec<(Uuid, String, String, Uuid)> =
        sqlx::query_as("SELECT order_id, event_type, subject, transaction_id FROM notifications")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut by_order: HashMap<Uuid, Vec<(String, String, Uuid)>> = HashMap::new();
    for (order, event_type, subject, id) in mails {
        by_order
            .entry(order)
            .or_default()
            .push((event_type, subject, id));
    }
    assert_eq!(by_order.len() as i64, orders);
    for (order, mut mails) in by_order {
        mails.sort();
        let created_id = created[&order].0;
        assert_eq!(
            mails,
            vec![
                (
                    ORDER_CONFIRMED.to_owned(),
                    format!("Payment confirmed for order {order}"),
                    Uuid::new_v5(&created_id, ORDER_CONFIRMED.as_bytes()),
                ),
                (
                    ORDER_CREATED.to_owned(),
                    format!("Order {order} received"),
                    created_id,
                ),
            ],
            "the mails of order {order}"
        );
    }

    // The inbox: billing saw each order.created, e-mail both events.
    let processed = |consumer: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(
                "SELECT transaction_id FROM processed_messages WHERE consumer = $1",
            )
            .bind(consumer)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let created_ids: HashSet<Uuid> = created.values().map(|(id, _)| *id).collect();
    let billing = processed(BILLING).await;
    assert_eq!(
        billing.len() as i64,
        orders,
        "1 dedup row per order for billing"
    );
    assert_eq!(billing.into_iter().collect::<HashSet<_>>(), created_ids);
    let email = processed(EMAIL).await;
    assert_eq!(
        email.len() as i64,
        2 * orders,
        "2 dedup rows per order for e-mail"
    );
    assert_eq!(
        email.into_iter().collect::<HashSet<_>>(),
        created_ids.union(&confirmed_ids).copied().collect()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM processed_messages").await,
        3 * orders
    );

    // Stopped above: this only closes the pool.
    roles.wait(Duration::from_secs(15)).await.unwrap();
    db.cleanup().await;
}
