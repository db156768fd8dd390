//! The shared servers the faults hit: Postgres and RabbitMQ, stopped and
//! started with their own tools, and always brought back by [`restore`].
//!
//! Everything here blocks (it runs `pg_ctlcluster` and `rabbitmqctl`); async
//! code calls it through `spawn_blocking`.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where RabbitMQ listens for AMQP.
const AMQP_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 5672);
/// How long a server gets to come back before we give up.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// `vm_memory_high_watermark` under the memory alarm: far below what the
/// broker itself uses, so the alarm goes off at once and stays on. An
/// absolute value, so it is tiny on any machine (3.10 takes `absolute 1MB`
/// as readily as a fraction such as 0.000001).
const ALARM_WATERMARK: [&str; 2] = ["absolute", "1MB"];
/// RabbitMQ's default watermark, a fraction of the machine's memory (the
/// local `rabbitmq.conf` does not set one). `rabbitmqctl
/// set_vm_memory_high_watermark` lasts until the node restarts.
const DEFAULT_WATERMARK: &str = "0.4";
/// Whether the watermark may be other than [`DEFAULT_WATERMARK`]: unknown
/// when the suite starts (an earlier run may have been killed mid-alarm),
/// so the first [`restore`] resets it; afterwards set by
/// [`raise_memory_alarm`] and cleared once it is reset.
static WATERMARK_TOUCHED: AtomicBool = AtomicBool::new(true);

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

/// `pg_ctlcluster … stop -m immediate`: every Postgres process quits at
/// once, without a checkpoint (a crash; the next start recovers from the
/// WAL). Returns once it is down.
pub fn crash_postgres() -> Result<(), String> {
    pg_ctlcluster(&["stop", "-m", "immediate"])?;
    if postgres_ready() {
        return Err("Postgres still accepts connections after stop -m immediate".into());
    }
    Ok(())
}

/// `pg_ctlcluster … start` after a crash: returns the moment Postgres
/// first accepted connections again (after its crash recovery, which
/// begins by syncing the whole data directory to disk), polled while
/// `pg_ctlcluster` runs, since it may return a while after that.
pub fn start_postgres() -> Result<Instant, String> {
    let version = pg_version();
    let args = [
        "--skip-systemctl-redirect",
        version.as_str(),
        "main",
        "start",
    ];
    let mut child = Command::new("pg_ctlcluster")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running pg_ctlcluster: {e}"))?;
    let started = Instant::now();
    let ready = loop {
        if postgres_ready() {
            break Instant::now();
        }
        if let Ok(Some(status)) = child.try_wait()
            && !status.success()
        {
            return Err(format!(
                "pg_ctlcluster {} failed ({status})",
                args.join(" ")
            ));
        }
        if started.elapsed() > START_DEADLINE {
            return Err(format!("Postgres not back after {START_DEADLINE:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for pg_ctlcluster: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "pg_ctlcluster {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(ready)
}

/// The alarms RabbitMQ has in effect (`rabbit_alarm:get_alarms()`), e.g.
/// `[{{resource_limit,memory,rabbit@localhost},[]}]`.
fn rabbitmq_alarms() -> Result<String, String> {
    let output = Command::new("rabbitmqctl")
        .args(["eval", "rabbit_alarm:get_alarms()."])
        .output()
        .map_err(|e| format!("running rabbitmqctl: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "rabbitmqctl eval rabbit_alarm:get_alarms() failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Waits until the memory alarm is `on` (or off), as RabbitMQ reports it.
fn wait_for_memory_alarm(on: bool) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let alarms = rabbitmq_alarms()?;
        if alarms.contains("memory") == on {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!(
                "the memory alarm is not {} after 20 s: {alarms}",
                if on { "on" } else { "off" }
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rabbitmqctl set_vm_memory_high_watermark absolute 1MB`: the memory
/// alarm goes off, and RabbitMQ blocks every connection that publishes (it
/// stops reading from it) until the alarm clears; consuming and acking go
/// on. Returns once the alarm is in effect.
pub fn raise_memory_alarm() -> Result<(), String> {
    WATERMARK_TOUCHED.store(true, Ordering::SeqCst);
    let mut args = vec!["set_vm_memory_high_watermark"];
    args.extend_from_slice(&ALARM_WATERMARK);
    run("rabbitmqctl", &args)?;
    wait_for_memory_alarm(true)
}

/// The default watermark back; returns once the memory alarm has cleared.
pub fn clear_memory_alarm() -> Result<(), String> {
    run(
        "rabbitmqctl",
        &["set_vm_memory_high_watermark", DEFAULT_WATERMARK],
    )?;
    wait_for_memory_alarm(false)?;
    WATERMARK_TOUCHED.store(false, Ordering::SeqCst);
    Ok(())
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

/// Brings back whichever server a scenario left down, and the default
/// memory watermark if it may have been changed, so that a failing scenario
/// never leaves the broker blocking publishers. Never panics: it runs from
/// `Drop`, possibly while a failed assertion unwinds.
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
    if WATERMARK_TOUCHED.load(Ordering::SeqCst)
        && rabbitmq_ready()
        && let Err(error) = clear_memory_alarm()
    {
        eprintln!("faults: could not restore RabbitMQ's memory watermark: {error}");
    }
}

/// Every queue's name, ready and unacked messages, for a failure's message.
pub fn queue_depths() -> String {
    match Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).replace('\t', " "),
        Err(error) => format!("rabbitmqctl list_queues: {error}"),
    }
}
