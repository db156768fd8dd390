//! Bounded tables: dedup rows and idempotency keys past their retention are
//! pruned by the roles' retention task, young ones are kept, a dedup window
//! shorter than the retries is refused at start, and `dlq replay` leaves
//! letters older than the window unless forced.

use std::process::Command;
use std::time::Duration;

use inbox::dlq;
use lapin::BasicProperties;
use order_service::config::RetentionConfig;
use order_service::orders::events::BILLING_SUBSCRIPTION;
use order_service::retention;
use outbox_common::amqp::declare_consumer_queues;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{DeleteQueues, TestDb, amqp_channel, drain_queue, eventually, test_amqp};

/// `n` dedup rows of `consumer` and `n` idempotency keys, written `age` ago.
async fn rows_aged(pool: &PgPool, consumer: &str, n: i64, age: Duration) {
    sqlx::query(
        "INSERT INTO processed_messages (consumer, transaction_id, processed_at) \
         SELECT $1, gen_random_uuid(), now() - make_interval(secs => $3) FROM generate_series(1, $2)",
    )
    .bind(consumer)
    .bind(n)
    .bind(age.as_secs_f64())
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (key, request, order_id, created_at) \
         SELECT gen_random_uuid()::text, '{}'::jsonb, gen_random_uuid(), now() - make_interval(secs => $2) \
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(age.as_secs_f64())
    .execute(pool)
    .await
    .unwrap();
}

async fn dedup_rows(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM processed_messages").await
}

async fn keys(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM idempotency_keys").await
}

