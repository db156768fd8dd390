//! The real binary's roles as processes of their own, as docker compose runs
//! them: what each role is, and the command that starts one against a
//! test's database and AMQP names. [`super::processes`] runs them for the
//! suites; a test that runs the binary once (a start that must fail, say)
//! uses [`command`] itself.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use order_service::config::AmqpConfig;

/// A role of the binary, run as its own process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Api,
    Relay,
    Billing,
    Email,
    /// A second relay beside [`Role::Relay`] (the same subcommand), for a
    /// suite that runs two ([`Role::DOUBLED`]).
    Relay2,
    /// A second e-mail consumer beside [`Role::Email`], competing for the
    /// same queue.
    Email2,
}

impl Role {
    /// One process of each role, as docker compose runs them.
    pub const ALL: [Role; 4] = [Role::Api, Role::Relay, Role::Billing, Role::Email];

    /// Two relays and two e-mail consumers (the fault suite's deployment):
    /// two of each role that competes for shared work, one of each other.
    pub const DOUBLED: [Role; 6] = [
        Role::Api,
        Role::Relay,
        Role::Relay2,
        Role::Billing,
        Role::Email,
        Role::Email2,
    ];

    /// The role a second instance is one of (itself for the others).
    pub fn kind(self) -> Role {
        match self {
            Role::Relay2 => Role::Relay,
            Role::Email2 => Role::Email,
            other => other,
        }
    }

    /// Its subcommand.
    pub fn args(self) -> &'static [&'static str] {
        match self.kind() {
            Role::Api => &["api"],
            Role::Relay => &["relay"],
            Role::Billing => &["consume", "billing"],
            _ => &["consume", "email"],
        }
    }

    /// Its subcommand as one would type it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Relay => "relay",
            Role::Billing => "consume billing",
            Role::Email => "consume email",
            Role::Relay2 => "relay (2nd)",
            Role::Email2 => "consume email (2nd)",
        }
    }

    /// The compose service's name, which is also the `role` label that
    /// prometheus.yml gives its targets, and its log file's name (a second
    /// instance's with `-2`).
    pub fn label(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Relay => "relay",
            Role::Billing => "billing-consumer",
            Role::Email => "email-consumer",
            Role::Relay2 => "relay-2",
            Role::Email2 => "email-consumer-2",
        }
    }

    /// Its log file in `log_dir`.
    pub fn log_file(self, log_dir: &Path) -> std::path::PathBuf {
        log_dir.join(format!("{}.log", self.label()))
    }

    /// The log line a role writes once it is running and once it has stopped.
    pub fn started_and_stopped(self) -> (&'static str, &'static str) {
        match self.kind() {
            Role::Api => ("HTTP API listening", "shutting down"),
            Role::Relay => ("relay started", "relay stopped"),
            _ => ("consumer started", "consumer stopped"),
        }
    }
}

/// `order-service <args>` against `db_url` and `amqp` (its URL, exchange,
/// queue prefix and retry delays), serving HTTP on `addr`, logging JSON
/// (stdout and stderr, appended) to `log`, at the level in the environment
/// variable `rust_log_var` (default `info`). The relay polls every 200 ms;
/// trace export and the mailer are off unless the caller sets them.
pub fn command(
    args: &[&str],
    db_url: &str,
    amqp: &AmqpConfig,
    addr: SocketAddr,
    log: &Path,
    rust_log_var: &str,
) -> Command {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("opening a role log");
    let err = out.try_clone().expect("cloning a file handle");
    let mut command = base_command(args, db_url, amqp);
    command
        .env("RELAY_POLL_INTERVAL_MS", "200")
        .env("HTTP_ADDR", addr.to_string())
        .env(
            "RUST_LOG",
            std::env::var(rust_log_var).unwrap_or_else(|_| "info".into()),
        )
        .env_remove("SMTP_URL")
        .env_remove("EMAIL_RECIPIENT_DOMAIN")
        .env_remove("MAILER_CONCURRENCY")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    command
}

/// `order-service <args>` against `db_url` and `amqp` (its URL, exchange,
/// queue prefix and retry delays), logging JSON, trace export off: what
/// every role a test starts shares; the caller adds its address, log level
/// and where the output goes.
pub fn base_command(args: &[&str], db_url: &str, amqp: &AmqpConfig) -> Command {
    let delays: Vec<String> = amqp
        .retry_delays()
        .iter()
        .map(|d| d.as_millis().to_string())
        .collect();
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("AMQP_URL", amqp.url().expose())
        .env("AMQP_EXCHANGE", amqp.exchange())
        .env("AMQP_QUEUE_PREFIX", amqp.queue_prefix())
        .env("RETRY_DELAYS_MS", delays.join(","))
        .env("LOG_FORMAT", "json")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    command
}

/// Runs `order-service migrate` with [`command`]'s settings, logging to
/// `<log_dir>/migrate.log`; panics with that log if it fails.
pub fn migrate(db_url: &str, amqp: &AmqpConfig, log_dir: &Path, rust_log_var: &str) {
    let log = log_dir.join("migrate.log");
    let status = command(&["migrate"], db_url, amqp, free_addr(), &log, rust_log_var)
        .status()
        .expect("running order-service migrate");
    assert!(
        status.success(),
        "order-service migrate failed:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// An address on 127.0.0.1 whose port was free a moment ago, outside the
/// kernel's ephemeral range ([`super::free_port`]).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], super::free_port()))
}
