//! The command line's shape: the roles and the operator's commands, each
//! with the settings it reads (every flag also from its environment
//! variable).

use clap::{Parser, Subcommand};

use crate::config::{
    AmqpSettings, AuthConfig, ConsumerSettings, DatabaseConfig, HttpConfig, MailConfig,
    RelaySettings, RetentionConfig,
};
use crate::startup::ConsumerKind;
use crate::telemetry::TelemetryConfig;

#[derive(Debug, Parser)]
#[command(
    name = "order-service",
    version,
    about = "Orders through a transactional outbox to idempotent consumers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// All roles in one process: api, relay and both consumers.
    Run {
        #[command(flatten)]
        db: DatabaseConfig,
        #[command(flatten)]
        amqp: AmqpSettings,
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        relay: RelaySettings,
        #[command(flatten)]
        consumer: ConsumerSettings,
        #[command(flatten)]
        retention: RetentionConfig,
        #[command(flatten)]
        mail: MailConfig,
        #[command(flatten)]
        auth: AuthConfig,
    },
    /// The HTTP API only (wakes a separate relay with a Postgres NOTIFY).
    Api {
        #[command(flatten)]
        db: DatabaseConfig,
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        retention: RetentionConfig,
        #[command(flatten)]
        auth: AuthConfig,
    },
    /// The outbox relay only (serves /healthz, /readyz, /metrics on HTTP_ADDR).
    Relay {
        #[command(flatten)]
        db: DatabaseConfig,
        #[command(flatten)]
        amqp: AmqpSettings,
        #[command(flatten)]
        relay: RelaySettings,
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        retention: RetentionConfig,
    },
    /// One consumer (serves /healthz, /readyz, /metrics on HTTP_ADDR).
    Consume {
        which: ConsumerKind,
        #[command(flatten)]
        db: DatabaseConfig,
        #[command(flatten)]
        amqp: AmqpSettings,
        #[command(flatten)]
        consumer: ConsumerSettings,
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        retention: RetentionConfig,
        #[command(flatten)]
        mail: MailConfig,
    },
    /// Apply the database migrations and exit.
    Migrate {
        #[command(flatten)]
        db: DatabaseConfig,
    },
    /// Inspect and replay dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect the outbox.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters of a consumer (email or billing) without removing
    /// them, and the orders whose later events it holds back (the e-mail
    /// consumer applies an order's events in sequence).
    List {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        amqp: AmqpSettings,
        #[command(flatten)]
        db: DatabaseConfig,
    },
    /// Let an order held back by the e-mail consumer go on without the
    /// event it waits for (one in the DLQ that will not be replayed).
    Skip {
        queue: String,
        /// The aggregate's type (`order`).
        aggregate_type: String,
        /// The aggregate's id (the order's id).
        aggregate_id: String,
        #[command(flatten)]
        db: DatabaseConfig,
    },
    /// Move dead letters back to the consumer's main queue. Letters older
    /// than the dedup window are left (with a warning) unless --force.
    Replay {
        queue: String,
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        /// Also replay letters older than DEDUP_RETENTION_SECS: their dedup
        /// rows may be gone, so an effect could be applied twice.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        amqp: AmqpSettings,
        #[command(flatten)]
        retention: RetentionConfig,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Pending rows, age of the oldest, rows with errors, recent failures.
    Status {
        #[command(flatten)]
        db: DatabaseConfig,
    },
}
