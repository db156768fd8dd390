//! `loyalty-example demo`: runs the example service end to end (see
//! [`loyalty_example::demo`]); exits 0 with a summary, or non-zero with
//! what went wrong.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loyalty_example::demo::{self, DemoConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "A loyalty-points service built on the outbox and inbox crates")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sets up a database and broker names of its own, awards points (one
    /// delivered twice, one refused), checks the balances and the
    /// dead-letter queue, and removes what it made.
    Demo {
        /// A Postgres URL whose user may create and drop databases.
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        /// The RabbitMQ URL.
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// Seconds to wait for each step.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off,loyalty_example=info".into()),
        )
        .init();
    let Command::Demo {
        database_url,
        amqp_url,
        timeout_secs,
    } = Cli::parse().command;
    let config = DemoConfig {
        database_url,
        amqp_url,
        timeout: Duration::from_secs(timeout_secs),
    };
    let cancel = CancellationToken::new();
    outbox_common::shutdown::cancel_on_signal(cancel.clone());
    match demo::run(&config, &cancel).await {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            // The chain of causes on one line, without a backtrace.
            eprintln!("loyalty demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}
