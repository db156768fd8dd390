//! One scenario's deployment: its own database and AMQP names, and the roles
//! running as separate processes of the real binary, as docker compose runs
//! them. Dropping a [`Stack`] kills its processes, brings Postgres and
//! RabbitMQ back if they are down, and deletes the database, queues and
//! exchange, whether the scenario passed or panicked.

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
pub use crate::common::roles::Role;
use crate::common::{self, database};
use crate::services;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The database, the AMQP names and the running processes of one scenario.
pub struct Stack {
    pub db_name: String,
    /// This scenario's exchange, queue prefix and retry delays.
    pub amqp: AmqpConfig,
    /// The assertions' own small pool on the scenario's database.
    pub pool: PgPool,
    /// The roles, each on its own HTTP address (the API's orders; the
    /// others' health, readiness and metrics probes), the same across its
    /// restarts; their logs are kept if the scenario fails or
    /// `FAULT_KEEP_LOGS` is set. The mailer stays off (no SMTP server here:
    /// the checks count the consumers' own rows).
    pub processes: Processes,
}

impl Stack {
    /// Creates the database, applies the migrations with `order-service
    /// migrate`, and starts every role; returns once they all run.
    pub async fn start() -> Self {
        let (db_name, db_url) = common::create_database().await;
        let id = Uuid::new_v4().simple().to_string();
        let mut amqp = AmqpConfig::new(AMQP_URL);
        amqp = amqp.with_exchange(format!("osf{}_order_events", &id[..12]));
        amqp = amqp.with_queue_prefix(format!("osf{}_", &id[..12]));
        amqp = amqp.with_retry_delays(vec![
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(500),
        ]);
        let log_dir = std::env::temp_dir().join(&db_name);
        let processes = Processes::new(&db_url, &amqp, &log_dir, "FAULT_RUST_LOG")
            .remove_logs_unless("FAULT_KEEP_LOGS");
        let mut stack = Self {
            pool: PgPoolOptions::new()
                .max_connections(3)
                .connect_lazy(&db_url)
                .expect("a valid database URL"),
            db_name,
            amqp,
            processes,
        };
        stack.processes.migrate();
        stack.processes.start_all().await;
        stack
    }

    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.processes.addr(Role::Api))
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
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(cleanup(&db_name, &amqp))
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
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
