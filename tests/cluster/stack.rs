//! The service against the cluster: a fresh database, AMQP names of its own,
//! and the four roles (`api`, `relay`, `consume billing`, `consume email`)
//! as separate processes of the real binary, each given the three nodes'
//! URLs (`AMQP_URL`, comma separated) and `QUEUE_TYPE=quorum`.
//!
//! It offers what the fault suite's checks (`tests/faults/checks.rs`, reused
//! as is) need from their `crate::stack`: [`AMQP_URL`] and a [`Stack`] with
//! `pool`, `amqp`, `processes` and [`Stack::mailbox`] (none: the mailer is
//! off here). Dropping it kills the roles and drops the
//! database; the queues and the exchange go with the cluster.

use order_service::config::AmqpConfig;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::common::processes::Processes;
pub use crate::common::roles::Role;
use crate::common::{self, DropDatabase};

/// Where the checks look at the queues: node A. They run after the stopped
/// node is back, so any node would do.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5681/%2f";

pub struct Stack {
    /// This run's exchange, queue prefix and retry delays (the URL is the
    /// list of the three nodes).
    pub amqp: AmqpConfig,
    /// The checks' own small pool on the database.
    pub pool: PgPool,
    /// The roles; their logs are kept if the test fails or
    /// `CLUSTER_KEEP_LOGS` is set.
    pub processes: Processes,
    // Dropped after the processes, so no role is left on it.
    _db: DropDatabase,
}

impl Stack {
    /// Creates the database, applies the migrations (`order-service
    /// migrate`), starts every role against `amqp_urls` and waits until
    /// each one runs.
    pub async fn start(amqp_urls: &str) -> Self {
        let (db_name, db_url) = common::create_database().await;
        let db = DropDatabase(db_name.clone());
        let id = Uuid::new_v4().simple().to_string();
        let mut amqp = AmqpConfig::new(amqp_urls);
        amqp = amqp.with_exchange(format!("osc{}_order_events", &id[..12]));
        amqp = amqp.with_queue_prefix(format!("osc{}_", &id[..12]));
        amqp = amqp.with_retry_delays(vec![
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(500),
        ]);
        let log_dir = std::env::temp_dir().join(format!("ostest-cluster-roles-{db_name}"));
        let mut processes = Processes::new(&db_url, &amqp, &log_dir, "CLUSTER_RUST_LOG")
            .env("QUEUE_TYPE", "quorum")
            .remove_logs_unless("CLUSTER_KEEP_LOGS");
        processes.migrate();
        processes.start_all().await;
        Self {
            pool: PgPoolOptions::new()
                .max_connections(3)
                .connect_lazy(&db_url)
                .expect("a valid database URL"),
            amqp,
            processes,
            _db: db,
        }
    }

    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.processes.addr(Role::Api))
    }

    /// No SMTP server runs here: the checks leave the mails out.
    pub fn mailbox(&self) -> Option<&std::path::Path> {
        None
    }
}
