//! A Postgres cluster of the test's own: `initdb` in a temp dir owned by the
//! `postgres` user (initdb refuses root), on a free port of 127.0.0.1 only,
//! its unix socket in the temp dir, password logins by SCRAM, and TLS with
//! a server certificate of the test's CA (or no TLS at all). Stopped
//! (`-m immediate`) and removed when the fixture drops, even on a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::certs::{TempDir, TestCa};

const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The login of the service in every cluster, and its database.
pub const APP_USER: &str = "app";
pub const APP_DATABASE: &str = "orders";

/// Whether the cluster speaks TLS.
pub enum Tls<'a> {
    /// `ssl = on` with a certificate signed by this CA; only TLS
    /// connections may log in over TCP (`hostssl`).
    On(&'a TestCa),
    /// As `On`, and a login must also show a client certificate this CA
    /// signed for its user name (`clientcert=verify-full`).
    ClientCert(&'a TestCa),
    /// `ssl = off`: plaintext only.
    Off,
}

/// An initialised cluster, not yet started: [`Cluster::start`].
pub struct Cluster {
    dir: TempDir,
    pub port: u16,
    password: String,
    started: bool,
}

impl Cluster {
    /// Runs `initdb` and writes the configuration; the login [`APP_USER`]
    /// with `password` and its database [`APP_DATABASE`] are made at the
    /// first [`Cluster::start`].
    pub fn init(tls: Tls<'_>, password: &str) -> Self {
        let dir = TempDir::new("pg");
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path()));
        let data = dir.path().join("data");
        let cluster = Self {
            port: crate::common::roles::free_addr().port(),
            password: password.to_owned(),
            started: false,
            dir,
        };
        run(cluster
            .as_postgres(&format!("{BIN}/initdb"))
            .args([
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--username=postgres",
                "-D",
            ])
            .arg(&data));

        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nmax_connections = 60\n",
            cluster.port,
            cluster.dir.path().display(),
        );
        let hba = match tls {
            Tls::On(ca) => {
                conf.push_str(&server_tls(ca, &data));
                "hostssl all all 127.0.0.1/32 scram-sha-256"
            }
            Tls::ClientCert(ca) => {
                conf.push_str(&server_tls(ca, &data));
                conf.push_str("ssl_ca_file = 'ca.crt'\n");
                "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-full"
            }
            Tls::Off => {
                conf.push_str("ssl = off\n");
                "host all all 127.0.0.1/32 scram-sha-256"
            }
        };
        append(&data.join("postgresql.conf"), &conf);
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}\n"),
        )
        .expect("writing pg_hba.conf");
        cluster
    }

    /// Starts the server and waits until it accepts connections (`pg_ctl
    /// -w` polls; no fixed sleep), then makes the service's login and
    /// database if they are not there yet.
    pub fn start(&mut self) {
        let log = self.dir.path().join("server.log");
        let status = self
            .as_postgres(&format!("{BIN}/pg_ctl"))
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .output()
            .expect("running pg_ctl start");
        assert!(
            status.status.success(),
            "pg_ctl start failed:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.started = true;
        let exists = self.psql(&format!(
            "SELECT 1 FROM pg_roles WHERE rolname = '{APP_USER}'"
        ));
        if exists.trim().is_empty() {
            self.psql(&format!(
                "CREATE ROLE {APP_USER} LOGIN PASSWORD '{}'",
                self.password
            ));
            self.psql(&format!("CREATE DATABASE {APP_DATABASE} OWNER {APP_USER}"));
        }
    }

    /// Stops the server (it can be started again).
    pub fn stop(&mut self) {
        let status = self
            .as_postgres(&format!("{BIN}/pg_ctl"))
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(self.data())
            .output()
            .expect("running pg_ctl stop");
        assert!(status.status.success(), "pg_ctl stop failed: {status:?}");
        self.started = false;
    }

    /// `postgres://app:<password>@127.0.0.1:<port>/orders?<query>`.
    pub fn url(&self, password: &str, query: &str) -> String {
        format!(
            "postgres://{APP_USER}:{password}@127.0.0.1:{}/{APP_DATABASE}?{query}",
            self.port
        )
    }

    /// Runs `sql` as the superuser over the unix socket; its output
    /// (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let output = self
            .as_postgres("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-h",
            ])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .expect("running psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `program` run as the `postgres` user, in the cluster's folder.
    fn as_postgres(&self, program: &str) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--", program])
            .current_dir(self.dir.path());
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            let _ = self
                .as_postgres(&format!("{BIN}/pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(self.data())
                .output();
        }
        // The temp dir removes itself after this.
    }
}

/// Copies the server's certificate and key (signed by `ca`) and `ca`'s own
/// certificate into `data`, owned by `postgres`; the settings that use them.
fn server_tls(ca: &TestCa, data: &Path) -> String {
    let issued = ca.server("server");
    let files = [
        (issued.cert, "server.crt"),
        (issued.key, "server.key"),
        (ca.cert_file(), "ca.crt"),
    ];
    for (from, to) in files {
        std::fs::copy(from, data.join(to)).expect("copying the server's TLS files");
        run(Command::new("chown")
            .arg("postgres:postgres")
            .arg(data.join(to)));
    }
    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".to_owned()
}

fn run(command: &mut Command) {
    let output = command.output().expect("running a setup command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("appending to postgresql.conf");
}
