//! The command line: one binary, several roles. Every flag can also be set
//! from the environment variable named in `--help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

mod args;
mod tools;

pub use args::{Cli, Command, DlqCommand, OutboxCommand};

use crate::api::auth::Authenticator;
use crate::config::{AmqpConfig, DatabaseConfig};
use crate::orders::EVENTS;
use crate::orders::mailer::MAILS;
use crate::retention;
use crate::startup::{ConsumerKind, Roles};
use crate::telemetry;

/// How long roles get to finish their work after SIGTERM/Ctrl-C.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

/// Parses the command line, runs the command, flushes telemetry.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    outbox_common::tls::install_provider();
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
    outbox_common::shutdown::cancel_on_signal(cancel.clone());
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
            let wal = relay.wal(&db)?;
            let (amqp, relay) = (amqp.config(), relay.config());
            // An event held for its predecessor is dead-lettered past the dedup window.
            let consumer = consumer.config().with_hold_limit(retention.dedup());
            retention.check(&amqp).map_err(anyhow::Error::msg)?;
            // Before connecting: a bad key or mail setting stops the process at once.
            let auth = Authenticator::from_config(&auth)?;
            crate::orders::mailer::check(&mail)?;
            crate::orders::mailer::probe(&mail).await?;
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            roles
                .start_api_with_auth(&http, Some(amqp.clone()), auth)
                .await?;
            match wal {
                Some(source) => roles.start_wal_relay(&amqp, &relay, source).await?,
                None => roles.start_relay(&amqp, &relay, false),
            }
            roles.start_consumer(ConsumerKind::Email, &amqp, &consumer, &mail)?;
            roles.start_consumer(ConsumerKind::Billing, &amqp, &consumer, &mail)?;
            let dedup = retention.dedup();
            let prunes = vec![
                EVENTS.prune(relay.retention()),
                outbox::wal::horizons::prune(EVENTS.name(), relay.retention()),
                retention::idempotency_keys(retention.idempotency_keys()),
                inbox::dedup_prune(ConsumerKind::Email.name(), dedup),
                inbox::sequence_prune(ConsumerKind::Email.name(), dedup),
                inbox::dedup_prune(ConsumerKind::Billing.name(), dedup),
                MAILS.prune(mail.retention()),
            ];
            let prunes = prunes
                .into_iter()
                .chain(EVENTS.prune_counters(relay.retention()));
            roles.start_retention(prunes.collect(), &retention);
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
            let wal = relay.wal(&db)?;
            let (amqp, relay) = (amqp.config(), relay.config());
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            let in_wal_mode = wal.is_some();
            match wal {
                Some(source) => roles.start_wal_relay(&amqp, &relay, source).await?,
                None => roles.start_relay(&amqp, &relay, true),
            }
            let prunes = [
                Some(EVENTS.prune(relay.retention())),
                Some(outbox::wal::horizons::prune(
                    EVENTS.name(),
                    relay.retention(),
                )),
                EVENTS.prune_counters(relay.retention()),
            ];
            roles.start_retention(prunes.into_iter().flatten().collect(), &retention);
            roles
                .start_probes(&http, roles.relay_probes(&amqp, &http, in_wal_mode))
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
            let amqp = amqp.config();
            let consumer = consumer.config().with_hold_limit(retention.dedup());
            retention.check(&amqp).map_err(anyhow::Error::msg)?;
            if which == ConsumerKind::Email {
                crate::orders::mailer::check(&mail)?;
                crate::orders::mailer::probe(&mail).await?;
            }
            let roles = Roles::new(connect_both(&db, &amqp, &cancel).await?, cancel);
            roles.start_consumer(which, &amqp, &consumer, &mail)?;
            // Billing writes order.confirmed rows: wake the relay elsewhere.
            roles.start_notify_forwarder();
            let mailer = which == ConsumerKind::Email && mail.smtp_url.is_some();
            let mut prunes = vec![
                inbox::dedup_prune(which.name(), retention.dedup()),
                inbox::sequence_prune(which.name(), retention.dedup()),
            ];
            if mailer {
                prunes.push(MAILS.prune(mail.retention()));
            }
            roles.start_retention(prunes, &retention);
            roles
                .start_probes(&http, roles.consumer_probes(&amqp, mailer))
                .await?;
            roles.wait(SHUTDOWN_DEADLINE).await
        }
        Command::Migrate { db } => {
            // Within seconds: an operator waits for the answer.
            let pool = crate::db::connect_for_command(&db, &cancel).await?;
            // sqlx waits on its advisory lock for as long as another process
            // migrates: SIGTERM ends the wait. A migration cut short rolls
            // back (see `db::migrate`).
            tokio::select! {
                applied = crate::db::migrate(&pool) => applied?,
                () = cancel.cancelled() => anyhow::bail!("stopped while applying migrations"),
            }
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
    let (pool, ()) = tokio::try_join!(crate::db::connect(db, cancel), async {
        Ok(outbox_common::amqp::check_at_start(amqp, cancel).await?)
    })?;
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
