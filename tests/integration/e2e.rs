//! The whole system in one process: POST orders, and every one is confirmed,
//! charged once and notified once; the metrics follow.

use std::time::Duration;

use order_service::config::{ConsumerConfig, HttpConfig, RelayConfig};
use order_service::startup::{ConsumerKind, Roles};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestDb, cleanup_amqp, eventually, test_amqp};

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
async fn every_posted_order_is_confirmed_charged_once_and_notified_once() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
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
    roles.start_consumer(ConsumerKind::Email, &amqp, &ConsumerConfig::default());
    roles.start_consumer(ConsumerKind::Billing, &amqp, &ConsumerConfig::default());
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
        "one notification per order",
        Duration::from_secs(30),
        || async { (db.count("SELECT count(*) FROM notifications").await == 40).then_some(()) },
    )
    .await;
    assert_eq!(
        db.count("SELECT count(DISTINCT order_id) FROM notifications")
            .await,
        40
    );
    let bodies: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.body, format('Hello %s, we received your order %s for product %s (%s minor units).', \
                o.user_id, o.id, o.product_id, o.amount) \
         FROM notifications n JOIN orders o ON o.id = n.order_id AND o.user_id = n.user_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(bodies.len(), 40, "each notification names its order's user");
    for (body, expected) in &bodies {
        assert_eq!(body, expected, "the e-mail names its own order");
    }
    assert!(bodies[0].0.contains(" for product p-"), "{}", bodies[0].0);
    assert_eq!(
        db.count("SELECT count(*) FROM processed_messages").await,
        80
    );

    let text = metrics().await;
    assert_eq!(
        sample(&text, "outbox_pending_rows", "").unwrap(),
        0.0,
        "the outbox drained"
    );
    let billing = format!("queue=\"{}billing_service\"", amqp.queue_prefix);
    assert_eq!(
        sample(&text, "consumer_processed_total", &billing).unwrap(),
        40.0
    );
    assert_eq!(sample(&text, "orders_created_total", "").unwrap(), 40.0);
    assert_eq!(sample(&text, "relay_published_total", "").unwrap(), 40.0);
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
    cleanup_amqp(&amqp).await;
    db.cleanup().await;
}
