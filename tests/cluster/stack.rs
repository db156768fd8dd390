//! The service against the cluster: a fresh database, AMQP names of its own,
//! and the four roles (`api`, `relay`, `consume billing`, `consume email`)
//! as separate processes of the real binary, each given the three nodes'
//! URLs (`AMQP_URL`, comma separated) and `QUEUE_TYPE=quorum`.
//!
//! It offers what the fault suite's checks (`tests/faults/checks.rs`, reused
//! as is) need from their `crate::stack`: [`AMQP_URL`] and a [`Stack`] with
//! `pool`, `amqp`, `exited()` and `diagnostics()`. Dropping it kills the
//! roles and drops the database; the queues and the exchange go with the
//! cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use order_service::config::AmqpConfig;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

pub use crate::common::roles::Role;
use crate::common::{self, roles};

/// The level the roles log at, unless `info`.
const RUST_LOG_VAR: &str = "CLUSTER_RUST_LOG";

/// Where the checks look at the queues: node A. They run after the stopped
/// node is back, so any node would do.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5681/%2f";

pub struct Stack {
    pub db_name: String,
    db_url: String,
    /// This run's exchange, queue prefix and retry delays (the URL is the
    /// list of the three nodes).
    pub amqp: AmqpConfig,
    /// The API's address.
    pub http_addr: SocketAddr,
    /// The checks' own small pool on the database.
    pub pool: PgPool,
    log_dir: PathBuf,
    children: Vec<(Role, Child)>,
}

impl Stack {
    /// Creates the database, applies the migrations (`order-service
    /// migrate`), starts every role against `amqp_urls` and waits until
    /// each one runs.
    pub async fn start(amqp_urls: &str) -> Self {
        let (db_name, db_url) = common::create_database().await;
        let id = Uuid::new_v4().simple().to_string();
        let mut amqp = AmqpConfig::new(amqp_urls);
        amqp = amqp.with_exchange(format!("osc{}_order_events", &id[..12]));
        amqp = amqp.with_queue_prefix(format!("osc{}_", &id[..12]));
        amqp = amqp.with_retry_delays(vec![
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(500),
        ]);
        let log_dir = std::env::temp_dir().join(format!("ostest-cluster-roles-{db_name}"));
        let mut stack = Self {
            pool: PgPoolOptions::new()
                .max_connections(3)
                .connect_lazy(&db_url)
                .expect("a valid database URL"),
            db_name,
            db_url,
            amqp,
            http_addr: roles::free_addr(),
            log_dir,
            children: Vec::new(),
        };
        std::fs::create_dir_all(&stack.log_dir).expect("creating the log directory");
        roles::migrate(&stack.db_url, &stack.amqp, &stack.log_dir, RUST_LOG_VAR);
        for role in Role::ALL {
            let addr = match role {
                Role::Api => stack.http_addr,
                _ => SocketAddr::from(([127, 0, 0, 1], 0)),
            };
            let log = role.log_file(&stack.log_dir);
            let child = roles::command(
                role.args(),
                &stack.db_url,
                &stack.amqp,
                addr,
                &log,
                RUST_LOG_VAR,
            )
            .env("QUEUE_TYPE", "quorum")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", role.name()));
            stack.children.push((role, child));
        }
        for role in Role::ALL {
            stack.wait_started(role).await;
        }
        stack
    }

    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.http_addr)
    }

    async fn wait_started(&mut self, role: Role) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.log(role).contains(role.started_and_stopped().0) {
                return;
            }
            let (_, child) = self
                .children
                .iter_mut()
                .find(|(r, _)| *r == role)
                .expect("the role was spawned");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited with {status} while starting:\n{}",
                    role.name(),
                    self.log(role)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within a minute:\n{}",
                role.name(),
                self.log(role)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Each running role's pid.
    pub fn pids(&self) -> Vec<(Role, u32)> {
        self.children.iter().map(|(r, c)| (*r, c.id())).collect()
    }

    /// What `role` logged.
    pub fn log(&self, role: Role) -> String {
        let text = std::fs::read(role.log_file(&self.log_dir)).unwrap_or_default();
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Roles that exited on their own (a crash).
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for (role, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{} exited with {status}", role.name()));
            }
        }
        dead
    }

    /// The last warnings and errors of every role, for a failure message.
    pub fn diagnostics(&self) -> String {
        roles::diagnostics(&self.log_dir, Role::ALL.map(|r| (r, self.log(r))))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let name = std::mem::take(&mut self.db_name);
        common::run_to_end(async move { common::drop_database(&name).await });
        if std::thread::panicking() || std::env::var_os("CLUSTER_KEEP_LOGS").is_some() {
            eprintln!("cluster: role logs kept in {}", self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}
