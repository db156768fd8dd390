//! Typed configuration, read once from flags and environment variables and
//! passed down. No globals: tests build these structs directly. Secrets are
//! [`SecretUrl`]s (`outbox_common::secret`); the retention and mail settings have files of
//! their own.

mod auth;
mod mail;
mod retention;

pub use auth::AuthConfig;
pub use mail::MailConfig;
pub use outbox_common::secret::{SecretUrl, redact_url, split_list};
pub use retention::{RetentionConfig, WEEK_SECS};

use std::net::SocketAddr;
use std::time::Duration;

/// Postgres settings shared by every role.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres:postgres@localhost:5432/orders",
        hide_env_values = true
    )]
    pub database_url: SecretUrl,
    /// Maximum connections in the pool.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 40)]
    pub pool_size: u32,
    /// How long to wait for a pooled connection before failing a request (ms).
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 5_000)]
    pub acquire_timeout_ms: u64,
    /// Do not apply migrations at start.
    #[arg(long, env = "SKIP_MIGRATIONS", default_value_t = false)]
    pub skip_migrations: bool,
}

impl DatabaseConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            database_url: SecretUrl::new(url),
            pool_size: 40,
            acquire_timeout_ms: 5_000,
            skip_migrations: false,
        }
    }
}

pub use inbox::ConsumerConfig;
pub use outbox::RelayConfig;
pub use outbox_common::amqp::{AmqpConfig, QueueType};

/// RabbitMQ settings shared by the relay and the consumers: the flags and
/// variables of [`AmqpConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpSettings {
    /// RabbitMQ URL, or the URLs of a cluster's nodes, comma separated: each
    /// connection tries them in turn, starting at a random one. `amqps://`
    /// is always TLS, with RabbitMQ's URI query parameters: `cacertfile`
    /// (the only CAs trusted; the system's roots without it), `certfile` and
    /// `keyfile` (a client certificate), `verify=verify_none` (no check of
    /// the server's certificate; `verify_peer` is the default) and
    /// `server_name_indication` (the name sent and verified, or `disable`).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: SecretUrl,
    /// Type of the main, retry and dead-letter queues (quorum or classic). A
    /// queue cannot change its type in place: see docs/operations.md before
    /// switching.
    #[arg(long, env = "QUEUE_TYPE", default_value = "quorum", value_parser = parse_queue_type)]
    pub queue_type: QueueType,
    /// Exchange the relay publishes to.
    #[arg(long, env = "AMQP_EXCHANGE", default_value = "order_events")]
    pub exchange: String,
    /// Prefix for every queue name (lets tests and tenants share one vhost).
    #[arg(long, env = "AMQP_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// Delays of the retry queues, in ms, comma separated; one retry per entry.
    #[arg(
        long,
        env = "RETRY_DELAYS_MS",
        default_value = "1000,10000,60000",
        value_delimiter = ','
    )]
    pub retry_delays_ms: Vec<u64>,
}

fn parse_queue_type(value: &str) -> Result<QueueType, String> {
    value.parse()
}

impl AmqpSettings {
    /// The settings as the core crates take them.
    pub fn config(&self) -> AmqpConfig {
        AmqpConfig::new(self.amqp_url.expose())
            .with_queue_type(self.queue_type)
            .with_exchange(&self.exchange)
            .with_app_id("order-service")
            .with_queue_prefix(&self.queue_prefix)
            .with_retry_delays(
                self.retry_delays_ms
                    .iter()
                    .copied()
                    .map(Duration::from_millis)
                    .collect(),
            )
    }
}

/// HTTP API settings.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpConfig {
    /// Address to listen on.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:3000")]
    pub http_addr: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "HTTP_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub body_limit: usize,
    /// Requests taking longer than this are answered 503 (ms).
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// `/readyz` fails when the oldest pending outbox row is older (ms).
    #[arg(long, env = "READY_MAX_OUTBOX_LAG_MS", default_value_t = 60_000)]
    pub max_outbox_lag_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            body_limit: 64 * 1024,
            request_timeout_ms: 10_000,
            max_outbox_lag_ms: 60_000,
        }
    }
}

