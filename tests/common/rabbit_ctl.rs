//! Running RabbitMQ's tools as the `rabbitmq` user, and the small process
//! and port checks the node harnesses share (`rabbit_node.rs`).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
pub const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The `rabbitmq` user's home: its `.erlang.cookie` is the nodes' cookie.
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// Root (for `runuser`) and the tools present: else the test says why
/// instead of timing out.
pub fn can_start_nodes() -> Result<(), String> {
    let uid = run(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        return Err(format!(
            "this test must run as root (it starts RabbitMQ nodes as the rabbitmq user with \
             runuser); uid is {}",
            uid.trim()
        ));
    }
    for tool in [RABBITMQ_SERVER, RABBITMQCTL] {
        if !Path::new(tool).exists() {
            return Err(format!("{tool} not found: install rabbitmq-server"));
        }
    }
    Ok(())
}

/// `chown -R rabbitmq:rabbitmq <path>`.
pub fn give_to_rabbitmq(path: &Path) -> Result<(), String> {
    run(Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(path))
    .map(drop)
}

/// `runuser -u rabbitmq -- env -i <a clean env>`: the nodes and the CLI
/// run as `rabbitmq`, with its home (so its `.erlang.cookie`) and nothing
/// of our environment (no stray `RABBITMQ_*`).
pub fn as_rabbitmq() -> Command {
    let mut command = Command::new("runuser");
    command.args([
        "-u",
        "rabbitmq",
        "--",
        "env",
        "-i",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        &format!("HOME={RABBITMQ_HOME}"),
        "LANG=C.UTF-8",
        "LC_ALL=C.UTF-8",
    ]);
    command
}

/// `rabbitmqctl -n <node> <args>` as `rabbitmq`, killed (its own process
/// group) if it takes longer than `timeout`. Returns its stdout.
pub fn ctl(node: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut command = as_rabbitmq();
    command
        .arg(RABBITMQCTL)
        .args(["-n", node])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let what = format!("rabbitmqctl -n {node} {}", args.join(" "));
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| format!("{what}: {e}"))?;
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        }),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = readers.0.join().unwrap_or_default();
    let err = readers.1.join().unwrap_or_default();
    if std::env::var_os("CLUSTER_VERBOSE").is_some() {
        eprintln!("rabbit: {what}: {:.1}s", started.elapsed().as_secs_f64());
    }
    match status {
        Some(status) if status.success() => Ok(out),
        Some(status) => Err(format!("{what} failed ({status}): {out}{err}")),
        None => Err(format!("{what} timed out after {timeout:?}: {out}{err}")),
    }
}

/// Runs a command to the end; its stdout, or an error with its output.
pub fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The process exists, is not a zombie, and is the Erlang VM of `node`
/// (its environment names it: a recycled pid is never killed).
pub fn alive(pid: u32, node: &str) -> bool {
    let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false);
    let ours = std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|&b| b == 0)
            .any(|var| var == format!("RABBITMQ_NODENAME={node}").as_bytes())
    });
    running && ours
}

pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}
