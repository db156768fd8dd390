//! The real binary's roles, each a process of its own as docker compose runs
//! them (`api`, `relay`, `consume billing`, `consume email` with SMTP_URL),
//! each on an HTTP_ADDR of its own, against the test's own database,
//! exchange and queues. A role can be killed (SIGKILL) and started again;
//! every process is killed when the stack is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use order_service::config::AmqpConfig;

use crate::common::roles;
pub use crate::common::roles::Role;

/// The level the roles log at, unless `info`.
const RUST_LOG_VAR: &str = "MAIL_TEST_RUST_LOG";

/// How long a role may take to answer `/readyz` 200 after it was started.
const STARTUP: Duration = Duration::from_secs(60);

struct Process {
    role: Role,
    addr: SocketAddr,
    child: Child,
}

pub struct Stack {
    db_url: String,
    amqp: AmqpConfig,
    /// The e-mail consumer's mailer settings (`SMTP_URL`, `SMTP_CA_FILE`).
    mailer_env: Vec<(&'static str, String)>,
    log_dir: PathBuf,
    processes: Vec<Process>,
}

impl Stack {
    /// Applies the migrations (`order-service migrate`), then starts every
    /// role; the e-mail consumer has `mailer_env` set (`SMTP_URL`, ...).
    /// Each role logs to `<log_dir>/<role>.log`.
    pub fn start(
        db_url: &str,
        amqp: &AmqpConfig,
        mailer_env: Vec<(&'static str, String)>,
        log_dir: &Path,
    ) -> Self {
        std::fs::create_dir_all(log_dir).expect("creating the log directory");
        let mut stack = Self {
            db_url: db_url.to_owned(),
            amqp: amqp.clone(),
            mailer_env,
            log_dir: log_dir.to_owned(),
            processes: Vec::new(),
        };
        roles::migrate(db_url, amqp, log_dir, RUST_LOG_VAR);
        for role in Role::ALL {
            stack.spawn(role);
        }
        stack
    }

    fn spawn(&mut self, role: Role) {
        let addr = roles::free_addr();
        let log = role.log_file(&self.log_dir);
        let mut command = roles::command(
            role.args(),
            &self.db_url,
            &self.amqp,
            addr,
            &log,
            RUST_LOG_VAR,
        );
        command.env("DATABASE_POOL_SIZE", "8");
        if role == Role::Email {
            command.envs(self.mailer_env.iter().map(|(k, v)| (k, v)));
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
        std::fs::read_to_string(role.log_file(&self.log_dir)).unwrap_or_default()
    }

    /// The last warnings and errors of every role, for a failure message.
    pub fn diagnostics(&self) -> String {
        roles::diagnostics(&self.log_dir, Role::ALL.map(|r| (r, self.log(r))))
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
