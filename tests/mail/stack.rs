//! The real binary's roles, each a process of its own as docker compose runs
//! them (`api`, `relay`, `consume billing`, `consume email` with SMTP_URL),
//! each on an HTTP_ADDR of its own, against the test's own database,
//! exchange and queues, run by the shared [`Processes`]: a role can be
//! killed (SIGKILL) and started again; every process is killed when the
//! stack is dropped. Here: the mailer's settings, the wait for `/readyz`,
//! and `order-service outbox status`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use order_service::config::AmqpConfig;

use crate::common::processes::Processes;
pub use crate::common::roles::Role;

/// How long a role may take to answer `/readyz` 200 after it was started.
const STARTUP: Duration = Duration::from_secs(60);

pub struct Stack {
    db_url: String,
    /// The roles; the fixture keeps or removes their log directory.
    pub processes: Processes,
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
        let mut processes = Processes::new(db_url, amqp, log_dir, "MAIL_TEST_RUST_LOG")
            .env("DATABASE_POOL_SIZE", "8")
            .role_env(Role::Email, mailer_env);
        processes.migrate();
        processes.spawn_all();
        Self {
            db_url: db_url.to_owned(),
            processes,
        }
    }

    /// Waits until every role answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let started = tokio::time::Instant::now();
        for role in Role::ALL {
            let url = format!("http://{}/readyz", self.processes.addr(role));
            loop {
                let last = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                    Err(e) => e.to_string(),
                };
                let exited = self.processes.exited();
                assert!(
                    exited.is_empty() && started.elapsed() < STARTUP,
                    "{} not ready within {STARTUP:?} (last answer: {last}); exited: {exited:?}\n{}",
                    role.label(),
                    self.processes.diagnostics()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// `order-service outbox status` against the stack's database.
    pub fn outbox_status(&self) -> String {
        outbox_status(&self.db_url).unwrap_or_else(|e| panic!("{e}"))
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