/// Relay settings: the flags and variables of [`RelayConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct RelaySettings {
    /// Rows claimed per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 750)]
    pub batch_size: i64,
    /// The confirm window is `batch_size × workers` publishes awaiting
    /// confirms, shared by the batches; `workers + 2` claims may be open.
    #[arg(long, env = "RELAY_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Fallback poll interval when nothing wakes the relay (ms).
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub poll_interval_ms: u64,
    /// Published rows older than this are deleted (seconds).
    #[arg(long, env = "OUTBOX_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,
    /// `poll`: claim due rows and mark them published. `wal`: publish from a
    /// logical replication slot (Postgres's `wal_level = logical`), with the
    /// polling relay beside it for the rows the broker refuses. See
    /// docs/operations.md, "The WAL relay".
    #[arg(long, env = "RELAY_MODE", default_value = "poll")]
    pub mode: RelayMode,
    /// The WAL relay's logical replication slot.
    #[arg(long, env = "WAL_SLOT", default_value = "outbox_relay")]
    pub wal_slot: String,
    /// The WAL relay's publication of the outbox's inserts.
    #[arg(long, env = "WAL_PUBLICATION", default_value = "outbox_relay")]
    pub wal_publication: String,
    /// How often the WAL relay records how far its slot got (seconds): what
    /// retention may delete, and what a lost slot hands back.
    #[arg(long, env = "WAL_HORIZON_INTERVAL_SECS", default_value_t = 60)]
    pub wal_horizon_interval_secs: u64,
}

/// How the relay finds the rows to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// Claim due rows (`FOR UPDATE SKIP LOCKED`) and mark them published.
    Poll,
    /// Read the outbox's inserts from a logical replication slot.
    Wal,
}

impl RelaySettings {
    /// The settings as the outbox crate takes them.
    pub fn config(&self) -> RelayConfig {
        RelayConfig::default()
            .with_batch_size(self.batch_size)
            .with_workers(self.workers)
            .with_poll_interval(Duration::from_millis(self.poll_interval_ms))
            .with_retention(Duration::from_secs(self.retention_secs))
    }

    /// The WAL relay's source on `db`'s database, in `wal` mode.
    pub fn wal(&self, db: &DatabaseConfig) -> Result<Option<WalSource>, crate::db::StartError> {
        if self.mode != RelayMode::Wal {
            return Ok(None);
        }
        let replication =
            crate::db::replication_config(&db.database_url, &self.wal_slot, &self.wal_publication)?;
        Ok(Some(WalSource {
            replication,
            horizon_interval: Duration::from_secs(self.wal_horizon_interval_secs.max(1)),
        }))
    }
}

/// Where the WAL relay reads, and how often it records its progress.
#[derive(Debug, Clone)]
pub struct WalSource {
    pub replication: outbox::wal::ReplicationConfig,
    pub horizon_interval: Duration,
}

/// Consumer settings: the flags and variables of [`ConsumerConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerSettings {
    /// Unacked deliveries the broker may send at once (basic.qos prefetch).
    #[arg(long, env = "CONSUMER_PREFETCH", default_value_t = 128)]
    pub prefetch: u16,
    /// Transactions (batches of deliveries) handled at once; each holds a
    /// pooled connection while it runs, so keep it under
    /// `DATABASE_POOL_SIZE` (with the other roles' needs when they share the
    /// process).
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Most deliveries in one transaction: those already received when a
    /// transaction starts share it (1 = one transaction per delivery).
    #[arg(
        long = "consumer-batch-size",
        id = "consumer_batch_size",
        value_name = "CONSUMER_BATCH_SIZE",
        env = "CONSUMER_BATCH_SIZE",
        default_value_t = 64
    )]
    pub batch_size: usize,
}

impl ConsumerSettings {
    /// The settings as the inbox crate takes them.
    pub fn config(&self) -> ConsumerConfig {
        ConsumerConfig::default()
            .with_prefetch(self.prefetch)
            .with_concurrency(self.concurrency)
            .with_batch_size(self.batch_size)
    }
}
