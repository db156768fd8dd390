//! RabbitMQ nodes of a test's own on this machine, beside its broker
//! (`rabbit@localhost`, AMQP 5672, shared with other engineers' tests, never
//! touched): used by the cluster test (three nodes) and the TLS test (one).
//!
//! A node runs as the `rabbitmq` user (`rabbitmq-server -detached`), with its
//! own name, AMQP and distribution ports, and its data, logs, pid file,
//! enabled-plugins file (`[].`) and config file under a folder of its own.
//! The config file replaces /etc/rabbitmq/rabbitmq.conf, which pins 5672
//! (`RABBITMQ_NODE_PORT` alone does not override it). The nodes and
//! `rabbitmqctl` (also run as `rabbitmq`) share that user's Erlang cookie,
//! /var/lib/rabbitmq/.erlang.cookie.
//!
//! Everything here blocks (it runs `rabbitmqctl`); async tests call it
//! through `tokio::task::block_in_place`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::free_port;
use super::rabbit_ctl::{
    RABBITMQ_SERVER, alive, as_rabbitmq, can_start_nodes, ctl, give_to_rabbitmq, port_open,
};

/// How long a node gets to boot (or to come back).
pub const START_DEADLINE: Duration = Duration::from_secs(90);
/// How long one `rabbitmqctl` command may take before it is killed.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Per command during teardown, where nothing may hang.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// One node: `<short>@localhost`, its ports and its folder.
#[derive(Debug)]
pub struct Node {
    /// `rabbitA@localhost`.
    pub name: String,
    /// The port the node is started with (`RABBITMQ_NODE_PORT`) and whose
    /// opening tells it has booted: a listener of its config file.
    pub amqp_port: u16,
    pub dist_port: u16,
    pub dir: PathBuf,
    /// Every OS pid this node's Erlang VM had (one per start).
    pub pids: Vec<u32>,
}

impl Node {
    pub fn new(short: &str, amqp_port: u16, dist_port: u16, dir: PathBuf) -> Self {
        Self {
            name: format!("{short}@localhost"),
            amqp_port,
            dist_port,
            dir,
            pids: Vec::new(),
        }
    }

    /// Creates the node's folders, an empty plugin list and `config` as its
    /// `rabbitmq.conf` (the caller gives the folder to `rabbitmq` after).
    pub fn prepare(&self, config: &str) -> Result<(), String> {
        for dir in ["mnesia", "log"] {
            std::fs::create_dir_all(self.dir.join(dir))
                .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        }
        std::fs::write(self.dir.join("enabled_plugins"), "[].\n")
            .map_err(|e| format!("writing enabled_plugins: {e}"))?;
        std::fs::write(self.dir.join("rabbitmq.conf"), config)
            .map_err(|e| format!("writing rabbitmq.conf: {e}"))
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The node's own log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    /// `rabbitmq-server -detached` as `rabbitmq`, with this node's env.
    pub fn launch(&self) -> Result<(), String> {
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
    pub fn wait_started(&mut self, await_startup: bool) -> Result<(), String> {
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

    pub fn record_pid(&mut self) {
        if let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            && !self.pids.contains(&pid)
        {
            self.pids.push(pid);
        }
    }

    /// Whether any VM this node had still runs.
    pub fn running(&self) -> bool {
        self.pids.iter().any(|&pid| alive(pid, &self.name))
    }

    /// SIGKILL to every VM of this node still alive.
    pub fn kill(&self) {
        for &pid in &self.pids {
            if alive(pid, &self.name) {
                eprintln!("rabbit teardown: killing {} (pid {pid})", self.name);
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// One node of a test's own, under `/tmp/ostest-<prefix>-<uuid>/`, on
/// ports free when it was made. Dropping it stops the node (`rabbitmqctl
/// stop`, then SIGKILL to its VM if it outlives that) and removes the
/// folder, whether the test passed or panicked.
pub struct OwnNode {
    pub node: Node,
    root: PathBuf,
}

impl OwnNode {
    /// A node not started yet; put its files in [`OwnNode::dir`], then
    /// [`OwnNode::start`] it.
    pub fn new(prefix: &str) -> Result<Self, String> {
        can_start_nodes()?;
        let id = Uuid::new_v4().simple().to_string();
        let root = PathBuf::from(format!("/tmp/ostest-{prefix}-{id}"));
        let short = format!("{prefix}{}", &id[..8]);
        let node = Node::new(&short, free_port(), free_port(), root.join(&short));
        std::fs::create_dir_all(&node.dir)
            .map_err(|e| format!("creating {}: {e}", node.dir.display()))?;
        Ok(Self { node, root })
    }

    /// The node's folder (owned by `rabbitmq` once started).
    pub fn dir(&self) -> &Path {
        &self.node.dir
    }

    /// Copies `from` into the node's folder (where `rabbitmq` can read it).
    pub fn install(&self, from: &Path) -> PathBuf {
        let to = self.node.dir.join(from.file_name().expect("a file name"));
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        to
    }

    /// Writes `config`, gives the folder to `rabbitmq`, boots the node and
    /// waits until it runs (its [`Node::amqp_port`] open, `await_startup`).
    pub fn start(&mut self, config: &str) -> Result<(), String> {
        self.node.prepare(config)?;
        give_to_rabbitmq(&self.root)?;
        self.node.launch()?;
        self.node.wait_started(true)
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        self.node.record_pid();
        if self.node.running()
            && let Err(error) = ctl(&self.node.name, &["stop"], TEARDOWN_TIMEOUT)
        {
            eprintln!("rabbit teardown: stop on {}: {error}", self.node.name);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.node.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.node.kill();
        if std::thread::panicking() {
            eprintln!("{} log tail:\n{}", self.node.name, self.node.log_tail(40));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