#[tokio::test]
async fn with_a_retention_of_seconds_dedup_rows_and_idempotency_keys_disappear() {
    let db = TestDb::new().await;
    rows_aged(&db.pool, "billing_service", 30, Duration::ZERO).await;
    let retention = Duration::from_secs(2);
    let prunes = vec![
        inbox::dedup_prune("billing_service", retention).with_batch(7),
        retention::idempotency_keys(retention).with_batch(7),
    ];
    let cancel = CancellationToken::new();
    let task = tokio::spawn(retention::run(
        db.pool.clone(),
        prunes,
        Duration::from_secs(1),
        cancel.clone(),
    ));

    eventually(
        "the dedup rows and keys to be pruned",
        Duration::from_secs(20),
        || async { (dedup_rows(&db).await == 0 && keys(&db).await == 0).then_some(()) },
    )
    .await;

    cancel.cancel();
    task.await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_stopping_role_prunes_no_further_batch() {
    let db = TestDb::new().await;
    rows_aged(&db.pool, "billing_service", 30, Duration::from_secs(3600)).await;
    let prunes = vec![inbox::dedup_prune("billing_service", Duration::from_secs(1)).with_batch(7)];
    // Cancelled before it starts, as in a shutdown that arrives mid-prune:
    // the task returns without deleting a batch.
    let cancel = CancellationToken::new();
    cancel.cancel();
    tokio::time::timeout(
        Duration::from_secs(10),
        retention::run(db.pool.clone(), prunes, Duration::from_secs(60), cancel),
    )
    .await
    .expect("a cancelled retention task returns at once");
    assert_eq!(
        dedup_rows(&db).await,
        30,
        "no batch deleted after the cancel"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn with_the_default_retention_nothing_young_is_pruned_and_the_old_goes() {
    let db = TestDb::new().await;
    let defaults = RetentionConfig::default();
    rows_aged(&db.pool, "billing_service", 5, Duration::from_secs(3600)).await;
    rows_aged(
        &db.pool,
        "billing_service",
        4,
        Duration::from_secs(8 * 24 * 3600),
    )
    .await;
    // Another consumer's old rows are its own role's to prune.
    rows_aged(
        &db.pool,
        "email_notification_service",
        3,
        Duration::from_secs(8 * 24 * 3600),
    )
    .await;

    let dedup = inbox::dedup_prune("billing_service", defaults.dedup())
        .run_once(&db.pool)
        .await
        .unwrap();
    let keys_pruned = retention::idempotency_keys(defaults.idempotency_keys())
        .run_once(&db.pool)
        .await
        .unwrap();

    assert_eq!(dedup, 4, "only billing's rows older than 7 days");
    assert_eq!(keys_pruned, 7, "only keys older than 7 days");
    assert_eq!(dedup_rows(&db).await, 5 + 3);
    assert_eq!(keys(&db).await, 5);
    db.cleanup().await;
}

#[tokio::test]
async fn a_dedup_window_shorter_than_the_retries_is_refused_at_start() {
    let db = TestDb::new().await;
    let output = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["consume", "billing"])
        .env("DATABASE_URL", &db.url)
        .env("RETRY_DELAYS_MS", "1000,10000,60000")
        .env("DEDUP_RETENTION_SECS", "30")
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("running order-service");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must not start: {stderr}");
    assert!(stderr.contains("DEDUP_RETENTION_SECS"), "{stderr}");
    assert_eq!(
        db.count("SELECT count(*) FROM processed_messages").await,
        0,
        "nothing ran"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn dlq_replay_leaves_letters_older_than_the_dedup_window_unless_forced() {
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let (connection, channel) = amqp_channel().await;
    outbox_common::amqp::declare_exchange(&channel, &amqp)
        .await
        .unwrap();
    let queues = declare_consumer_queues(&channel, &amqp, &BILLING_SUBSCRIPTION)
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp() as u64;
    let letter = |age_secs: u64| {
        BasicProperties::default()
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_timestamp(now - age_secs)
    };
    dlq::publish(&channel, &queues.dlq, b"{}", letter(60))
        .await
        .unwrap();
    dlq::publish(&channel, &queues.dlq, b"{}", letter(3 * 3600))
        .await
        .unwrap();
    let window = Some(Duration::from_secs(3600));

    let first = dlq::replay(&amqp, &queues, 100, window).await.unwrap();
    assert_eq!((first.moved, first.too_old), (1, 1), "the young one moves");
    let forced = dlq::replay(&amqp, &queues, 100, None).await.unwrap();
    assert_eq!(
        (forced.moved, forced.too_old),
        (1, 0),
        "--force moves the old one"
    );

    assert_eq!(drain_queue(&channel, &queues.main).await.len(), 2);
    assert!(drain_queue(&channel, &queues.dlq).await.is_empty());
    let _ = connection.close(200, "done".into()).await;
}

/// Per-aggregate order keeps its state bounded by the same rules: a
/// consumer's places not moved on within the window are pruned, except
/// those whose aggregate still has held events (pruning them would let a
/// held event's successors go first); the outbox's counters of aggregates
/// not written to within the retention go too.
#[tokio::test]
async fn per_aggregate_places_and_counters_are_pruned_past_their_window_unless_held() {
    let db = TestDb::new().await;
    let old = "now() - interval '1 hour'";
    for statement in [
        format!(
            "INSERT INTO inbox_aggregates (consumer, aggregate_type, aggregate_id, last_seq, updated_at) \
             VALUES ('email_notification_service', 'order', 'old', 2, {old}), \
                    ('email_notification_service', 'order', 'old-held', 1, {old}), \
                    ('email_notification_service', 'order', 'young', 1, now())"
        ),
        "INSERT INTO inbox_held (consumer, transaction_id, aggregate_type, aggregate_id, seq, \
           predecessor, event_type, routing_key, body) \
         VALUES ('email_notification_service', gen_random_uuid(), 'order', 'old-held', 3, 2, \
           'order.confirmed', 'order.confirmed', '\\x7b7d')"
            .to_owned(),
        format!(
            "INSERT INTO outbox_aggregates (aggregate_type, aggregate_id, last_seq, updated_at) \
             VALUES ('order', 'old', 2, {old}), ('order', 'young', 1, now())"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let window = Duration::from_secs(60);
    let places = inbox::sequence_prune("email_notification_service", window);
    let counters = order_service::orders::EVENTS
        .prune_counters(window)
        .expect("the events' outbox is sequenced");

    assert_eq!(places.run_once(&db.pool).await.unwrap(), 1);
    assert_eq!(counters.run_once(&db.pool).await.unwrap(), 1);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM inbox_aggregates ORDER BY aggregate_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, ["old-held", "young"]);
    let counters_left: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM outbox_aggregates")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(counters_left, ["young"]);
    db.cleanup().await;
}
