//! The RabbitMQ settings of a relay, a consumer or a tool: where the
//! brokers are, and the names and types of the topology's parts.

use std::str::FromStr;
use std::time::Duration;

use crate::secret::{SecretUrl, split_list};

/// The type of every queue the topology declares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated across a cluster (Raft); at-least-once dead-lettering.
    #[default]
    Quorum,
    /// One node's queue, not replicated (RabbitMQ 4.x: no mirroring).
    Classic,
}

impl FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            other => Err(format!("unknown queue type {other:?} (quorum or classic)")),
        }
    }
}

/// RabbitMQ settings shared by relays, consumers and the DLQ tools. Built
/// with [`AmqpConfig::new`] and the `with_` methods; the defaults: exchange
/// `events`, no queue prefix, quorum queues, retries after 1 s, 10 s and
/// 60 s, and `outbox` as the messages' `app_id`.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    url: SecretUrl,
    queue_type: QueueType,
    exchange: String,
    app_id: String,
    queue_prefix: String,
    retry_delays: Vec<Duration>,
}

impl AmqpConfig {
    /// The settings for `url`: one broker's URL, or a cluster's nodes'
    /// URLs, comma separated. `amqps://` is always TLS, with RabbitMQ's URI
    /// query parameters (`cacertfile`, `certfile`, `keyfile`, `verify`,
    /// `server_name_indication`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretUrl::new(url),
            queue_type: QueueType::Quorum,
            exchange: "events".into(),
            app_id: "outbox".into(),
            queue_prefix: String::new(),
            retry_delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ],
        }
    }

    /// Another URL (or list of URLs), the other settings kept.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = SecretUrl::new(url);
        self
    }

    /// The type of the main, retry and dead-letter queues.
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// The topic exchange relays publish to and queues are bound to.
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The `app_id` property of the messages a relay publishes (the
    /// publishing service's name).
    pub fn with_app_id(mut self, app_id: impl Into<String>) -> Self {
        self.app_id = app_id.into();
        self
    }

    /// A prefix for every queue name (lets tests and tenants share a vhost).
    pub fn with_queue_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.queue_prefix = prefix.into();
        self
    }

    /// The delays of the retry queues: one retry per entry, first to last.
    pub fn with_retry_delays(mut self, delays: Vec<Duration>) -> Self {
        self.retry_delays = delays;
        self
    }

    /// The URL (or list of URLs) as given, its password hidden when printed.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// The broker URLs, as given.
    pub fn urls(&self) -> Vec<&str> {
        // Split only before a new `scheme://`, so a comma in a password
        // stays in its URL.
        split_list(self.url.expose())
            .into_iter()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The type of every queue.
    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// The exchange's name.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The messages' `app_id`.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// The prefix of every queue name.
    pub fn queue_prefix(&self) -> &str {
        &self.queue_prefix
    }

    /// The retry queues' delays, first to last.
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }
}
