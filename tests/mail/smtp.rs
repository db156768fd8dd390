//! A real SMTP server of the test's own: `tests/smtp/server.py` (aiosmtpd),
//! which appends each message it accepts to a mailbox file as one JSON line.
//! Killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

/// How long the server may take to print "ready".
const STARTUP: Duration = Duration::from_secs(30);

/// A free port on 127.0.0.1 (bound, then released for the caller to use).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener.local_addr().expect("a local address").port()
}

/// What the server does besides accepting.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Recipients containing this are refused with 550.
    pub reject: Option<String>,
    /// Sleep in DATA before accepting.
    pub delay_ms: u64,
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
}

pub struct SmtpServer {
    child: Child,
}

impl SmtpServer {
    /// Starts the server on `port`, appending to `mailbox`; returns once it
    /// listens. Its stderr goes to `<mailbox>.log`.
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
            .arg(behaviour.delay_ms.to_string());
        if let Some(reject) = &behaviour.reject {
            command.arg("--reject").arg(reject);
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
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad mailbox line {l:?}: {e}")))
        .collect()
}
