//! One scenario's deployment: its own database and AMQP names, an SMTP
//! server of its own, and the roles running as separate processes of the
//! real binary, as docker compose runs them, with two relays and two e-mail
//! consumers ([`Role::DOUBLED`]); the e-mail consumers refuse
//! [`EMAIL_FAILURE_RATE`] of their events and run the mailer. Dropping a
//! [`Stack`] kills its processes and the SMTP server, brings Postgres and
//! RabbitMQ back if they are down, and deletes the database, queues and
//! exchange, whether the scenario passed or panicked.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use order_service::config::AmqpConfig;
use order_service::orders::SUBSCRIPTIONS;
use outbox_common::amqp::QueueNames;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::common::processes::Processes;
use crate::common::roles;
pub use crate::common::roles::Role;
use crate::common::{self, database};
use crate::services;
use crate::smtp::{Behaviour, SmtpServer, free_port};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The share of events each e-mail consumer refuses (`EMAIL_FAILURE_RATE`),
/// as the seed's demo does: they go round the retry queues.
pub const EMAIL_FAILURE_RATE: &str = "0.1";

/// The retry delays (`RETRY_DELAYS_MS`): six, so an event is dead-lettered
/// only after seven refusals in a row, which at [`EMAIL_FAILURE_RATE`] is
/// 1e-7 per event (with two it would be 1e-3: a few dead letters per
/// scenario, and orders left behind). The longest stays below the settled
/// state's quiet time, so a late retry shows.
const RETRY_DELAYS_MS: [u64; 6] = [100, 200, 300, 400, 500, 600];

/// The e-mail consumers, both of them.
pub const EMAIL_ROLES: [Role; 2] = [Role::Email, Role::Email2];

/// The database, the AMQP names and the running processes of one scenario.
pub struct Stack {
    pub db_name: String,
    /// This scenario's exchange, queue prefix and retry delays.
    pub amqp: AmqpConfig,
    /// The assertions' own small pool on the scenario's database.
    pub pool: PgPool,
    /// Killed before the log directory (with `processes`) goes.
    _smtp: SmtpServer,
    /// The roles, each on its own HTTP address (the API's orders; the
    /// others' health, readiness and metrics probes), the same across its
    /// restarts; their logs are kept if the scenario fails or
    /// `FAULT_KEEP_LOGS` is set. The e-mail consumers' mailers send to
    /// [`Stack::mailbox`]'s server.
    pub processes: Processes,
    db_url: String,
    /// Where the SMTP server appends every mail it accepts, in arrival
    /// order (in the log directory, so kept with the logs).
    mailbox: PathBuf,
}

