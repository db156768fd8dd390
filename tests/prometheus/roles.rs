//! The real binary's roles, each a process of its own as docker compose runs
//! them, each with its own HTTP_ADDR; killed when dropped.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use order_service::config::AmqpConfig;

use crate::server::free_port;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Relay,
    Email,
    Billing,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Api, Role::Relay, Role::Email, Role::Billing];

    /// The compose service's name, which is also the `role` label that
    /// prometheus.yml gives its targets.
    pub fn label(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Relay => "relay",
            Role::Email => "email-consumer",
            Role::Billing => "billing-consumer",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Role::Api => &["api"],
            Role::Relay => &["relay"],
            Role::Email => &["consume", "email"],
            Role::Billing => &["consume", "billing"],
        }
    }
}

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
        let command = |args: &[&str], log: &str, addr: SocketAddr| {
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_dir.join(log))
                .expect("opening a role log");
            let err = out.try_clone().expect("cloning a file handle");
            let delays: Vec<String> = amqp.retry_delays_ms.iter().map(u64::to_string).collect();
            let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
            command
                .args(args)
                .env("DATABASE_URL", db_url)
                .env("DATABASE_POOL_SIZE", "5")
                .env("AMQP_URL", amqp.amqp_url.expose())
                .env("AMQP_EXCHANGE", &amqp.exchange)
                .env("AMQP_QUEUE_PREFIX", &amqp.queue_prefix)
                .env("RETRY_DELAYS_MS", delays.join(","))
                .env("RELAY_POLL_INTERVAL_MS", "200")
                .env("HTTP_ADDR", addr.to_string())
                .env("LOG_FORMAT", "json")
                .env(
                    "RUST_LOG",
                    std::env::var("PROM_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
            command
        };
        // Built first, so that its guard keeps the logs whatever fails next.
        let mut roles = Self {
            processes: Vec::new(),
            log_dir: log_dir.to_owned(),
        };
        let migrated = command(&["migrate"], "migrate.log", free_port())
            .status()
            .expect("running order-service migrate");
        assert!(
            migrated.success(),
            "order-service migrate failed:\n{}",
            std::fs::read_to_string(log_dir.join("migrate.log")).unwrap_or_default()
        );
        for role in Role::ALL {
            let addr = free_port();
            let child = command(role.args(), &format!("{}.log", role.label()), addr)
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
        std::fs::read_to_string(self.log_dir.join(format!("{}.log", role.label())))
            .unwrap_or_default()
    }

    /// The last warnings and errors of every role, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("role logs in {}\n", self.log_dir.display());
        for role in Role::ALL {
            let log = self.log(role);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(r#""level":"INFO""#))
                .collect();
            out.push_str(&format!(
                "--- {} (last warnings and errors)\n",
                role.label()
            ));
            for line in &lines[lines.len().saturating_sub(10)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
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
