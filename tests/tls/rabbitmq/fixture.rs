//! The TLS node, the binary run as a process, and the checks the
//! RabbitMQ TLS tests share.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use order_service::config::AmqpConfig;
use tokio_util::sync::CancellationToken;

use crate::certs::TestCa;
use crate::common::free_port;
use crate::common::rabbit_ctl::ctl;
use crate::common::rabbit_node::{CTL_TIMEOUT, OwnNode};

/// How soon a misconfigured process must have exited.
pub const STOP_WITHIN: Duration = Duration::from_secs(10);

/// A node of the test's own with a plain listener (its boot signal) and a
/// TLS one, its server certificate signed by `ca`.
pub struct TlsNode {
    own: OwnNode,
    tls_port: u16,
    config: String,
}

impl TlsNode {
    /// Made but not started. With `client_certs`, the node wants a client
    /// certificate its CA signed (`verify_peer`, `fail_if_no_peer_cert`).
    pub fn new(prefix: &str, ca: &TestCa, client_certs: bool) -> Self {
        let own = OwnNode::new(prefix).unwrap_or_else(|e| panic!("{e}"));
        let server = ca.server("server");
        let (ca_file, cert, key) = (
            own.install(&ca.cert_file()),
            own.install(&server.cert),
            own.install(&server.key),
        );
        let tls_port = free_port();
        let verify = if client_certs {
            "verify_peer"
        } else {
            "verify_none"
        };
        let config = format!(
            "listeners.tcp.default = 127.0.0.1:{}\nlisteners.ssl.default = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
             ssl_options.verify = {verify}\nssl_options.fail_if_no_peer_cert = {client_certs}\n",
            own.node.amqp_port,
            ca_file.display(),
            cert.display(),
            key.display()
        );
        Self {
            own,
            tls_port,
            config,
        }
    }

    pub fn start(&mut self) {
        let config = self.config.clone();
        tokio::task::block_in_place(|| self.own.start(&config)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `ssl` and `ssl_protocol` of each client connection, as
    /// `rabbitmqctl list_connections` prints them (`true\ttlsv1.3`).
    pub fn connections(&self) -> Vec<String> {
        let args = [
            "-q",
            "--no-table-headers",
            "list_connections",
            "ssl",
            "ssl_protocol",
        ];
        let out = ctl(&self.own.node.name, &args, CTL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        out.lines().map(str::to_owned).collect()
    }

    /// `amqps://` to the TLS listener, guest over loopback, with `query`.
    pub fn url(&self, query: &str) -> String {
        format!(
            "amqps://guest:guest@127.0.0.1:{}/%2f?{query}",
            self.tls_port
        )
    }
}

/// `order-service <args>` with `env`, logging to `log`; killed on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(args: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        Proc(
            binary(args, env, log)
                .spawn()
                .expect("starting order-service"),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary(args: &[&str], env: &[(&str, &str)], log: &Path) -> Command {
    let out = std::fs::File::create(log).expect("a log file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_order-service"));
    command
        .args(args)
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env("RELAY_POLL_INTERVAL_MS", "200")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("SMTP_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("a file handle"))
        .stderr(out);
    command
}

/// Runs the binary until it exits (at most 30 s); its status, how long it
/// ran, and its output.
pub fn run_to_exit(
    args: &[&str],
    env: &[(&str, &str)],
    dir: &Path,
) -> (ExitStatus, Duration, String) {
    let log = dir.join(format!("{}.log", uuid::Uuid::new_v4().simple()));
    let started = Instant::now();
    let mut proc = Proc::spawn(args, env, &log);
    let status = loop {
        if let Some(status) = proc.0.try_wait().expect("waiting for order-service") {
            break status;
        }
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    (status, started.elapsed(), output)
}

/// Asserts that `order-service <args>` with `AMQP_URL=url` stops within
/// [`STOP_WITHIN`], non-zero, with one line naming AMQP_URL and `cause`,
/// and no password.
pub fn assert_stops(
    args: &[&str],
    db_url: &str,
    url: &str,
    cause: &str,
    password: &str,
    dir: &Path,
) {
    let env = [("DATABASE_URL", db_url), ("AMQP_URL", url)];
    let (status, took, output) = run_to_exit(args, &env, dir);
    let lines: Vec<&str> = output.lines().filter(|l| l.contains("AMQP_URL")).collect();
    assert!(!status.success(), "{url}: exited with {status}:\n{output}");
    assert!(took < STOP_WITHIN, "{url}: took {took:?}:\n{output}");
    assert_eq!(lines.len(), 1, "{url}: one line names AMQP_URL:\n{output}");
    assert!(
        lines[0].starts_with("error: AMQP_URL: "),
        "{url}:\n{output}"
    );
    assert!(
        lines[0].contains(cause),
        "{url}: no {cause:?} in:\n{output}"
    );
    assert!(
        !output.contains(password),
        "{url}: the password is printed:\n{output}"
    );
}

/// Connects once with `url` as `AMQP_URL`, as the operator's tools do, and
/// closes the connection.
pub async fn connect(url: &str) -> anyhow::Result<()> {
    let config = AmqpConfig::new(url);
    let connection =
        outbox_common::amqp::connect_once(&config, "tls test", &CancellationToken::new()).await?;
    let _ = connection.close(200, "test done".into()).await;
    Ok(())
}
