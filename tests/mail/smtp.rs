//! A real SMTP server of the test's own: `tests/smtp/server.py` (aiosmtpd),
//! which appends each message it accepts to a mailbox file as one JSON line,
//! and what clients did (EHLO, AUTH, MAIL) to an events file beside it; with
//! STARTTLS or implicit TLS and a login it requires, if asked. Killed when
//! dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

/// How long the server may take to print "ready".
const STARTUP: Duration = Duration::from_secs(30);

pub use crate::ports::free_port;

/// What the server does besides accepting.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Recipients containing this are refused with 550.
    pub reject: Option<String>,
    /// Sleep in DATA before accepting.
    pub delay_ms: u64,
    /// TLS, with this certificate; plain SMTP if `None`.
    pub tls: Option<ServerTls>,
    /// The one login (user, password) accepted, and required before MAIL.
    pub auth: Option<(String, String)>,
    /// Offer AUTH in the clear too (by default only over TLS).
    pub auth_without_tls: bool,
}

/// How the server speaks TLS.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// TLS from the first byte (SMTPS); otherwise STARTTLS, required.
    pub implicit: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One thing a client did, as the server recorded it (never a password).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Event {
    /// `ehlo`, `auth_command` (any AUTH command), `auth` (a login checked),
    /// `mail_command` (any MAIL command).
    pub event: String,
    /// Whether the connection was encrypted at that point.
    pub tls: bool,
    /// For `auth`: the login, and whether it was accepted.
    #[serde(default)]
    pub login: Option<String>,
    #[serde(default)]
    pub accepted: Option<bool>,
}

/// One accepted message, as the server recorded it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Mail {
    pub message_id: String,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub body: String,
    pub received_at: f64,
    /// Whether it came over an encrypted connection.
    pub tls: bool,
    /// The login the client authenticated as, if any.
    pub login: Option<String>,
}

pub struct SmtpServer {
    child: Child,
}

impl SmtpServer {
    /// Starts the server on `port`, appending to `mailbox` and its events
    /// to [`events_file`]; returns once it listens. Its stderr goes to
    /// `<mailbox>.log`.
    pub fn start(port: u16, mailbox: &Path, behaviour: &Behaviour) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smtp/server.py");
        let log = std::fs::File::create(mailbox.with_extension("log")).expect("a server log");
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let mut command = Command::new(python);
        command
            .arg(script)
            .arg(port.to_string())
            .arg(mailbox)
            .arg("--delay-ms")
            .arg(behaviour.delay_ms.to_string())
            .arg("--events")
            .arg(events_file(mailbox))
            .arg("--connections")
            .arg(mailbox.with_extension("connections"));
        if let Some(reject) = &behaviour.reject {
            command.arg("--reject").arg(reject);
        }
        if let Some(tls) = &behaviour.tls {
            command
                .arg(if tls.implicit {
                    "--implicit-tls"
                } else {
                    "--starttls"
                })
                .arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        if let Some((user, password)) = &behaviour.auth {
            command.arg("--auth").arg(format!("{user}:{password}"));
        }
        if behaviour.auth_without_tls {
            command.arg("--auth-without-tls");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting tests/smtp/server.py (python3 -m pip install aiosmtpd)");
        let stdout = child.stdout.take().expect("a piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        let mut server = Self { child };
        if rx.recv_timeout(STARTUP).is_err() {
            let status = server.child.try_wait().ok().flatten();
            panic!(
                "the SMTP server on port {port} did not get ready within {STARTUP:?} (exit: {status:?}):\n{}",
                std::fs::read_to_string(mailbox.with_extension("log")).unwrap_or_default()
            );
        }
        server
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete lines of a mailbox file (none if there is no file yet).
pub fn read_mailbox(path: &Path) -> Vec<Mail> {
    read_lines(path)
}

/// The file the server beside `mailbox` records its clients' doings in.
pub fn events_file(mailbox: &Path) -> PathBuf {
    mailbox.with_extension("events.jsonl")
}

/// What clients did so far, as the server of `mailbox` recorded it.
pub fn read_events(mailbox: &Path) -> Vec<Event> {
    read_lines(&events_file(mailbox))
}

/// How many client connections the server of `mailbox` has open: once
/// none, no session is left that could still write a message.
pub fn open_connections(mailbox: &Path) -> usize {
    let text = std::fs::read_to_string(mailbox.with_extension("connections")).unwrap_or_default();
    let count = |what: &str| text.lines().filter(|l| *l == what).count();
    count("open").saturating_sub(count("closed"))
}

/// The complete JSON lines of a file (none if there is no file yet).
fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Vec<T> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line is written and flushed whole; only a line without its newline
    // yet could be partial.
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}
