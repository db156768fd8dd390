//! The shared servers the faults hit: Postgres and RabbitMQ, stopped and
//! started with their own tools, and always brought back by [`restore`].
//!
//! Everything here blocks (it runs `pg_ctlcluster` and `rabbitmqctl`); async
//! code calls it through `spawn_blocking`.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where RabbitMQ listens for AMQP.
const AMQP_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 5672);
/// How long a server gets to come back before we give up.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// The installed Postgres major version (`ls /etc/postgresql`).
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .max()
        })
        .unwrap_or_else(|| "15".into())
}

/// Runs a tool to the end; `Err` carries its output.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn pg_ctlcluster(action: &[&str]) -> Result<(), String> {
    let version = pg_version();
    let mut args = vec!["--skip-systemctl-redirect", version.as_str(), "main"];
    args.extend_from_slice(action);
    run("pg_ctlcluster", &args)
}

/// True once Postgres accepts connections (not merely the TCP port).
pub fn postgres_ready() -> bool {
    Command::new("pg_isready")
        .args(["-q", "-h", "127.0.0.1", "-p", "5432", "-t", "1"])
        .status()
        .is_ok_and(|s| s.success())
}

/// True while RabbitMQ's AMQP listener accepts connections (`stop_app`
/// closes it, `start_app` opens it last).
pub fn rabbitmq_ready() -> bool {
    let addr = SocketAddr::from(AMQP_ADDR);
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn wait_for(what: &str, ready: fn() -> bool) -> Result<(), String> {
    let started = Instant::now();
    while !ready() {
        if started.elapsed() > START_DEADLINE {
            return Err(format!("{what} not back after {START_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `pg_ctlcluster … restart -m fast`: every session is cut, in-flight
/// transactions roll back. Returns once Postgres accepts connections again.
pub fn restart_postgres() -> Result<(), String> {
    pg_ctlcluster(&["restart", "-m", "fast"])?;
    wait_for("Postgres", postgres_ready)
}

/// `rabbitmqctl stop_app`: the broker closes every connection; the Erlang
/// node keeps running.
pub fn stop_rabbitmq() -> Result<(), String> {
    run("rabbitmqctl", &["stop_app"])
}

/// `rabbitmqctl start_app`, then waits until AMQP is accepted.
pub fn start_rabbitmq() -> Result<(), String> {
    run("rabbitmqctl", &["start_app"])?;
    run("rabbitmqctl", &["await_startup"])?;
    wait_for("RabbitMQ", rabbitmq_ready)
}

/// Brings back whichever server a scenario left down. Never panics: it runs
/// from `Drop`, possibly while a failed assertion unwinds.
pub fn restore() {
    if !postgres_ready() {
        eprintln!("faults: Postgres is down; starting it");
        if let Err(error) =
            pg_ctlcluster(&["start"]).and_then(|()| wait_for("Postgres", postgres_ready))
        {
            eprintln!("faults: could not restore Postgres: {error}");
        }
    }
    if !rabbitmq_ready() {
        eprintln!("faults: RabbitMQ is down; starting it");
        if let Err(error) = start_rabbitmq() {
            eprintln!("faults: could not restore RabbitMQ: {error}");
        }
    }
}
