//! A throwaway three-node RabbitMQ cluster on this machine, made of NEW
//! nodes (`rabbitA@localhost`, `rabbitB@localhost`, `rabbitC@localhost`):
//! the machine's own broker (`rabbit@localhost`, AMQP 5672, shared with
//! other engineers' tests) is never touched.
//!
//! Each node runs as the `rabbitmq` user (`rabbitmq-server -detached`), with
//! its own name, AMQP and distribution ports, and its data, logs, pid file,
//! enabled-plugins file (`[].`) and config file under a fresh
//! `/tmp/ostest-cluster-<uuid>/<node>/`. The config file holds
//! `listeners.tcp.default = 127.0.0.1:<port>`: it replaces
//! /etc/rabbitmq/rabbitmq.conf, which pins 5672 (`RABBITMQ_NODE_PORT` alone
//! does not override it). The nodes and `rabbitmqctl` (also run as
//! `rabbitmq`) share that user's Erlang cookie, /var/lib/rabbitmq/.erlang.cookie.
//! B and C join A with `stop_app`, `join_cluster rabbitA@localhost`,
//! `start_app`.
//!
//! Dropping the [`Cluster`] tears it down whether the test passed or
//! panicked: `stop_app`, `reset` (`force_reset` if it refuses) and `stop` on
//! each node, every one bounded by a timeout; then SIGKILL to any of its
//! Erlang VMs still alive (by the pids its pid files held, checked to be
//! that node's VM) and removal of the temp directory (the nodes' logs are
//! copied to `<dir>-logs` first when the test failed or
//! `CLUSTER_KEEP_LOGS` is set).
//!
//! Everything here blocks (it runs `rabbitmqctl`); the async test calls it
//! through `tokio::task::block_in_place`.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The `rabbitmq` user's home: its `.erlang.cookie` is the cluster's cookie.
const RABBITMQ_HOME: &str = "/var/lib/rabbitmq";
/// How long a node gets to boot (or to come back).
const START_DEADLINE: Duration = Duration::from_secs(90);
/// How long one `rabbitmqctl` command may take before it is killed.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Per command during teardown, where nothing may hang.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// The three nodes: short name, AMQP port, distribution port. Fixed, so
/// that [`crate::stack::AMQP_URL`] can be a constant (the fault suite's
/// checks connect to it); [`Cluster::start`] fails at once if one is taken.
pub const NODES: [(&str, u16, u16); 3] = [
    ("rabbitA", 5681, 25681),
    ("rabbitB", 5682, 25682),
    ("rabbitC", 5683, 25683),
];

/// The AMQP URL of a node's listener (the guest user may connect over
/// loopback).
pub fn amqp_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    /// `rabbitA@localhost`.
    pub name: String,
    pub amqp_port: u16,
    pub dist_port: u16,
    dir: PathBuf,
    /// Every OS pid this node's Erlang VM had (one per start).
    pids: Vec<u32>,
}

