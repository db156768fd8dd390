//! A throwaway three-node RabbitMQ cluster on this machine, made of NEW
//! nodes (`rabbitA@localhost`, `rabbitB@localhost`, `rabbitC@localhost`):
//! the machine's own broker (`rabbit@localhost`, AMQP 5672, shared with
//! other engineers' tests) is never touched.
//!
//! Each node is a [`Node`] of `common/rabbit_node.rs` (run as the `rabbitmq`
//! user with its own name, ports, data and config file), under a fresh
//! `/tmp/ostest-cluster-<uuid>/<node>/`; its config file holds
//! `listeners.tcp.default = 127.0.0.1:<port>`. B and C join A with
//! `stop_app`, `join_cluster rabbitA@localhost`, `start_app`.
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

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::common::rabbit_ctl::{
    alive, can_start_nodes, copy_dir, ctl, give_to_rabbitmq, port_open,
};
pub use crate::common::rabbit_node::Node;
use crate::common::rabbit_node::{CTL_TIMEOUT, START_DEADLINE, TEARDOWN_TIMEOUT};

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
            .map(|&(short, amqp_port, dist_port)| {
                Node::new(short, amqp_port, dist_port, root.join(short))
            })
            .collect();
        // From here on, Drop cleans up whatever was started.
        let mut cluster = Self {
            root,
            nodes,
            started_in: Duration::ZERO,
        };
        for node in &cluster.nodes {
            node.prepare(&format!(
                "listeners.tcp.default = 127.0.0.1:{}\n",
                node.amqp_port
            ))?;
        }
        give_to_rabbitmq(&cluster.root)?;
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
            node.kill();
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
    can_start_nodes()?;
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
