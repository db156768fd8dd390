//! The order API: what a client sees and what lands in Postgres.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, eventually, order_body};

async fn row_counts(app: &TestApp) -> (i64, i64) {
    (
        app.db.count("SELECT count(*) FROM orders").await,
        app.db.count("SELECT count(*) FROM outbox").await,
    )
}

#[tokio::test]
async fn an_accepted_order_is_stored_with_its_outbox_event() {
    let app = TestApp::spawn().await;

    let response = app.post_order(order_body()).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let order_id = body["orderId"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "PENDING");
    assert!(body["message"].is_string());
    assert_eq!(location, format!("/orders/{order_id}"));

    let (status, amount): (String, i64) =
        sqlx::query_as("SELECT status, amount FROM orders WHERE id = $1::uuid")
            .bind(&order_id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), amount), ("PENDING", 500));

    let (event_type, aggregate_id, payload, published): (
        String,
        String,
        Value,
        Option<chrono::DateTime<chrono::Utc>>,
    ) = sqlx::query_as("SELECT event_type, aggregate_id, payload, published_at FROM outbox")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(event_type, "order.created");
    assert_eq!(aggregate_id, order_id);
    assert!(
        published.is_none(),
        "nothing talks to RabbitMQ in the request"
    );
    assert_eq!(payload["orderId"], order_id.as_str());
    assert_eq!(payload["productId"], "123");
    assert_eq!(payload["userId"], "user_99");
    assert_eq!(payload["amount"], 500);
    assert!(
        payload["transactionId"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .is_ok()
    );
    assert!(payload["timestamp"].is_string());

    let fetched: Value = app
        .client
        .get(app.url(&location))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["orderId"], order_id.as_str());
    assert_eq!(fetched["status"], "PENDING");
    assert_eq!(fetched["amount"], 500);
    app.stop().await;
}

#[tokio::test]
async fn a_failing_outbox_insert_leaves_no_order_behind() {
    let app = TestApp::spawn().await;
    // Make the outbox insert fail inside the order's transaction.
    sqlx::query("ALTER TABLE outbox ADD CONSTRAINT reject_all CHECK (event_type = 'never')")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let response = app.post_order(order_body()).await;

    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "internal server error"}),
        "no internals leak"
    );
    assert_eq!(row_counts(&app).await, (0, 0));
    app.stop().await;
}

