//! The real binary: started as a user would, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{DeleteQueues, TestDb, eventually, order_body, test_amqp};

const PASSWORD: &str = "s3cr3t-never-logged";

#[tokio::test]
async fn the_binary_serves_orders_exits_zero_on_sigterm_and_never_logs_the_password() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    // Trust auth accepts any password, so the URL can carry one to look for.
    let url_with_password = db
        .url
        .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    assert!(
        url_with_password.contains(PASSWORD),
        "the test URL carries a password"
    );
    let debug = [("RUST_LOG", "debug,h2=info,hyper=info")];
    let (child, logs) = spawn_role(&["run"], &url_with_password, &amqp, &debug);
    let addr = listening_addr(&logs, "HTTP API listening").await;
    let client = reqwest::Client::new();

    let response = client
        .post(format!("http://{addr}/orders"))
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    eventually(
        "the order to be confirmed",
        Duration::from_secs(30),
        || async {
            let order: Value = client
                .get(format!("http://{addr}{location}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (order["status"] == "CONFIRMED").then_some(())
        },
    )
    .await;

    let status = Command::new("kill")
        .args(["-TERM", &child.0.lock().unwrap().id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = eventually("the process to exit", Duration::from_secs(30), || async {
        child.0.lock().unwrap().try_wait().unwrap()
    })
    .await;

    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.contains("relay stopped") && logs.contains("consumer stopped"),
        "{logs}"
    );
    assert!(
        !logs.contains(PASSWORD),
        "the database password reached the logs"
    );
    db.cleanup().await;
}

/// Kills the service if the test ends (or fails) while it still runs.
struct KillOnDrop(Mutex<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let child = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `order-service <args>` with the test's database and broker names, its
/// JSON log lines collected; killed if the test ends first.
fn spawn_role(
    args: &[&str],
    database_url: &str,
    amqp: &order_service::config::AmqpConfig,
    env: &[(&str, &str)],
) -> (KillOnDrop, Arc<Mutex<String>>) {
    let mut command = crate::common::roles::base_command(args, database_url, amqp);
    command
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("starting order-service");
    let logs = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut logs = logs.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
    }
    (KillOnDrop(Mutex::new(child)), logs)
}

/// The address a role logged with `message` once it listens.
async fn listening_addr(logs: &Mutex<String>, message: &str) -> String {
    eventually("the role to listen", Duration::from_secs(30), || async {
        let logs = logs.lock().unwrap();
        logs.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["message"] == message)
            .and_then(|l| l["addr"].as_str().map(str::to_owned))
    })
    .await
}

#[tokio::test]
async fn the_relay_role_in_wal_mode_reports_its_slot_in_readyz_metrics_and_outbox_status() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let slot = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let wal = [
        ("RELAY_MODE", "wal"),
        ("WAL_SLOT", slot.as_str()),
        ("WAL_PUBLICATION", slot.as_str()),
    ];
    let (relay, logs) = spawn_role(&["relay"], &db.url, &amqp, &wal);
    let addr = listening_addr(&logs, "probes listening").await;
    let client = reqwest::Client::new();
    let ready: Value = eventually(
        "/readyz with the WAL lag",
        Duration::from_secs(30),
        || async {
            let response = client
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .ok()?;
            let body: Value = response.json().await.ok()?;
            (body["status"] == "ready" && body.get("walLagSeconds").is_some()).then_some(body)
        },
    )
    .await;
    assert!(ready["walLagBytes"].as_i64().is_some(), "{ready}");
    let metrics = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("outbox_wal_lag_bytes"), "{metrics}");

    let status = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["outbox", "status"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(
        printed.contains("WAL relay slots") && printed.contains(&slot),
        "{printed}"
    );
    assert!(printed.contains("read by:             pid"), "{printed}");
    drop(relay);
    db.cleanup().await;
}

#[tokio::test]
async fn a_wal_slot_name_that_is_no_identifier_is_a_clear_stop() {
    let db = TestDb::new().await;
    let amqp = test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let wal = [("RELAY_MODE", "wal"), ("WAL_SLOT", "Bad-Slot; DROP")];
    let (relay, logs) = spawn_role(&["relay"], &db.url, &amqp, &wal);
    let exit = eventually("the relay to stop", Duration::from_secs(30), || async {
        relay.0.lock().unwrap().try_wait().unwrap()
    })
    .await;
    assert!(!exit.success());
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.contains("slot \"Bad-Slot; DROP\" is not a plain identifier"),
        "{logs}"
    );
    db.cleanup().await;
}
