//! The real `order-service` binary as a child process, with its resource use
//! read from /proc.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Service {
    pub child: Child,
    pub addr: String,
}

impl Service {
    /// Starts `order-service <args>` with `env` on a free port and waits for
    /// `/healthz`.
    pub async fn start(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
        command
            .args(args)
            .env("HTTP_ADDR", &addr)
            .env("RUST_LOG", "warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            // The mailer stays off unless a benchmark turns it on in `env`.
            .env_remove("SMTP_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn()?;
        let service = Self { child, addr };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = client
                .get(format!("http://{}/healthz", service.addr))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(service);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "order-service did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which ends with ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Peak resident set size in MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "order-service exited with {status}");
        Ok(())
    }
}

/// A benchmark that fails before `stop` does not leave the service running
/// (holding its output pipe open, and its database in use).
impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
