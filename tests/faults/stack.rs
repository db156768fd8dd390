//! One scenario's deployment: its own database and AMQP names, and the roles
//! running as separate processes of the real binary, as docker compose runs
//! them. Dropping a [`Stack`] kills its processes, brings Postgres and
//! RabbitMQ back if they are down, and deletes the database, queues and
//! exchange, whether the scenario passed or panicked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use order_service::config::AmqpConfig;
use order_service::orders::SUBSCRIPTIONS;
use outbox_common::amqp::QueueNames;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgPool};
use uuid::Uuid;

use crate::common::roles;
pub use crate::common::roles::Role;
use crate::{eventually, services};

/// The level the roles log at, unless `info`.
const RUST_LOG_VAR: &str = "FAULT_RUST_LOG";

pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The database, the AMQP names and the running processes of one scenario.
pub struct Stack {
    pub db_name: String,
    pub db_url: String,
    /// This scenario's exchange, queue prefix and retry delays.
    pub amqp: AmqpConfig,
    /// Each role's own HTTP address (the API's orders; the others' health,
    /// readiness and metrics probes), the same across its restarts.
    pub http_addrs: HashMap<Role, SocketAddr>,
    /// The assertions' own small pool on the scenario's database.
    pub pool: PgPool,
    /// Each role's stdout and stderr, appended across restarts.
    log_dir: PathBuf,
    children: HashMap<Role, Child>,
}

impl Stack {
    /// Creates the database, applies the migrations with `order-service
    /// migrate`, and starts every role; returns once they all run.
    pub async fn start() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("osfault_{id}");
        admin_execute(format!("CREATE DATABASE {db_name}"))
            .await
            .expect("creating the scenario database");
        let db_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
        let mut amqp = AmqpConfig::new(AMQP_URL);
        amqp = amqp.with_exchange(format!("osf{}_order_events", &id[..12]));
        amqp = amqp.with_queue_prefix(format!("osf{}_", &id[..12]));
        amqp = amqp.with_retry_delays(vec![
            std::time::Duration::from_millis(200),
            std::time::Duration::from_millis(500),
        ]);
        let log_dir = std::env::temp_dir().join(&db_name);
        let mut stack = Self {
            pool: PgPoolOptions::new()
                .max_connections(3)
                .connect_lazy(&db_url)
                .expect("a valid database URL"),
            db_name,
            db_url,
            amqp,
            http_addrs: free_ports(),
            log_dir,
            children: HashMap::new(),
        };
        std::fs::create_dir_all(&stack.log_dir).expect("creating the log directory");
        roles::migrate(&stack.db_url, &stack.amqp, &stack.log_dir, RUST_LOG_VAR);
        for role in Role::ALL {
            stack.spawn(role);
        }
        for role in Role::ALL {
            stack.wait_started(role, 0).await;
        }
        stack
    }

    pub fn orders_url(&self) -> String {
        format!("http://{}/orders", self.http_addrs[&Role::Api])
    }

    /// Starts `role`; returns the offset in its log where this run begins.
    fn spawn(&mut self, role: Role) -> u64 {
        let offset = self.log(role, 0).len() as u64;
        let log = role.log_file(&self.log_dir);
        let addr = self.http_addrs[&role];
        // The mailer stays off (the command's default): no SMTP server
        // here, and the checks count the consumers' own rows.
        let child = roles::command(
            role.args(),
            &self.db_url,
            &self.amqp,
            addr,
            &log,
            RUST_LOG_VAR,
        )
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", role.name()));
        let previous = self.children.insert(role, child);
        assert!(previous.is_none(), "{} was already running", role.name());
        offset
    }

    /// Waits until the run of `role` that began at `offset` logs that it is
    /// up; fails at once if it exits instead.
    async fn wait_started(&mut self, role: Role, offset: u64) {
        let (started, _) = role.started_and_stopped();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.log(role, offset).contains(started) {
                return;
            }
            let child = self.children.get_mut(&role).expect("the role was spawned");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited with {status} while starting:\n{}",
                    role.name(),
                    self.log(role, offset)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within a minute:\n{}",
                role.name(),
                self.log(role, offset)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `role` again after a fault and waits until it is up.
    pub async fn restart(&mut self, role: Role) {
        let offset = self.spawn(role);
        self.wait_started(role, offset).await;
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self, role: Role) {
        let mut child = self.children.remove(&role).expect("the role is running");
        child.kill().expect("sending SIGKILL");
        child.wait().expect("reaping the killed role");
    }

    /// SIGTERM to every one of `roles` at once, then waits for each to exit.
    /// Returns each one's exit status and what it logged while stopping.
    pub async fn terminate(&mut self, roles: &[Role]) -> Vec<(Role, ExitStatus, String)> {
        let mut stopping = Vec::new();
        for &role in roles {
            let child = self.children.remove(&role).expect("the role is running");
            let offset = self.log(role, 0).len() as u64;
            let sent = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("running kill");
            assert!(sent.success(), "kill -TERM failed");
            stopping.push((role, offset, std::sync::Mutex::new(child)));
        }
        let mut stopped = Vec::new();
        for (role, offset, child) in stopping {
            let what = format!("{} to exit after SIGTERM", role.name());
            let status = eventually(&what, Duration::from_secs(40), || async {
                child.lock().unwrap().try_wait().expect("try_wait")
            })
            .await;
            stopped.push((role, status, self.log(role, offset)));
        }
        stopped
    }

    /// SIGSTOP: the process is frozen where it stands, its connections left
    /// open (unacked deliveries stay with it), until the returned guard is
    /// dropped, which sends SIGCONT, on success and on a panic alike.
    pub fn pause(&self, role: Role) -> Paused {
        let pid = self.children.get(&role).expect("the role is running").id();
        signal("-STOP", pid).expect("sending SIGSTOP");
        let paused = Paused { pid };
        // In /proc/PID/stat the state follows the command name: T when stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGSTOP: {stat}",
                role.name()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        paused
    }

    /// What `role` logged from byte `offset` on.
    pub fn log(&self, role: Role, offset: u64) -> String {
        let text = std::fs::read(role.log_file(&self.log_dir)).unwrap_or_default();
        let start = (offset as usize).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// Roles that exited on their own (a crash): name, status, log tail.
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for (role, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                dead.push(format!("{} exited with {status}", role.name()));
            }
        }
        dead
    }

    /// The last warnings and errors of every role, for a failure message.
    pub fn diagnostics(&self) -> String {
        roles::diagnostics(&self.log_dir, Role::ALL.map(|r| (r, self.log(r, 0))))
    }
}

