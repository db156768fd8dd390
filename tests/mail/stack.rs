//! The real binary's roles, each a process of its own as docker compose runs
//! them (`api`, `relay`, `consume billing`, `consume email` with SMTP_URL),
//! each on an HTTP_ADDR of its own, against the test's own database,
//! exchange and queues. A role can be killed (SIGKILL) and started again;
//! every process is killed when the stack is dropped.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use order_service::config::AmqpConfig;

use crate::smtp::free_port;

/// How long a role may take to answer `/readyz` 200 after it was started.
const STARTUP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Relay,
    Billing,
    Email,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Api, Role::Relay, Role::Billing, Role::Email];

    pub fn label(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Relay => "relay",
            Role::Billing => "billing-consumer",
            Role::Email => "email-consumer",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Role::Api => &["api"],
            Role::Relay => &["relay"],
            Role::Billing => &["consume", "billing"],
            Role::Email => &["consume", "email"],
        }
    }
}

struct Process {
    role: Role,
    addr: SocketAddr,
    child: Child,
}

pub struct Stack {
    db_url: String,
    amqp: AmqpConfig,
    smtp_url: String,
    log_dir: PathBuf,
    processes: Vec<Process>,
}

impl Stack {
    /// Applies the migrations (`order-service migrate`), then starts every
    /// role; the e-mail consumer sends to `smtp_url`. Each role logs to
    /// `<log_dir>/<role>.log`.
    pub fn start(db_url: &str, amqp: &AmqpConfig, smtp_url: &str, log_dir: &Path) -> Self {
        std::fs::create_dir_all(log_dir).expect("creating the log directory");
        let mut stack = Self {
            db_url: db_url.to_owned(),
            amqp: amqp.clone(),
            smtp_url: smtp_url.to_owned(),
            log_dir: log_dir.to_owned(),
            processes: Vec::new(),
        };
        let migrated = stack
            .command(&["migrate"], "migrate.log", free_addr())
            .status()
            .expect("running order-service migrate");
        assert!(
            migrated.success(),
            "order-service migrate failed:\n{}",
            std::fs::read_to_string(log_dir.join("migrate.log")).unwrap_or_default()
        );
        for role in Role::ALL {
            stack.spawn(role);
        }
        stack
    }

    fn command(&self, args: &[&str], log: &str, addr: SocketAddr) -> Command {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(log))
            .expect("opening a role log");
        let err = out.try_clone().expect("cloning a file handle");
        let delays: Vec<String> = self
            .amqp
            .retry_delays_ms
            .iter()
            .map(u64::to_string)
            .collect();
        let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
        command
            .args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("DATABASE_POOL_SIZE", "8")
            .env("AMQP_URL", self.amqp.amqp_url.expose())
            .env("AMQP_EXCHANGE", &self.amqp.exchange)
            .env("AMQP_QUEUE_PREFIX", &self.amqp.queue_prefix)
            .env("RETRY_DELAYS_MS", delays.join(","))
            .env("RELAY_POLL_INTERVAL_MS", "200")
            .env("HTTP_ADDR", addr.to_string())
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("MAIL_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SMTP_URL")
            .env_remove("EMAIL_RECIPIENT_DOMAIN")
            .env_remove("MAILER_CONCURRENCY")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        command
    }

    fn spawn(&mut self, role: Role) {
        let addr = free_addr();
        let mut command = self.command(role.args(), &format!("{}.log", role.label()), addr);
        if role == Role::Email {
            command.env("SMTP_URL", &self.smtp_url);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", role.label()));
        self.processes.push(Process { role, addr, child });
    }

    /// Kills `role` with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self, role: Role) {
        let index = self
            .processes
            .iter()
            .position(|p| p.role == role)
            .expect("the role runs");
        let mut process = self.processes.remove(index);
        process.child.kill().expect("SIGKILL");
        let status = process.child.wait().expect("reaping the killed role");
        eprintln!("{} killed: {status}", role.label());
    }

    /// Starts `role` again (after [`Stack::kill`]), on a new HTTP_ADDR.
    pub fn restart(&mut self, role: Role) {
        assert!(
            self.processes.iter().all(|p| p.role != role),
            "{} still runs",
            role.label()
        );
        self.spawn(role);
    }

    pub fn addr(&self, role: Role) -> SocketAddr {
        self.processes
            .iter()
            .find(|p| p.role == role)
            .unwrap_or_else(|| panic!("{} runs", role.label()))
            .addr
    }

    /// Waits until every running role answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let started = tokio::time::Instant::now();
        let roles: Vec<Role> = self.processes.iter().map(|p| p.role).collect();
        for role in roles {
            let url = format!("http://{}/readyz", self.addr(role));
            loop {
                let last = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                    Err(e) => e.to_string(),
                };
                let exited = self.exited();
                assert!(
                    exited.is_empty() && started.elapsed() < STARTUP,
                    "{} not ready within {STARTUP:?} (last answer: {last}); exited: {exited:?}\n{}",
                    role.label(),
                    self.diagnostics()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// `order-service outbox status` against the stack's database.
    pub fn outbox_status(&self) -> String {
        outbox_status(&self.db_url).unwrap_or_else(|e| panic!("{e}"))
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
            for line in &lines[lines.len().saturating_sub(8)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

/// `order-service outbox status` against `db_url`: its output, or why it failed.
pub fn outbox_status(db_url: &str) -> Result<String, String> {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["outbox", "status", "--database-url", db_url])
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("running order-service outbox status");
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "order-service outbox status: {status}\n{stdout}{}",
            String::from_utf8_lossy(&stderr)
        ))
    }
}

/// `order-service migrate` on `db_url`.
pub fn migrate(db_url: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .arg("migrate")
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("running order-service migrate");
    assert!(
        output.status.success(),
        "order-service migrate: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}
