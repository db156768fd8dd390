//! The real binary's roles, each a process of its own as docker compose runs
//! them, each with its own HTTP_ADDR; killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;

use order_service::config::AmqpConfig;

use crate::common::roles;
pub use crate::common::roles::Role;

/// The level the roles log at, unless `info`.
const RUST_LOG_VAR: &str = "PROM_TEST_RUST_LOG";

struct Process {
    role: Role,
    addr: SocketAddr,
    child: Child,
}

pub struct Roles {
    processes: Vec<Process>,
    log_dir: PathBuf,
}

impl Roles {
    /// Applies the migrations (`order-service migrate`), then starts every
    /// role; each logs to `<log_dir>/<role>.log`.
    pub fn start(db_url: &str, amqp: &AmqpConfig, log_dir: &Path) -> Self {
        std::fs::create_dir_all(log_dir).expect("creating the log directory");
        // Built first, so that its guard keeps the logs whatever fails next.
        let mut roles = Self {
            processes: Vec::new(),
            log_dir: log_dir.to_owned(),
        };
        roles::migrate(db_url, amqp, log_dir, RUST_LOG_VAR);
        for role in Role::ALL {
            let addr = roles::free_addr();
            let log = role.log_file(log_dir);
            let child = roles::command(role.args(), db_url, amqp, addr, &log, RUST_LOG_VAR)
                .env("DATABASE_POOL_SIZE", "5")
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", role.label()));
            roles.processes.push(Process { role, addr, child });
        }
        roles
    }

    pub fn addr(&self, role: Role) -> SocketAddr {
        self.processes
            .iter()
            .find(|p| p.role == role)
            .expect("every role is started")
            .addr
    }

    /// (role label, address) of each role, for Prometheus' targets.
    pub fn targets(&self) -> Vec<(&'static str, SocketAddr)> {
        self.processes
            .iter()
            .map(|p| (p.role.label(), p.addr))
            .collect()
    }

    /// The roles that exited on their own, with their status.
    pub fn exited(&mut self) -> Vec<String> {
        self.processes
            .iter_mut()
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some(format!("{} exited with {status}", p.role.label())),
                _ => None,
            })
            .collect()
    }

    pub fn log(&self, role: Role) -> String {
        std::fs::read_to_string(role.log_file(&self.log_dir)).unwrap_or_default()
    }

    /// The last warnings and errors of every role, for a failure message.
    pub fn diagnostics(&self) -> String {
        roles::diagnostics(&self.log_dir, Role::ALL.map(|r| (r, self.log(r))))
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("PROM_TEST_KEEP_LOGS").is_some() {
            eprintln!(
                "prometheus test: role logs kept in {}",
                self.log_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}