impl Stack {
    /// Creates the database, applies the migrations with `order-service
    /// migrate`, starts the SMTP server and every role; returns once they
    /// all run.
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// [`Stack::start`], with `email_env` set on the e-mail consumers too.
    pub async fn start_with(email_env: Vec<(&'static str, String)>) -> Self {
        let (db_name, db_url) = common::create_database().await;
        Self::start_on(db_name, db_url, email_env, false).await
    }

    /// [`Stack::start`], its relays in WAL mode (`RELAY_MODE=wal`) on a
    /// slot named after the database (slots are the server's; the
    /// database's guard drops it).
    pub async fn start_wal(email_env: Vec<(&'static str, String)>) -> Self {
        let (db_name, db_url) = common::create_database().await;
        Self::start_on(db_name, db_url, email_env, true).await
    }

    async fn start_on(
        db_name: String,
        db_url: String,
        email_env: Vec<(&'static str, String)>,
        wal: bool,
    ) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let mut amqp = AmqpConfig::new(AMQP_URL);
        amqp = amqp.with_exchange(format!("osf{}_order_events", &id[..12]));
        amqp = amqp.with_queue_prefix(format!("osf{}_", &id[..12]));
        amqp = amqp.with_retry_delays(RETRY_DELAYS_MS.map(Duration::from_millis).to_vec());
        let log_dir = std::env::temp_dir().join(&db_name);
        let mut processes = Processes::new(&db_url, &amqp, &log_dir, "FAULT_RUST_LOG")
            .roles(&Role::DOUBLED)
            .remove_logs_unless("FAULT_KEEP_LOGS");
        let mailbox = log_dir.join("mailbox.jsonl");
        let smtp_port = free_port();
        let smtp = SmtpServer::start(smtp_port, &mailbox, &Behaviour::default());
        let mut env = vec![
            ("EMAIL_FAILURE_RATE", EMAIL_FAILURE_RATE.to_owned()),
            // The failure rate refuses every batch of more than one event
            // (failures are drawn one event at a time), which the inbox
            // then applies again one by one: one event a transaction from
            // the start saves that wasted batch, which the in-sequence
            // e-mail path cannot afford on two cores at the suite's load.
            ("CONSUMER_BATCH_SIZE", "1".to_owned()),
            ("SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}")),
        ];
        env.extend(email_env);
        for role in EMAIL_ROLES {
            processes = processes.role_env(role, env.clone());
        }
        if wal {
            let wal_env = vec![
                ("RELAY_MODE", "wal".to_owned()),
                ("WAL_SLOT", db_name.clone()),
                ("WAL_PUBLICATION", db_name.clone()),
                ("WAL_HORIZON_INTERVAL_SECS", "1".to_owned()),
            ];
            for role in [Role::Relay, Role::Relay2] {
                processes = processes.role_env(role, wal_env.clone());
            }
        }
        let mut stack = Self {
            pool: PgPoolOptions::new()
                .max_connections(3)
                .connect_lazy(&db_url)
                .expect("a valid database URL"),
            db_name,
            amqp,
            processes,
            db_url,
            mailbox,
            _smtp: smtp,
        };
        stack.processes.migrate();
        stack.processes.start_all().await;
        stack
    }

    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.processes.addr(Role::Api))
    }

    /// The SMTP server's mailbox (the checks read the mails from it).
    pub fn mailbox(&self) -> Option<&Path> {
        Some(&self.mailbox)
    }

    /// Runs `order-service <args>` (an operator's command) with the roles'
    /// settings, to its end: its exit status and what it printed.
    pub async fn run_tool(&self, args: &[&str]) -> (ExitStatus, String) {
        let log = self
            .mailbox
            .with_file_name(format!("{}.log", args.join("-")));
        let (db_url, amqp) = (self.db_url.clone(), self.amqp.clone());
        let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (status, log) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = owned.iter().map(String::as_str).collect();
            let status = roles::command(
                &args,
                &db_url,
                &amqp,
                roles::free_addr(),
                &log,
                "FAULT_RUST_LOG",
            )
            .status()
            .expect("running order-service");
            (status, log)
        })
        .await
        .expect("the tool's task");
        (status, std::fs::read_to_string(log).unwrap_or_default())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The roles go first, then the servers come back, then the cleanup;
        // the log directory goes last, with the processes field.
        self.processes.kill_all();
        services::restore();
        let (db_name, amqp) = (self.db_name.clone(), self.amqp.clone());
        // We may be inside the test's runtime: clean up on a runtime of our own.
        let cleaned = database::run_to_end(async move { cleanup(&db_name, &amqp).await });
        if !matches!(cleaned, Some(Ok(()))) {
            eprintln!(
                "faults: cleanup of {} incomplete: {cleaned:?}",
                self.db_name
            );
        }
    }
}

/// Drops the database and deletes the queues and the exchange, each step
/// bounded so a server that is still down cannot hang the test.
async fn cleanup(db_name: &str, amqp: &AmqpConfig) -> Result<(), String> {
    let limit = Duration::from_secs(20);
    let dropped =
        tokio::time::timeout(limit, database::remove(&common::admin_url(), db_name)).await;
    let deleted = tokio::time::timeout(limit, delete_amqp(amqp)).await;
    match (dropped, deleted) {
        (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

async fn delete_amqp(amqp: &AmqpConfig) -> Result<(), lapin::Error> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // Every queue the relay declares: both consumers', bound to both events.
    for consumer in SUBSCRIPTIONS.iter().map(|s| s.consumer) {
        let names = QueueNames::new(amqp, consumer);
        let retries = names.retries.iter().map(|(q, _)| q.clone());
        for queue in [names.main.clone(), names.dlq.clone()]
            .into_iter()
            .chain(retries)
        {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    channel
        .exchange_delete(amqp.exchange().into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "faults cleanup".into()).await;
    Ok(())
}