/// A role stopped with SIGSTOP; dropping it sends SIGCONT.
#[must_use = "dropping it resumes the role at once"]
pub struct Paused {
    pid: u32,
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Err(error) = signal("-CONT", self.pid) {
            eprintln!("faults: could not resume process {}: {error}", self.pid);
        }
    }
}

/// `kill -SIGNAL pid`.
fn signal(signal: &str, pid: u32) -> Result<(), String> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .map_err(|e| format!("running kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill {signal} {pid}: {status}"))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        services::restore();
        let (db_name, amqp) = (self.db_name.clone(), self.amqp.clone());
        // We may be inside the test's runtime: clean up on a runtime of our own.
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(cleanup(&db_name, &amqp))
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!(
                "faults: cleanup of {} incomplete: {cleaned:?}",
                self.db_name
            );
        }
        if std::thread::panicking() || std::env::var_os("FAULT_KEEP_LOGS").is_some() {
            eprintln!("faults: role logs kept in {}", self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// Drops the database and deletes the queues and the exchange, each step
/// bounded so a server that is still down cannot hang the test.
async fn cleanup(db_name: &str, amqp: &AmqpConfig) -> Result<(), String> {
    let limit = Duration::from_secs(20);
    let dropped = tokio::time::timeout(
        limit,
        admin_execute(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")),
    )
    .await;
    let deleted = tokio::time::timeout(limit, delete_amqp(amqp)).await;
    match (dropped, deleted) {
        (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

async fn delete_amqp(amqp: &AmqpConfig) -> Result<(), lapin::Error> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    // Every queue the relay declares: both consumers', bound to both events.
    for consumer in SUBSCRIPTIONS.iter().map(|s| s.consumer) {
        let names = QueueNames::new(amqp, consumer);
        let retries = names.retries.iter().map(|(q, _)| q.clone());
        for queue in [names.main.clone(), names.dlq.clone()]
            .into_iter()
            .chain(retries)
        {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    channel
        .exchange_delete(amqp.exchange().into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "faults cleanup".into()).await;
    Ok(())
}

/// Runs one statement on the admin database (names cannot be bound).
async fn admin_execute(sql: String) -> Result<(), sqlx::Error> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(ADMIN_URL).await?;
    conn.execute(sqlx::AssertSqlSafe(sql)).await?;
    conn.close().await
}

/// One port per role, each free a moment ago (outside the kernel's
/// ephemeral range, so no outgoing connection takes it meanwhile) and all
/// different; a role binds its own, and binds it again after a restart.
fn free_ports() -> HashMap<Role, SocketAddr> {
    let mut ports = HashMap::new();
    while ports.len() < Role::ALL.len() {
        let addr = roles::free_addr();
        if !ports.values().any(|taken| *taken == addr) {
            ports.insert(Role::ALL[ports.len()], addr);
        }
    }
    ports
}
