//! Test fixtures: each test gets its own database, its own exchange and queue
//! names, and helpers that poll with a deadline instead of sleeping.

use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use order_service::config::{DatabaseConfig, HttpConfig};
use order_service::startup::Roles;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::common;
pub use crate::common::{DeleteQueues, amqp_url, eventually, messages_left, test_amqp};

/// A fresh database with the migrations applied, dropped by `cleanup` or,
/// if the test fails first, when it is dropped.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
    _guard: common::DropDatabase,
}

impl TestDb {
    pub async fn new() -> Self {
        let (name, url) = common::create_database().await;
        let config = DatabaseConfig::new(url.clone());
        let pool = order_service::db::connect(&config, &CancellationToken::new())
            .await
            .expect("connecting to the test database");
        Self {
            pool,
            _guard: common::DropDatabase(name.clone()),
            name,
            url,
        }
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

    /// Closes the pool and drops the database now.
    pub async fn cleanup(self) {
        self.pool.close().await;
        // The guard drops the database as `self` goes.
    }
}

pub async fn amqp_channel() -> (Connection, Channel) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
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

/// Makes `subscriber` the default of this thread only, for a test that
/// needs spans: `#[tokio::test]` polls every task of the test on its own
/// thread, and the other tests, on theirs, keep the no-op subscriber.
///
/// tracing caches each callsite's interest globally. While ONE dispatcher
/// exists it computes that interest from the default of whichever thread
/// hits the callsite first, so a span first opened by another test would be
/// cached as disabled for this one too; a second dispatcher, kept for the
/// whole run, makes tracing ask every dispatcher instead.
pub fn trace_this_thread<S>(subscriber: S) -> tracing::subscriber::DefaultGuard
where
    S: tracing::Subscriber + Send + Sync + 'static,
{
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    tracing::subscriber::set_default(subscriber)
}
