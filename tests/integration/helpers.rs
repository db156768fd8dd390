//! Test fixtures: each test gets its own database, its own exchange and queue
//! names, and helpers that poll with a deadline instead of sleeping.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use order_service::amqp::{CONSUMERS, QueueNames};
use order_service::config::{AmqpConfig, DatabaseConfig, HttpConfig};
use order_service::startup::Roles;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The server's admin database; tests create their own beside it.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh database with the migrations applied, dropped by `cleanup`.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!("ostest_{}", Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect_with_url(&admin).await;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("creating the test database");
        let base = admin.rsplit_once('/').expect("a URL with a database").0;
        let url = format!("{base}/{name}");
        let config = DatabaseConfig::new(url.clone());
        let pool = order_service::db::connect(&config, &CancellationToken::new())
            .await
            .expect("connecting to the test database");
        Self { pool, name, url }
    }

    /// A second pool on the same database (for the assertions' own queries).
    pub async fn extra_pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect(&self.url)
            .await
            .expect("connecting")
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect(sql)
    }

    pub async fn cleanup(self) {
        self.pool.close().await;
        let mut conn = sqlx::PgConnection::connect_with_url(&admin_url()).await;
        let _ = conn
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .await;
    }
}

trait ConnectExt {
    async fn connect_with_url(url: &str) -> sqlx::PgConnection;
}

impl ConnectExt for sqlx::PgConnection {
    async fn connect_with_url(url: &str) -> sqlx::PgConnection {
        use sqlx::Connection;
        sqlx::PgConnection::connect(url)
            .await
            .expect("connecting to Postgres")
    }
}

/// AMQP settings with this test's own exchange and queue names, and short
/// retry delays.
pub fn test_amqp() -> AmqpConfig {
    let id = Uuid::new_v4().simple().to_string();
    let mut config = AmqpConfig::new(amqp_url());
    config.exchange = format!("t{}_order_events", &id[..12]);
    config.queue_prefix = format!("t{}_", &id[..12]);
    config.retry_delays_ms = vec![50, 100];
    config
}

pub async fn amqp_channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Deletes this test's exchange and queues.
pub async fn cleanup_amqp(config: &AmqpConfig) {
    let (connection, channel) = amqp_channel().await;
    for consumer in CONSUMERS {
        let names = QueueNames::new(config, consumer);
        let all = [names.main.clone(), names.dlq.clone()]
            .into_iter()
            .chain(names.retries.iter().map(|(q, _)| q.clone()));
        for queue in all {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = channel
        .exchange_delete(
            config.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "test done".into()).await;
}

/// Takes every message now in `queue` (acked), in order.
pub async fn drain_queue(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(got) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        out.push(got.delivery);
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An API on port 0 over its own database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub db: TestDb,
    pub client: reqwest::Client,
    pub roles: Roles,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(HttpConfig::default()).await
    }

    pub async fn spawn_with(http: HttpConfig) -> Self {
        let db = TestDb::new().await;
        let roles = Roles::new(db.pool.clone(), CancellationToken::new());
        let addr = roles
            .start_api(&http, None)
            .await
            .expect("starting the API");
        Self {
            addr,
            db,
            client: reqwest::Client::new(),
            roles,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn post_order(&self, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url("/orders"))
            .json(&body)
            .send()
            .await
            .expect("POST /orders")
    }

    pub async fn stop(self) {
        self.roles.cancel.cancel();
        self.roles
            .wait(Duration::from_secs(10))
            .await
            .expect("roles stop in time");
        self.db.cleanup().await;
    }
}

pub fn order_body() -> serde_json::Value {
    serde_json::json!({"productId": "123", "userId": "user_99", "amount": 500})
}
