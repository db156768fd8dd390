//! Fixtures shared by the test binaries (integration, tracing, faults,
//! cluster, mail, prometheus, tls): the servers' URLs, a database and broker
//! names of each test's own, the roles run as processes, and polling with a
//! deadline instead of sleeping. Each binary uses a part of it.
#![allow(dead_code)]

pub mod database;
pub mod ports;
pub mod processes;
pub mod rabbit_ctl;
pub mod rabbit_node;
pub mod roles;

pub use database::run_to_end;
pub use ports::free_port;

use std::future::Future;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use order_service::config::AmqpConfig;
use order_service::orders::SUBSCRIPTIONS;
use outbox_common::amqp::QueueNames;
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

/// Creates an empty database `ostest_<uuid>`; returns its name and URL.
pub async fn create_database() -> (String, String) {
    database::create(&admin_url(), "ostest")
        .await
        .expect("creating the test database")
}

/// Drops database `name` (its sessions closed first), if it exists.
pub async fn drop_database(name: &str) {
    let _ = database::remove(&admin_url(), name).await;
}

/// AMQP settings with this test's own exchange and queue names, and short
/// retry delays.
pub fn test_amqp() -> AmqpConfig {
    let id = Uuid::new_v4().simple().to_string();
    let mut config = AmqpConfig::new(amqp_url());
    config = config.with_exchange(format!("t{}_order_events", &id[..12]));
    config = config.with_queue_prefix(format!("t{}_", &id[..12]));
    config = config.with_retry_delays(vec![
        std::time::Duration::from_millis(50),
        std::time::Duration::from_millis(100),
    ]);
    config
}

/// Deletes this test's exchange and every order consumer's queues.
pub async fn cleanup_amqp(config: &AmqpConfig) {
    let consumers: Vec<&str> = SUBSCRIPTIONS.iter().map(|s| s.consumer).collect();
    cleanup_amqp_for(config, &consumers).await;
}

/// Deletes this test's exchange and the queues of `consumers`.
pub async fn cleanup_amqp_for(config: &AmqpConfig, consumers: &[&str]) {
    let connection = Connection::connect(config.url().expose(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    for consumer in consumers {
        let names = QueueNames::new(config, consumer);
        let retries = names.retries.iter().map(|(queue, _)| queue.clone());
        for queue in [names.main.clone(), names.dlq.clone()]
            .into_iter()
            .chain(retries)
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = channel
        .exchange_delete(config.exchange().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "test done".into()).await;
}

/// Drops the test database `ostest_<uuid>` when dropped, even when the test
/// fails, so a failing run leaves nothing behind.
#[derive(Debug)]
pub struct DropDatabase(pub String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        if !name.is_empty() {
            run_to_end(async move { drop_database(&name).await });
        }
    }
}

/// Deletes a test's exchange and queues when dropped, even when the test fails.
#[derive(Debug)]
pub struct DeleteQueues {
    pub config: AmqpConfig,
    pub consumers: Vec<&'static str>,
}

impl DeleteQueues {
    /// For the order consumers' queues.
    pub fn orders(config: &AmqpConfig) -> Self {
        Self {
            config: config.clone(),
            consumers: SUBSCRIPTIONS.iter().map(|s| s.consumer).collect(),
        }
    }
}

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        let (config, consumers) = (self.config.clone(), std::mem::take(&mut self.consumers));
        run_to_end(async move { cleanup_amqp_for(&config, &consumers).await });
    }
}

/// The queues of `consumers` (main, delay and dead-letter queues) that hold
/// messages, with their counts. A message a consumer holds unacked is not
/// counted until its channel closes: stop the consumers first to see every
/// message still on its way.
pub async fn messages_left(config: &AmqpConfig, consumers: &[&str]) -> Vec<(String, u32)> {
    use lapin::options::QueueDeclareOptions;
    let connection = Connection::connect(config.url().expose(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    let mut left = Vec::new();
    for consumer in consumers {
        let names = QueueNames::new(config, consumer);
        let queues = std::iter::once(names.main)
            .chain(names.retries.into_iter().map(|(queue, _)| queue))
            .chain(std::iter::once(names.dlq));
        for queue in queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .expect("the queue exists");
            if declared.message_count() > 0 {
                left.push((queue, declared.message_count()));
            }
        }
    }
    let _ = connection.close(200, "counted".into()).await;
    left
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
