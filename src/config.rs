//! Typed configuration, read once from flags and environment variables and
//! passed down. No globals: tests build these structs directly.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// A connection URL that may carry a password, kept in a
/// [`secrecy::SecretString`] (zeroed on drop, never printed). `Debug` and
/// `Display` print it with the password replaced, so it can never reach a
/// log by accident.
#[derive(Clone)]
pub struct SecretUrl(SecretString);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(SecretString::from(url.into()))
    }

    /// The real URL, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with any password replaced by `***` (each URL of a
    /// comma-separated list).
    pub fn redacted(&self) -> String {
        self.expose()
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl PartialEq for SecretUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of `scheme://user:password@host/...` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

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

/// The type of every queue the service declares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated across a cluster (Raft); at-least-once dead-lettering.
    #[default]
    Quorum,
    /// One node's queue, not replicated (RabbitMQ 4.x: no mirroring).
    Classic,
}

/// RabbitMQ settings shared by the relay and the consumers.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpConfig {
    /// RabbitMQ URL, or the URLs of a cluster's nodes, comma separated: each
    /// connection tries them in turn, starting at a random one.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@localhost:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: SecretUrl,
    /// Type of the main, retry and dead-letter queues. A queue cannot change
    /// its type in place: see docs/operations.md before switching.
    #[arg(long, env = "QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum)]
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

impl AmqpConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            amqp_url: SecretUrl::new(url),
            queue_type: QueueType::Quorum,
            exchange: "order_events".into(),
            queue_prefix: String::new(),
            retry_delays_ms: vec![1_000, 10_000, 60_000],
        }
    }

    /// The broker URLs, in the order given.
    pub fn urls(&self) -> Vec<&str> {
        self.amqp_url
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .copied()
            .map(Duration::from_millis)
            .collect()
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

/// Relay settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Rows claimed per batch.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 750)]
    pub batch_size: i64,
    /// The confirm window is `batch_size × workers` publishes awaiting
    /// confirms, shared by the batches; `workers + 1` claims may be open.
    #[arg(long, env = "RELAY_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Fallback poll interval when nothing wakes the relay (ms).
    #[arg(long, env = "RELAY_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub poll_interval_ms: u64,
    /// Published rows older than this are deleted (seconds).
    #[arg(long, env = "OUTBOX_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub retention_secs: u64,
}

impl RelayConfig {
    /// How long published rows are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 750,
            workers: 2,
            poll_interval_ms: 1_000,
            retention_secs: 7 * 24 * 3600,
        }
    }
}

/// How long the dedup rows and idempotency keys are kept, and how often the
/// pruner runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionConfig {
    /// Dedup rows (`processed_messages`) older than this are deleted
    /// (seconds). A redelivery or a replay later than this is applied again.
    #[arg(long, env = "DEDUP_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub dedup_retention_secs: u64,
    /// Idempotency keys older than this are deleted (seconds).
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub idempotency_key_retention_secs: u64,
    /// How often the pruner runs (seconds).
    #[arg(long, env = "PRUNE_INTERVAL_SECS", default_value_t = 60)]
    pub prune_interval_secs: u64,
}

/// Seven days, the default of every retention.
pub const WEEK_SECS: u64 = 7 * 24 * 3600;

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            dedup_retention_secs: WEEK_SECS,
            idempotency_key_retention_secs: WEEK_SECS,
            prune_interval_secs: 60,
        }
    }
}

impl RetentionConfig {
    pub fn dedup(&self) -> Duration {
        Duration::from_secs(self.dedup_retention_secs)
    }

    pub fn idempotency_keys(&self) -> Duration {
        Duration::from_secs(self.idempotency_key_retention_secs)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.prune_interval_secs.max(1))
    }

    /// Refuses a dedup window shorter than a message's way through every
    /// retry queue (the sum of the delays, so at least the longest): a
    /// message still retrying after its dedup row was pruned could be
    /// applied twice.
    pub fn check(&self, amqp: &AmqpConfig) -> Result<(), String> {
        let retries: Duration = amqp.retry_delays().into_iter().sum();
        if self.dedup() < retries {
            return Err(format!(
                "DEDUP_RETENTION_SECS ({}s) is shorter than the retry delays together ({}s): \
                 a message still being retried could be applied twice",
                self.dedup_retention_secs,
                retries.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// The mailer: SMTP delivery of the e-mail outbox.
#[derive(Debug, Clone, clap::Args)]
pub struct MailConfig {
    /// SMTP server, `smtp://host:port` (plain SMTP; this build links no TLS).
    /// Unset: the mailer is off and notifications are only recorded.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<SecretUrl>,
    /// The sender of every mail.
    #[arg(
        long,
        env = "EMAIL_FROM",
        default_value = "order-service <orders@example.com>"
    )]
    pub email_from: String,
    /// Mails go to `<userId>@<this domain>`.
    #[arg(long, env = "EMAIL_RECIPIENT_DOMAIN", default_value = "example.com")]
    pub email_recipient_domain: String,
    /// Mails sent at once.
    #[arg(long, env = "MAILER_CONCURRENCY", default_value_t = 8)]
    pub mailer_concurrency: usize,
    /// Longest one SMTP exchange may take (ms).
    #[arg(long, env = "SMTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub smtp_timeout_ms: u64,
    /// Sent mails are deleted from the mails' outbox after this (seconds);
    /// mails given up on (a 5xx) stay for an operator to look at.
    #[arg(long, env = "MAIL_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub mail_retention_secs: u64,
}

impl MailConfig {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.mail_retention_secs)
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            email_from: "order-service <orders@example.com>".into(),
            email_recipient_domain: "example.com".into(),
            mailer_concurrency: 8,
            smtp_timeout_ms: 10_000,
            mail_retention_secs: WEEK_SECS,
        }
    }
}

/// Consumer settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerConfig {
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
    /// Share of e-mail events the handler refuses, 0.0 to 1.0, to watch
    /// retries and dead letters in a demo (before any mail is written).
    #[arg(long, env = "EMAIL_FAILURE_RATE", default_value_t = 0.0)]
    pub email_failure_rate: f64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            prefetch: 128,
            concurrency: 4,
            batch_size: 64,
            email_failure_rate: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dedup_window_shorter_than_the_retries_is_refused() {
        let amqp = AmqpConfig::new("amqp://localhost");
        let mut retention = RetentionConfig::default();
        assert!(retention.check(&amqp).is_ok(), "the defaults fit");
        retention.dedup_retention_secs = 60; // the retries take 71 s
        let error = retention.check(&amqp).unwrap_err();
        assert!(error.contains("DEDUP_RETENTION_SECS"), "{error}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
        assert_eq!(
            redact_url("amqp://guest:p@ss@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("postgres://db/orders"), "postgres://db/orders");
        let s = SecretUrl::new("postgres://u:topsecret@h/d");
        assert!(!format!("{s:?} {s}").contains("topsecret"));
        let cluster = SecretUrl::new("amqp://u:one@a:5672/%2f,amqp://u:two@b:5672/%2f");
        assert_eq!(
            cluster.redacted(),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
    }
}