#[tokio::test]
async fn bad_input_is_rejected_with_a_json_error_and_writes_nothing() {
    let app = TestApp::spawn_with(order_service::config::HttpConfig {
        body_limit: 1024,
        ..Default::default()
    })
    .await;
    let valid = r#"{"productId":"123","userId":"user_99","amount":500}"#;
    let with_amount = |a: &str| format!(r#"{{"productId":"123","userId":"user_99","amount":{a}}}"#);
    let with_product = |p: &str| format!(r#"{{"productId":{p},"userId":"user_99","amount":500}}"#);
    let long_id = format!("\"{}\"", "x".repeat(129));
    let huge = format!(
        r#"{{"productId":"{}","userId":"u","amount":1}}"#,
        "x".repeat(2000)
    );
    let json = "application/json";
    let cases: Vec<(&str, String, Option<&str>, StatusCode)> = vec![
        (
            "malformed JSON",
            "{\"productId\": ".into(),
            Some(json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not an object",
            "[1,2,3]".into(),
            Some(json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "missing amount",
            r#"{"productId":"1","userId":"u"}"#.into(),
            Some(json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "missing userId",
            r#"{"productId":"1","amount":5}"#.into(),
            Some(json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "null productId",
            with_product("null"),
            Some(json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty productId",
            with_product("\"\""),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "blank productId",
            with_product("\"   \""),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "numeric productId",
            with_product("123"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "NUL in productId",
            with_product("\"a\\u0000b\""),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "absurdly long productId",
            with_product(&long_id),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "zero amount",
            with_amount("0"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative amount",
            with_amount("-5"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "fractional amount",
            with_amount("5.5"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "string amount",
            with_amount("\"500\""),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "out-of-range amount",
            with_amount("99999999999999999999999"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "amount over the maximum",
            with_amount("1000000000001"),
            Some(json),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "wrong content type",
            valid.into(),
            Some("text/plain"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "missing content type",
            valid.into(),
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "body over the limit",
            huge,
            Some(json),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (what, body, content_type, expected) in cases {
        let mut request = app.client.post(app.url("/orders")).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), expected, "{what}");
        let error: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert!(
            error["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {error}"
        );
    }
    // Invalid UTF-8 inside a string.
    let mut bytes = br#"{"productId":""#.to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(br#"","userId":"u","amount":1}"#);
    let response = app
        .client
        .post(app.url("/orders"))
        .header("content-type", json)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST, "invalid UTF-8");

    assert_eq!(row_counts(&app).await, (0, 0), "no bad request wrote a row");
    app.stop().await;
}

#[tokio::test]
async fn text_that_looks_like_sql_is_stored_as_data() {
    let app = TestApp::spawn().await;
    let sneaky = "1'); DROP TABLE orders; --";

    let response = app
        .post_order(json!({"productId": sneaky, "userId": "o'brien", "amount": 1}))
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let stored: (String, String) = sqlx::query_as("SELECT product_id, user_id FROM orders")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, (sneaky.to_owned(), "o'brien".to_owned()));
    app.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_and_body_returns_the_first_answer() {
    let app = TestApp::spawn().await;
    let post = |body: Value| {
        app.client
            .post(app.url("/orders"))
            .header("Idempotency-Key", "order-abc-1")
            .json(&body)
            .send()
    };

    let first = post(order_body()).await.unwrap();
    let second = post(order_body()).await.unwrap();
    let other = post(json!({"productId": "123", "userId": "user_99", "amount": 501}))
        .await
        .unwrap();

    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["orderId"], second["orderId"]);
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(row_counts(&app).await, (1, 1));
    app.stop().await;
}

#[tokio::test]
async fn eight_concurrent_requests_with_one_key_create_one_order() {
    let app = TestApp::spawn().await;
    let requests = (0..8).map(|_| {
        app.client
            .post(app.url("/orders"))
            .header("Idempotency-Key", "same-key-for-all")
            .json(&order_body())
            .send()
    });

    let responses = futures_util::future::join_all(requests).await;

    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        ids.insert(body["orderId"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every client got the same order id");
    assert_eq!(row_counts(&app).await, (1, 1));
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_rejected() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .post(app.url("/orders"))
        .header("Idempotency-Key", "k".repeat(300))
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(row_counts(&app).await, (0, 0));
    app.stop().await;
}

#[tokio::test]
async fn get_order_answers_404_for_unknown_and_400_for_a_non_uuid() {
    let app = TestApp::spawn().await;
    let unknown = app
        .client
        .get(app.url(&format!("/orders/{}", uuid::Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    let not_uuid = app
        .client
        .get(app.url("/orders/not-a-uuid"))
        .send()
        .await
        .unwrap();
    let no_route = app.client.get(app.url("/nowhere")).send().await.unwrap();
    let wrong_method = app.client.delete(app.url("/orders")).send().await.unwrap();

    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(not_uuid.status(), StatusCode::BAD_REQUEST);
    assert!(not_uuid.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(no_route.status(), StatusCode::NOT_FOUND);
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    app.stop().await;
}

#[tokio::test]
async fn health_and_readiness_report_postgres() {
    let app = TestApp::spawn().await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(ready.status(), StatusCode::OK);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["postgres"], "ok");
    app.stop().await;
}

#[tokio::test]
async fn readiness_fails_when_the_outbox_lags_behind() {
    let app = TestApp::spawn_with(order_service::config::HttpConfig {
        max_outbox_lag_ms: 1_000,
        ..Default::default()
    })
    .await;
    app.post_order(order_body()).await;
    sqlx::query("UPDATE outbox SET created_at = now() - interval '1 minute'")
        .execute(&app.db.pool)
        .await
        .unwrap();

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();

    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let app = TestApp::spawn().await;
    // Hold a lock so the next order insert waits inside its transaction.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let client = app.client.clone();
    let url = app.url("/orders");
    let in_flight = tokio::spawn(async move { client.post(url).json(&order_body()).send().await });
    let observer = app.db.extra_pool(1).await;
    eventually("the request to wait on the lock", Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&observer)
        .await
        .unwrap();
        (waiting > 0).then_some(())
    })
    .await;

    app.roles.cancel.cancel();
    // New connections are refused once shutdown begins.
    let refused = eventually("the listener to close", Duration::from_secs(5), || async {
        let attempt = reqwest::Client::new().get(app.url("/healthz")).send().await;
        attempt.is_err().then_some(())
    });
    refused.await;
    assert!(
        !in_flight.is_finished(),
        "the in-flight request is still being served"
    );
    blocker.rollback().await.unwrap();

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request got an answer");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(row_counts(&app).await, (1, 1));
    app.roles
        .wait(Duration::from_secs(10))
        .await
        .expect("roles stopped");
    app.db.cleanup().await;
}

#[tokio::test]
async fn a_request_over_the_timeout_gets_a_503_json_error() {
    let app = TestApp::spawn_with(order_service::config::HttpConfig {
        request_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    // Hold a lock so the order insert cannot finish in time.
    let mut blocker = app.db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let response = app.post_order(order_body()).await;

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at the timeout, not after the lock"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"error": "request timed out"}));
    blocker.rollback().await.unwrap();
    app.stop().await;
}

/// Pooled connections in steady use are not pinged before use. When
/// Postgres drops every one of them (a restart, an administrator), the next
/// order is still accepted: its write moves on to a live connection.
#[tokio::test]
async fn an_order_is_accepted_after_postgres_dropped_every_pooled_connection() {
    let app = TestApp::spawn().await;
    // Several idle connections in the pool, all just used.
    let held = futures_util::future::join_all((0..6).map(|_| app.db.pool.acquire())).await;
    drop(held);
    let admin = app.db.extra_pool(1).await;
    let dropped: Vec<i32> = sqlx::query_scalar(
        "WITH pooled AS MATERIALIZED ( \
             SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) \
         SELECT pid FROM pooled WHERE pg_terminate_backend(pid)",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(dropped.len() >= 6, "{dropped:?}");
    eventually(
        "the dropped connections to end",
        Duration::from_secs(5),
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                    .bind(&dropped)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;

    let response = app.post_order(order_body()).await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(row_counts(&app).await, (1, 1));
    admin.close().await;
    app.stop().await;
}