impl Node {
    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The node's own log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    /// `rabbitmq-server -detached` as `rabbitmq`, with this node's env.
    fn launch(&self) -> Result<(), String> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("start.log"))
            .map_err(|e| format!("opening start.log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let p = |name: &str| self.dir.join(name).display().to_string();
        let status = as_rabbitmq()
            .args([
                format!("RABBITMQ_NODENAME={}", self.name),
                format!("RABBITMQ_NODE_PORT={}", self.amqp_port),
                format!("RABBITMQ_DIST_PORT={}", self.dist_port),
                format!("RABBITMQ_MNESIA_BASE={}", p("mnesia")),
                format!("RABBITMQ_LOG_BASE={}", p("log")),
                format!("RABBITMQ_PID_FILE={}", p("pid")),
                format!("RABBITMQ_ENABLED_PLUGINS_FILE={}", p("enabled_plugins")),
                format!("RABBITMQ_CONFIG_FILE={}", p("rabbitmq.conf")),
            ])
            .arg(RABBITMQ_SERVER)
            .arg("-detached")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .status()
            .map_err(|e| format!("running rabbitmq-server: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmq-server -detached for {} exited with {status}",
                self.name
            ))
        }
    }

    /// Waits until the AMQP listener accepts connections (the node opens
    /// it last, at boot and on `start_app`), then, with `await_startup`,
    /// for `rabbitmqctl await_startup`; records the VM's pid. (`await_startup`
    /// alone fails at once, "node not running at all", while a booting node
    /// has not yet registered with epmd: hence the port first.)
    fn wait_started(&mut self, await_startup: bool) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        while !port_open(self.amqp_port) {
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not open AMQP port {} within {START_DEADLINE:?}; log tail:\n{}",
                    self.name,
                    self.amqp_port,
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if await_startup {
            ctl(&self.name, &["await_startup"], CTL_TIMEOUT)?;
        }
        self.record_pid();
        Ok(())
    }

    fn record_pid(&mut self) {
        if let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            && !self.pids.contains(&pid)
        {
            self.pids.push(pid);
        }
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A node being stopped (see [`Cluster::stop_node`]).
pub struct Stopping {
    port: u16,
    /// `rabbitmqctl stop`, then the wait for the VM to exit: how long both
    /// took.
    thread: std::thread::JoinHandle<Result<Duration, String>>,
}

impl Stopping {
    /// True once the node no longer accepts AMQP connections.
    pub fn down(&self) -> bool {
        !port_open(self.port)
    }

    /// Waits until `rabbitmqctl stop` has returned and the node's VM has
    /// exited; returns how long that took from the stop on.
    pub fn wait(self) -> Result<Duration, String> {
        self.thread
            .join()
            .map_err(|_| "the rabbitmqctl stop thread panicked".to_owned())?
    }
}

/// A queue as `rabbitmqctl list_queues` reports it.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub name: String,
    /// `quorum` or `classic`.
    pub kind: String,
    /// The node of the leader (a quorum queue's `leader`; for a classic
    /// queue, whose `leader` column is empty on 3.10, the node of its `pid`).
    pub leader: String,
    /// The quorum queue's members that are online (empty for classic).
    pub online: Vec<String>,
    /// The queue's `x-` arguments, as `rabbitmqctl` prints them (JSON).
    pub arguments: String,
}

/// The three nodes. Dropping it tears the cluster down.
pub struct Cluster {
    root: PathBuf,
    pub nodes: Vec<Node>,
    /// How long [`Cluster::start`] took.
    pub started_in: Duration,
}

