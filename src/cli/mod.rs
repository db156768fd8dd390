//! The command line: one binary, several roles. Every flag can also be set
//! from the environment variable named in `--help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod tools;
use tokio_util::sync::CancellationToken;

use crate::api::auth::Authenticator;
use crate::config::{
    AmqpConfig, AuthConfig, ConsumerConfig, DatabaseConfig, HttpConfig, MailConfig, RelayConfig,
    RetentionConfig,
};
use crate::orders::mailer::MAILS;
use crate::outbox::store::EVENTS;
use crate::retention;
use crate::startup::{ConsumerKind, Probes, Roles};
use crate::telemetry::{self, TelemetryConfig};

/// How long roles get to finish their work after SIGTERM/Ctrl-C.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

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
        amqp: AmqpConfig,
        #[command(flatten)]
        http: HttpConfig,
        #[command(flatten)]
        relay: RelayConfig,
        #[command(flatten)]
        consumer: ConsumerConfig,
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
        amqp: AmqpConfig,
        #[command(flatten)]
        relay: RelayConfig,
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
        amqp: AmqpConfig,
        #[command(flatten)]
        consumer: ConsumerConfig,
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
    /// List dead letters of a consumer (email or billing) without removing them.
    List {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        amqp: AmqpConfig,
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
        amqp: AmqpConfig,
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

/// Parses the command line, runs the command, flushes telemetry.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::tls::install_provider();
    let guard = match telemetry::init(&cli.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(execute(cli.command));
    drop(runtime);
    guard.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

pub async fn execute(command: Command) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    crate::shutdown::cancel_on_signal(cancel.clone());
    match command {
        Command::Run {
            db,
            amqp,
            http,
            relay,
            consumer,
            retention,
            mail,
            auth,
        } => {
            retention.check(&amqp).map_err(anyhow::Error::msg)?;
            // Before connecting: a bad key stops the process at once.
            let auth = Authenticator::from_config(&auth)?;
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            roles
                .start_api_with_auth(&http, Some(amqp.clone()), auth)
                .await?;
            roles.start_relay(&amqp, &relay, false);
            roles.start_consumer(ConsumerKind::Email, &amqp, &consumer, &mail)?;
            roles.start_consumer(ConsumerKind::Billing, &amqp, &consumer, &mail)?;
            let dedup = retention.dedup();
            let prunes = vec![
                retention::published(&EVENTS, relay.retention()),
                retention::idempotency_keys(retention.idempotency_keys()),
                retention::dedup(ConsumerKind::Email.name(), dedup),
                retention::dedup(ConsumerKind::Billing.name(), dedup),
                retention::published(&MAILS, mail.retention()),
            ];
            roles.start_retention(prunes, &retention);
            roles.wait(SHUTDOWN_DEADLINE).await
        }
        Command::Api {
            db,
            http,
            retention,
            auth,
        } => {
            let auth = Authenticator::from_config(&auth)?;
            let roles = Roles::new(crate::db::connect(&db, &cancel).await?, cancel);
            // The api never talks to RabbitMQ: a broker outage must not take
            // it out of rotation, so its /readyz does not check the broker.
            roles.start_api_with_auth(&http, None, auth).await?;
            roles.start_notify_forwarder();
            let prunes = vec![retention::idempotency_keys(retention.idempotency_keys())];
            roles.start_retention(prunes, &retention);
            roles.wait(SHUTDOWN_DEADLINE).await
        }
        Command::Relay {
            db,
            amqp,
            relay,
            http,
            retention,
        } => {
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            roles.start_relay(&amqp, &relay, true);
            roles.start_retention(
                vec![retention::published(&EVENTS, relay.retention())],
                &retention,
            );
            roles
                .start_probes(&http, Probes::relay(&amqp, &http))
                .await?;
            roles.wait(SHUTDOWN_DEADLINE).await
        }
        Command::Consume {
            which,
            db,
            amqp,
            consumer,
            http,
            retention,
            mail,
        } => {
            retention.check(&amqp).map_err(anyhow::Error::msg)?;
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            roles.start_consumer(which, &amqp, &consumer, &mail)?;
            // Billing writes order.confirmed rows: wake the relay elsewhere.
            roles.start_notify_forwarder();
            let mailer = which == ConsumerKind::Email && mail.smtp_url.is_some();
            let mut prunes = vec![retention::dedup(which.name(), retention.dedup())];
            if mailer {
                prunes.push(retention::published(&MAILS, mail.retention()));
            }
            roles.start_retention(prunes, &retention);
            roles
                .start_probes(&http, Probes::consumer(&amqp, mailer))
                .await?;
            roles.wait(SHUTDOWN_DEADLINE).await
        }
        Command::Migrate { db } => {
            let db = DatabaseConfig {
                skip_migrations: true,
                ..db
            };
            // Within seconds: an operator waits for the answer.
            let pool = crate::db::connect_for_command(&db, &cancel).await?;
            crate::db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Dlq { command } => tools::dlq(command, &cancel).await,
        Command::Outbox {
            command: OutboxCommand::Status { db },
        } => tools::outbox_status(db, &cancel).await,
    }
}

/// The pool, once RabbitMQ has accepted a connection too: a role that needs
/// both checks them together before it starts, so a misconfiguration of
/// either stops it at once, even while the other is still waited for.
async fn connect_both(
    db: &DatabaseConfig,
    amqp: &AmqpConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<sqlx::PgPool> {
    let (pool, ()) = tokio::try_join!(
        crate::db::connect(db, cancel),
        crate::amqp::check_at_start(amqp, cancel)
    )?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Catches clashing flag names across the flattened configs (clap only
    /// reports them at run time, in the role that combines them).
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
        let run = Cli::try_parse_from(["order-service", "run"]).expect("`run` with defaults");
        assert!(matches!(run.command, Command::Run { .. }));
    }
}
