//! The binary run as a process of its own, its output in a log file, and
//! what the tests read from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::certs::TempDir;
use crate::common::{eventually, roles};

/// The binary, run as a process with its output in a log file of its own;
/// killed when dropped if it still runs.
pub struct Process {
    pub child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Process {
    pub fn start(
        args: &[&str],
        url: &str,
        addr: SocketAddr,
        amqp: &order_service::config::AmqpConfig,
    ) -> Self {
        let dir = TempDir::new("pglog");
        let log = dir.path().join("out.log");
        let child = roles::command(args, url, amqp, addr, &log, "TLS_PG_LOG")
            .spawn()
            .expect("starting order-service");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status and output, failing if it runs past `deadline`.
    pub async fn exit_within(mut self, deadline: Duration) -> (ExitStatus, String) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for order-service") {
                return (status, self.output());
            }
            assert!(
                started.elapsed() < deadline,
                "still running after {deadline:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the API at `addr` is ready, posts an order (202), and
    /// returns its `Location`.
    pub async fn order_round_trip(&self, addr: SocketAddr) -> String {
        install_crypto_provider();
        eventually("the API to be ready", Duration::from_secs(60), || async {
            let response = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/orders"))
            .json(&json!({"productId": "123", "userId": "user_99", "amount": 500}))
            .send()
            .await
            .expect("posting an order");
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{}", self.output());
        response.headers()["location"].to_str().unwrap().to_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn get_order(addr: SocketAddr, location: &str) -> Option<Value> {
    reqwest::get(format!("http://{addr}{location}"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The one line the binary printed with `error:`; fails if there are none
/// or several.
pub fn one_error_line<'a>(output: &'a str, case: &str) -> &'a str {
    let lines: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{case}: one error line\n{output}");
    lines[0]
}

/// reqwest is built without a provider of its own; the process's is ring,
/// as in the service.
pub fn install_crypto_provider() {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}