impl Cluster {
    /// Starts the three nodes, joins B and C to A, and returns once
    /// `cluster_status` shows all three running.
    pub fn start() -> Result<Self, String> {
        let started = Instant::now();
        preflight()?;
        let root = PathBuf::from(format!("/tmp/ostest-cluster-{}", Uuid::new_v4().simple()));
        let nodes = NODES
            .iter()
            .map(|&(short, amqp_port, dist_port)| Node {
                name: format!("{short}@localhost"),
                amqp_port,
                dist_port,
                dir: root.join(short),
                pids: Vec::new(),
            })
            .collect();
        // From here on, Drop cleans up whatever was started.
        let mut cluster = Self {
            root,
            nodes,
            started_in: Duration::ZERO,
        };
        for node in &cluster.nodes {
            for dir in ["mnesia", "log"] {
                std::fs::create_dir_all(node.dir.join(dir))
                    .map_err(|e| format!("creating {}: {e}", node.dir.display()))?;
            }
            std::fs::write(node.dir.join("enabled_plugins"), "[].\n")
                .map_err(|e| format!("writing enabled_plugins: {e}"))?;
            std::fs::write(
                node.dir.join("rabbitmq.conf"),
                format!("listeners.tcp.default = 127.0.0.1:{}\n", node.amqp_port),
            )
            .map_err(|e| format!("writing rabbitmq.conf: {e}"))?;
        }
        run(Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&cluster.root))?;
        // Boot the three at once (each takes seconds), then wait for each.
        for node in &cluster.nodes {
            node.launch()?;
        }
        for node in &mut cluster.nodes {
            node.wait_started(true)?;
        }
        let seed = cluster.nodes[0].name.clone();
        for i in 1..cluster.nodes.len() {
            let name = cluster.nodes[i].name.clone();
            ctl(&name, &["stop_app"], CTL_TIMEOUT)?;
            ctl(&name, &["join_cluster", &seed], CTL_TIMEOUT)?;
            ctl(&name, &["start_app"], CTL_TIMEOUT)?;
            cluster.nodes[i].wait_started(false)?;
        }
        cluster.await_running(&seed, cluster.nodes.len())?;
        cluster.started_in = started.elapsed();
        Ok(cluster)
    }

    /// The comma-separated AMQP URLs of the three nodes, A first.
    pub fn amqp_urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| amqp_url(n.amqp_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `cluster_status` as seen from `via`: its running nodes.
    pub fn running_nodes(&self, via: &str) -> Result<Vec<String>, String> {
        let out = ctl(
            via,
            &["-q", "--formatter", "json", "cluster_status"],
            CTL_TIMEOUT,
        )?;
        let status: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("cluster_status JSON: {e}: {out}"))?;
        Ok(strings(&status["running_nodes"]))
    }

    /// Polls `cluster_status` on `via` until `n` nodes run.
    pub fn await_running(&self, via: &str, n: usize) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let running = self.running_nodes(via);
            match running {
                Ok(nodes) if nodes.len() >= n => return Ok(nodes),
                other if Instant::now() > deadline => {
                    return Err(format!(
                        "cluster_status on {via} did not show {n} running nodes within \
                         {START_DEADLINE:?}: {other:?}"
                    ));
                }
                _ => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }

    /// Each node's name and AMQP port.
    pub fn ports(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| (n.name.clone(), n.amqp_port))
            .collect()
    }

    /// `rabbitmqctl -n <node> stop`, on a thread of its own: the node closes
    /// its listeners and connections first, hands over its quorum queue
    /// leaderships, then its VM halts. Under load that takes seconds to
    /// tens of seconds; [`Stopping::down`] tells when AMQP is gone.
    pub fn stop_node(&mut self, name: &str) -> Stopping {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node");
        node.record_pid();
        let (target, pids) = (node.name.clone(), node.pids.clone());
        let issued = Instant::now();
        Stopping {
            port: node.amqp_port,
            thread: std::thread::spawn(move || {
                ctl(&target, &["stop"], CTL_TIMEOUT)?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while pids.iter().any(|&pid| alive(pid, &target)) {
                    if Instant::now() > deadline {
                        return Err(format!("{target} still runs 30 s after rabbitmqctl stop"));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(issued.elapsed())
            }),
        }
    }

    /// Starts a node stopped with [`Cluster::stop_node`] again, with the
    /// same env (it rejoins the cluster from its own data), and waits until
    /// its AMQP listener is open (it opens last, once the node runs in the
    /// cluster again). [`await_members`] then tells when its queue members
    /// are back.
    pub fn start_node(&mut self, name: &str) -> Result<(), String> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node");
        node.launch()?;
        node.wait_started(false)
    }

    fn teardown(&mut self) {
        let keep_logs = std::thread::panicking() || std::env::var_os("CLUSTER_KEEP_LOGS").is_some();
        for node in self.nodes.iter_mut().rev() {
            node.record_pid();
            if node.pids.iter().any(|&pid| alive(pid, &node.name)) {
                // `reset` refuses to leave a cluster none of whose other
                // members runs (3.10: "no_running_cluster_nodes"), e.g. when
                // a test failed with a node down: then `force_reset`.
                let _ = ctl(&node.name, &["stop_app"], TEARDOWN_TIMEOUT);
                if ctl(&node.name, &["reset"], TEARDOWN_TIMEOUT).is_err()
                    && let Err(error) = ctl(&node.name, &["force_reset"], TEARDOWN_TIMEOUT)
                {
                    eprintln!("cluster teardown: force_reset on {}: {error}", node.name);
                }
                if let Err(error) = ctl(&node.name, &["stop"], TEARDOWN_TIMEOUT) {
                    eprintln!("cluster teardown: stop on {}: {error}", node.name);
                }
            }
        }
        // `stop` returns as the VM halts: give it a moment, then SIGKILL
        // whatever survived (or was never reachable), by pid.
        let exited = |nodes: &[Node]| {
            !nodes
                .iter()
                .any(|n| n.pids.iter().any(|&pid| alive(pid, &n.name)))
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !exited(&self.nodes) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for node in &self.nodes {
            for &pid in &node.pids {
                if alive(pid, &node.name) {
                    eprintln!("cluster teardown: killing {} (pid {pid})", node.name);
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !exited(&self.nodes) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if keep_logs {
            let logs = PathBuf::from(format!("{}-logs", self.root.display()));
            for node in &self.nodes {
                let to = logs.join(node.dir.file_name().unwrap_or_default());
                if std::fs::create_dir_all(&to).is_ok() {
                    let _ = copy_dir(&node.dir.join("log"), &to);
                    let _ = std::fs::copy(node.dir.join("start.log"), to.join("start.log"));
                }
            }
            eprintln!("cluster: node logs kept in {}", logs.display());
        }
        if let Err(error) = std::fs::remove_dir_all(&self.root)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "cluster teardown: removing {}: {error}",
                self.root.display()
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Our queues (names starting with `prefix`), as `via` lists them.
pub fn list_queues(via: &str, prefix: &str) -> Result<Vec<QueueInfo>, String> {
    let out = ctl(
        via,
        &[
            "-q",
            "--formatter",
            "json",
            "list_queues",
            "name",
            "type",
            "leader",
            "online",
            "arguments",
        ],
        CTL_TIMEOUT,
    )?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&out).map_err(|e| format!("list_queues JSON: {e}: {out}"))?;
    let mut queues: Vec<QueueInfo> = rows
        .iter()
        .filter_map(|row| {
            let name = row["name"].as_str()?;
            name.starts_with(prefix).then(|| QueueInfo {
                name: name.to_owned(),
                kind: row["type"].as_str().unwrap_or_default().to_owned(),
                leader: row["leader"].as_str().unwrap_or_default().to_owned(),
                online: strings(&row["online"]),
                arguments: row["arguments"].to_string(),
            })
        })
        .collect();
    // 3.10 prints no leader for a classic queue; its pid names its node
    // in the table output (`<rabbitA@localhost.1796115577.1158.0>`; the
    // JSON output drops the node: `#PID<10987.1158.0>`).
    if queues.iter().any(|q| q.leader.is_empty()) {
        let table = ctl(via, &["-s", "list_queues", "name", "pid"], CTL_TIMEOUT)?;
        for line in table.lines() {
            let mut columns = line.split('\t');
            let (Some(name), Some(pid)) = (columns.next(), columns.next()) else {
                continue;
            };
            let node = pid.trim_start_matches('<').split('.').next().unwrap_or("");
            for queue in queues.iter_mut().filter(|q| q.name == name) {
                if queue.leader.is_empty() {
                    queue.leader = node.to_owned();
                }
            }
        }
    }
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(queues)
}

/// Polls `list_queues` on `via` until each of our queues (names starting
/// with `prefix`) has `n` members online: a restarted node's quorum queue
/// members are back (and caught up with the log, or catching up).
pub fn await_members(via: &str, prefix: &str, n: usize) -> Result<Vec<QueueInfo>, String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let queues = list_queues(via, prefix);
        match queues {
            Ok(queues) if !queues.is_empty() && queues.iter().all(|q| q.online.len() >= n) => {
                return Ok(queues);
            }
            other if Instant::now() > deadline => {
                return Err(format!(
                    "the queues did not get {n} members online within {START_DEADLINE:?}: \
                     {other:#?}"
                ));
            }
            _ => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// Root (for `runuser`), the tools present, and the ports free: else the
/// test says why instead of timing out.
fn preflight() -> Result<(), String> {
    let uid = run(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        return Err(format!(
            "the cluster test must run as root (it starts RabbitMQ nodes as the rabbitmq user \
             with runuser); uid is {}",
            uid.trim()
        ));
    }
    for tool in [RABBITMQ_SERVER, RABBITMQCTL] {
        if !Path::new(tool).exists() {
            return Err(format!("{tool} not found: install rabbitmq-server"));
        }
    }
    for &(short, amqp, dist) in &NODES {
        for port in [amqp, dist] {
            if TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
                return Err(format!(
                    "port {port} (node {short}@localhost) is taken: a cluster left over by a killed \
                     run? Stop it with `runuser -u rabbitmq -- rabbitmqctl -n {short}@localhost \
                     stop` and remove /tmp/ostest-cluster-*"
                ));
            }
        }
    }
    Ok(())
}

/// `runuser -u rabbitmq -- env -i <a clean env>`: the nodes and the CLI
/// run as `rabbitmq`, with its home (so its `.erlang.cookie`) and nothing
/// of our environment (no stray `RABBITMQ_*`).
fn as_rabbitmq() -> Command {
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
        eprintln!("cluster: {what}: {:.1}s", started.elapsed().as_secs_f64());
    }
    match status {
        Some(status) if status.success() => Ok(out),
        Some(status) => Err(format!("{what} failed ({status}): {out}{err}")),
        None => Err(format!("{what} timed out after {timeout:?}: {out}{err}")),
    }
}

/// Runs a command to the end; its stdout, or an error with its output.
fn run(command: &mut Command) -> Result<String, String> {
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

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The process exists, is not a zombie, and is the Erlang VM of `node`
/// (its environment names it: a recycled pid is never killed).
fn alive(pid: u32, node: &str) -> bool {
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

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}
