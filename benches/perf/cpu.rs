//! CPU time of whole process trees, read from /proc: what the service, Postgres
//! and RabbitMQ each spend over a measured window.
//!
//! A tree's time is, for every live process in it, its own `utime + stime`
//! plus `cutime + cstime` (its children that ended and were reaped): a
//! process that ends inside the window moves from the live sum into its
//! parent's `cutime`, so it is counted once, in full. Postgres's backends
//! and background workers are the postmaster's children; RabbitMQ is one
//! `beam.smp` (with its port programs as children). Postgres's figure is the
//! whole cluster's, so other users of the same cluster count too.

use std::collections::HashMap;

/// Clock ticks per second of /proc's times (`sysconf(_SC_CLK_TCK)`, 100 on
/// Linux everywhere this runs).
const TICKS_PER_SECOND: f64 = 100.0;

/// One process's line of /proc/<pid>/stat, the fields this needs.
struct Stat {
    comm: String,
    ppid: u32,
    /// utime + stime + cutime + cstime, in ticks.
    ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split at the
    // last ')'.
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (0), ppid (1), ... utime (11), stime (12),
    // cutime (13), cstime (14).
    let number = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        comm,
        ppid: u32::try_from(number(1)?).ok()?,
        ticks: (11..=14).map(|i| number(i).unwrap_or(0)).sum(),
    })
}

fn all() -> HashMap<u32, Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .collect()
}

/// CPU seconds used so far by `root` and every live process under it.
pub fn tree_seconds(root: u32) -> f64 {
    let processes = all();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, s) in &processes {
        children.entry(s.ppid).or_default().push(pid);
    }
    let (mut ticks, mut todo) = (0u64, vec![root]);
    while let Some(pid) = todo.pop() {
        if let Some(s) = processes.get(&pid) {
            ticks += s.ticks;
        }
        todo.extend(children.get(&pid).into_iter().flatten());
    }
    ticks as f64 / TICKS_PER_SECOND
}

/// Seconds, since boot, during which at least one runnable task of the
/// machine waited for a core: the `some` line of the kernel's CPU pressure
/// (PSI, `/proc/pressure/cpu`). Its growth over a window, as a share of the
/// window, says how saturated the machine's cores were; `None` where the
/// kernel does not report it.
pub fn waited_for_a_core() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    let total = some
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?;
    Some(total.parse::<u64>().ok()? as f64 / 1e6)
}

/// The postmaster: the parent of a backend of `pool`'s.
pub async fn postmaster(pool: &sqlx::PgPool) -> anyhow::Result<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await?;
    let backend = u32::try_from(backend)?;
    stat(backend)
        .map(|s| s.ppid)
        .ok_or_else(|| anyhow::anyhow!("no /proc entry for Postgres backend {backend}"))
}

/// RabbitMQ's Erlang VM, if it runs on this machine: the oldest `beam.smp`
/// whose command line names rabbit.
pub fn rabbitmq() -> Option<u32> {
    let mut beams: Vec<u32> = all()
        .into_iter()
        .filter(|(_, s)| s.comm == "beam.smp")
        .map(|(pid, _)| pid)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("rabbit"))
        })
        .collect();
    beams.sort_unstable();
    beams.first().copied()
}

/// The CPU seconds of the three parties at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub postgres: f64,
    pub rabbitmq: f64,
    pub service: f64,
}

/// Where the three parties are.
pub struct Parties {
    pub postgres: u32,
    /// `None`: RabbitMQ is not on this machine (its figure is NaN).
    pub rabbitmq: Option<u32>,
    pub service: u32,
}

impl Parties {
    pub fn sample(&self) -> Sample {
        Sample {
            postgres: tree_seconds(self.postgres),
            rabbitmq: self.rabbitmq.map_or(f64::NAN, tree_seconds),
            service: tree_seconds(self.service),
        }
    }
}

/// CPU per order, in ms, of each party over a window.
#[derive(Debug, Clone, Copy)]
pub struct PerOrder {
    pub postgres_ms: f64,
    pub rabbitmq_ms: f64,
    pub service_ms: f64,
}

impl PerOrder {
    pub fn between(before: Sample, after: Sample, orders: i64) -> Self {
        let per = |a: f64, b: f64| (b - a) * 1000.0 / orders.max(1) as f64;
        Self {
            postgres_ms: per(before.postgres, after.postgres),
            rabbitmq_ms: per(before.rabbitmq, after.rabbitmq),
            service_ms: per(before.service, after.service),
        }
    }

    pub fn total_ms(&self) -> f64 {
        self.postgres_ms + self.rabbitmq_ms + self.service_ms
    }

    pub fn summary(&self) -> String {
        format!(
            "Postgres {:.2} ms, RabbitMQ {:.2} ms, service {:.2} ms, total {:.2} ms CPU per order",
            self.postgres_ms,
            self.rabbitmq_ms,
            self.service_ms,
            self.total_ms()
        )
    }
}
