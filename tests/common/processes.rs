//! The real binary's roles as processes of their own, as docker compose runs
//! them: one harness for every suite that runs them (faults, cluster, mail,
//! prometheus). It starts a role with the suite's settings and its own
//! HTTP_ADDR (kept across restarts), one process of each role or the
//! roles it is given (two relays, say), appends its output to its log file,
//! waits until it says it runs, kills (SIGKILL), stops (SIGTERM), pauses
//! (SIGSTOP) and restarts it, names the roles that exited on their own,
//! and quotes the logs' last warnings for a failure message. Dropping it
//! kills every process, whether the test passed or panicked. What a suite
//! needs beyond this (its database, broker, SMTP server, assertions) stays
//! in the suite.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use order_service::config::AmqpConfig;

use super::eventually;
use super::roles::{self, Role};

/// How long a role may take to log that it runs.
const STARTUP: Duration = Duration::from_secs(60);
/// How long a role may take to exit after SIGTERM.
const SHUTDOWN: Duration = Duration::from_secs(40);

/// The roles of one test, each started at most once at a time.
pub struct Processes {
    db_url: String,
    amqp: AmqpConfig,
    log_dir: PathBuf,
    /// The environment variable that sets the roles' `RUST_LOG`.
    rust_log_var: &'static str,
    /// Set for every role, on top of [`roles::command`]'s settings.
    env: Vec<(&'static str, String)>,
    /// Set for one role only (the e-mail consumer's mailer, say).
    role_env: HashMap<Role, Vec<(&'static str, String)>>,
    /// The roles this test runs: [`Role::ALL`] unless [`Processes::roles`]
    /// says otherwise.
    roles: Vec<Role>,
    /// Each role's HTTP address, drawn once: a restarted role binds the same
    /// one, so whatever watches it need not be told.
    addrs: HashMap<Role, SocketAddr>,
    running: HashMap<Role, Child>,
    /// When set, the log directory is removed on drop unless the test failed
    /// or this environment variable is set; when not, the caller owns it.
    keep_logs_var: Option<&'static str>,
}

impl Processes {
    /// No role runs yet. Each role will run against `db_url` and `amqp`
    /// (URL, exchange, queue prefix, retry delays), log to
    /// `<log_dir>/<role>.log` (created here), at the level in `rust_log_var`.
    pub fn new(
        db_url: &str,
        amqp: &AmqpConfig,
        log_dir: &Path,
        rust_log_var: &'static str,
    ) -> Self {
        std::fs::create_dir_all(log_dir).expect("creating the log directory");
        Self {
            db_url: db_url.to_owned(),
            amqp: amqp.clone(),
            log_dir: log_dir.to_owned(),
            rust_log_var,
            env: Vec::new(),
            role_env: HashMap::new(),
            roles: Role::ALL.to_vec(),
            addrs: free_addrs(&Role::ALL),
            running: HashMap::new(),
            keep_logs_var: None,
        }
    }

    /// Sets `key` for every role.
    pub fn env(mut self, key: &'static str, value: &str) -> Self {
        self.env.push((key, value.to_owned()));
        self
    }

    /// Sets `vars` for `role` only.
    pub fn role_env(mut self, role: Role, vars: Vec<(&'static str, String)>) -> Self {
        self.role_env.entry(role).or_default().extend(vars);
        self
    }

    /// Runs `roles` instead of [`Role::ALL`] (e.g. [`Role::DOUBLED`]), each
    /// on an HTTP address of its own.
    pub fn roles(mut self, roles: &[Role]) -> Self {
        self.roles = roles.to_vec();
        self.addrs = free_addrs(roles);
        self
    }

    /// The roles this test runs.
    pub fn all(&self) -> &[Role] {
        &self.roles
    }

    /// Removes `key` from what is set for `role` only: its next start runs
    /// without it.
    pub fn unset_role_env(&mut self, role: Role, key: &str) {
        if let Some(vars) = self.role_env.get_mut(&role) {
            vars.retain(|(k, _)| *k != key);
        }
    }

    /// Removes the log directory when dropped, unless the test failed or the
    /// environment variable `var` is set.
    pub fn remove_logs_unless(mut self, var: &'static str) -> Self {
        self.keep_logs_var = Some(var);
        self
    }

    /// Runs `order-service migrate` on the database; panics with its log if
    /// it fails.
    pub fn migrate(&self) {
        roles::migrate(&self.db_url, &self.amqp, &self.log_dir, self.rust_log_var);
    }

    /// Starts `role` without waiting; returns the offset in its log where
    /// this run begins.
    pub fn spawn(&mut self, role: Role) -> u64 {
        assert!(
            !self.running.contains_key(&role),
            "{} already runs",
            role.name()
        );
        let offset = self.log(role).len() as u64;
        let log = role.log_file(&self.log_dir);
        let mut command = roles::command(
            role.args(),
            &self.db_url,
            &self.amqp,
            self.addrs[&role],
            &log,
            self.rust_log_var,
        );
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(vars) = self.role_env.get(&role) {
            command.envs(vars.iter().map(|(k, v)| (k, v)));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", role.name()));
        self.running.insert(role, child);
        offset
    }

    /// Starts every role without waiting.
    pub fn spawn_all(&mut self) {
        for role in self.roles.clone() {
            self.spawn(role);
        }
    }

    /// Starts every role and waits until each one logs that it runs.
    pub async fn start_all(&mut self) {
        let roles = self.roles.clone();
        let offsets: Vec<(Role, u64)> = roles.into_iter().map(|r| (r, self.spawn(r))).collect();
        for (role, offset) in offsets {
            self.wait_started(role, offset).await;
        }
    }

    /// Starts `role` again (after [`Processes::kill`] or
    /// [`Processes::terminate`]) and waits until it logs that it runs.
    pub async fn restart(&mut self, role: Role) {
        let offset = self.spawn(role);
        self.wait_started(role, offset).await;
    }

    /// Waits until the run of `role` that began at `offset` logs that it is
    /// up; fails at once if it exits instead.
    pub async fn wait_started(&mut self, role: Role, offset: u64) {
        let (started, _) = role.started_and_stopped();
        let deadline = Instant::now() + STARTUP;
        loop {
            if self.log_since(role, offset).contains(started) {
                return;
            }
            if let Some(status) = self.try_wait(role) {
                panic!(
                    "{} exited with {status} while starting:\n{}",
                    role.name(),
                    self.log_since(role, offset)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within {STARTUP:?}:\n{}",
                role.name(),
                self.log_since(role, offset)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status of `role` if it has exited, `None` while it runs.
    pub fn try_wait(&mut self, role: Role) -> Option<ExitStatus> {
        let child = self.running.get_mut(&role).expect("the role was started");
        child.try_wait().expect("waiting for a role")
    }

    /// SIGKILL: no chance to finish anything. Reaps it.
    pub fn kill(&mut self, role: Role) {
        let mut child = self.running.remove(&role).expect("the role runs");
        child.kill().expect("sending SIGKILL");
        let status = child.wait().expect("reaping the killed role");
        eprintln!("{} killed: {status}", role.name());
    }

    /// SIGTERM to every one of `roles` at once, then waits for each to exit.
    /// Returns each one's exit status and what it logged while stopping.
    pub async fn terminate(&mut self, roles: &[Role]) -> Vec<(Role, ExitStatus, String)> {
        let mut stopping = Vec::new();
        for &role in roles {
            let child = self.running.remove(&role).expect("the role runs");
            let offset = self.log(role).len() as u64;
            signal("-TERM", child.id()).expect("sending SIGTERM");
            stopping.push((role, offset, std::sync::Mutex::new(child)));
        }
        let mut stopped = Vec::new();
        for (role, offset, child) in stopping {
            let what = format!("{} to exit after SIGTERM", role.name());
            let status = eventually(&what, SHUTDOWN, || async {
                child.lock().unwrap().try_wait().expect("try_wait")
            })
            .await;
            stopped.push((role, status, self.log_since(role, offset)));
        }
        stopped
    }

    /// SIGSTOP: the process is frozen where it stands, its connections left
    /// open (unacked deliveries stay with it), until the returned guard is
    /// dropped, which sends SIGCONT, on success and on a panic alike.
    pub fn pause(&self, role: Role) -> Paused {
        let pid = self.running.get(&role).expect("the role runs").id();
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

    /// The HTTP address of `role` (its API, or its health, readiness and
    /// metrics probes).
    pub fn addr(&self, role: Role) -> SocketAddr {
        self.addrs[&role]
    }

    /// Every role's HTTP address.
    pub fn addrs(&self) -> &HashMap<Role, SocketAddr> {
        &self.addrs
    }

    /// Each running role's pid.
    pub fn pids(&self) -> Vec<(Role, u32)> {
        self.roles
            .iter()
            .filter_map(|&role| Some((role, self.running.get(&role)?.id())))
            .collect()
    }

    /// What `role` logged, across its restarts.
    pub fn log(&self, role: Role) -> String {
        self.log_since(role, 0)
    }

    /// What `role` logged from byte `offset` on.
    pub fn log_since(&self, role: Role, offset: u64) -> String {
        let text = std::fs::read(role.log_file(&self.log_dir)).unwrap_or_default();
        let start = (offset as usize).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// The roles that exited on their own (a crash), with their status.
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        for &role in &self.roles {
            if let Some(child) = self.running.get_mut(&role)
                && let Ok(Some(status)) = child.try_wait()
            {
                dead.push(format!("{} exited with {status}", role.name()));
            }
        }
        dead
    }

    /// The last warnings and errors of every role's log, for a failure
    /// message.
    pub fn diagnostics(&self) -> String {
        let mut out = format!("role logs in {}\n", self.log_dir.display());
        for &role in &self.roles {
            let log = self.log(role);
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(r#""level":"INFO""#))
                .collect();
            out.push_str(&format!("--- {} (last warnings and errors)\n", role.name()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Kills and reaps every running role (a suite's guard calls it first
    /// when it must clean up after the processes are gone).
    pub fn kill_all(&mut self) {
        for (_, mut child) in self.running.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.kill_all();
        let Some(var) = self.keep_logs_var else {
            return;
        };
        if std::thread::panicking() || std::env::var_os(var).is_some() {
            eprintln!("role logs kept in {}", self.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
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
            eprintln!("could not resume process {}: {error}", self.pid);
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

/// One address per role, each free a moment ago (outside the kernel's
/// ephemeral range, so no outgoing connection takes it meanwhile) and all
/// different.
fn free_addrs(wanted: &[Role]) -> HashMap<Role, SocketAddr> {
    let mut addrs = HashMap::new();
    while addrs.len() < wanted.len() {
        let addr = roles::free_addr();
        if !addrs.values().any(|taken| *taken == addr) {
            addrs.insert(wanted[addrs.len()], addr);
        }
    }
    addrs
}
