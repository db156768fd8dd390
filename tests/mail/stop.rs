//! The e-mail consumer's start: `order-service consume email` checks the
//! mailer's settings, then probes the SMTP server once, before it connects
//! to Postgres or RabbitMQ:
//!
//! - a bad setting (an unreadable CA file, credentials without TLS), or a
//!   server that refuses the settings for good (an untrusted certificate,
//!   no STARTTLS under `tls=required`, a refused password), stops it within
//!   seconds, non-zero, with one `error:` line naming `SMTP_URL` (or
//!   `SMTP_CA_FILE`) and the cause, never the password; the server gets no
//!   AUTH in the clear and no MAIL;
//! - a server only down does not stop it: it runs, and the mails wait.
//!
//! The stop cases point `DATABASE_URL` at a port where nothing listens: the
//! role stops before it connects to anything.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::certs::{TempDir, TestCa};
use crate::common::processes::Processes;
use crate::common::{self, DeleteQueues, DropDatabase, create_database};
use crate::smtp::{Behaviour, Event, SmtpServer, free_port, read_events};
use crate::stack::Role;
use crate::tls::{PASSWORD, USER, tls_server};

/// Where nothing listens: a role that got that far would wait for ever.
const NO_DATABASE: &str = "postgres://postgres@127.0.0.1:1/none";

/// `order-service consume email` started with a bad mailer setting: exits
/// non-zero within seconds, its one `error:` line naming the setting, and
/// the password nowhere in its output.
#[tokio::test]
async fn a_bad_mailer_setting_stops_the_email_consumer_at_start_with_one_line_naming_it() {
    let dir = TempDir::new("smtp_bad_setting");
    let missing = dir.path().join("missing-ca.pem");
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").expect("writing a file");
    let smtps = format!("smtps://{USER}:{PASSWORD}@127.0.0.1:465");
    let with_ca = |path: &Path| {
        vec![
            ("SMTP_URL", smtps.clone()),
            ("SMTP_CA_FILE", path.display().to_string()),
        ]
    };
    let cases = [
        (
            "a missing CA file",
            with_ca(&missing),
            format!("error: SMTP_CA_FILE {}: No such file", missing.display()),
        ),
        (
            "a CA file without a certificate",
            with_ca(&not_pem),
            format!(
                "error: SMTP_CA_FILE {}: no PEM certificate",
                not_pem.display()
            ),
        ),
        (
            "credentials without TLS",
            vec![(
                "SMTP_URL",
                format!("smtp://{USER}:{PASSWORD}@127.0.0.1:587"),
            )],
            "error: SMTP_URL: credentials need TLS".to_owned(),
        ),
        (
            "credentials with tls=opportunistic",
            vec![(
                "SMTP_URL",
                format!("smtp://{USER}:{PASSWORD}@127.0.0.1:587?tls=opportunistic"),
            )],
            "error: SMTP_URL: credentials with tls=opportunistic".to_owned(),
        ),
    ];
    for (i, (case, env, expected)) in cases.into_iter().enumerate() {
        let log_dir = dir.path().join(format!("case-{i}"));
        stops_with_one_line(case, env, &log_dir, &expected, "");
    }
}

/// A server whose certificate no trusted CA signed (`SMTP_CA_FILE` unset).
#[tokio::test]
async fn an_untrusted_smtp_certificate_stops_the_email_consumer_at_start() {
    let ca = TestCa::new("smtp_stop_untrusted");
    let events = stops_on_the_server(
        "an untrusted certificate",
        tls_server(&ca, false),
        |port| vec![("SMTP_URL", required(PASSWORD, port))],
        "TLS handshake failed: invalid peer certificate",
    );
    let sent: Vec<&Event> = events.iter().filter(|e| e.event != "ehlo").collect();
    assert!(sent.is_empty(), "the server got AUTH or MAIL: {sent:#?}");
}

/// `tls=required` to a plain server that offers AUTH in the clear.
#[tokio::test]
async fn no_starttls_under_tls_required_stops_the_email_consumer_at_start() {
    let ca = TestCa::new("smtp_stop_no_starttls");
    let behaviour = Behaviour {
        auth: Some((USER.into(), PASSWORD.into())),
        auth_without_tls: true,
        ..Behaviour::default()
    };
    let events = stops_on_the_server(
        "no STARTTLS",
        behaviour,
        |port| trusted(&ca, required(PASSWORD, port)),
        "STARTTLS is not supported",
    );
    let sent: Vec<&Event> = events.iter().filter(|e| e.event != "ehlo").collect();
    assert!(
        sent.is_empty(),
        "the server got AUTH or MAIL without TLS: {sent:#?}"
    );
}

/// A password the server refuses (535), over TLS.
#[tokio::test]
async fn a_refused_smtp_password_stops_the_email_consumer_at_start() {
    let ca = TestCa::new("smtp_stop_refused");
    let wrong = "wrong-pw-d41d8c";
    let events = stops_on_the_server(
        "a refused password",
        tls_server(&ca, false),
        |port| trusted(&ca, required(wrong, port)),
        "the server refused the login: 535",
    );
    let auths: Vec<&Event> = events.iter().filter(|e| e.event == "auth").collect();
    assert!(
        auths.len() == 1
            && auths[0].tls
            && auths[0].accepted == Some(false)
            && auths[0].login.as_deref() == Some(USER),
        "one login, over TLS, refused: {events:#?}"
    );
    assert!(
        events.iter().all(|e| e.event != "mail_command"),
        "MAIL without a login: {events:#?}"
    );
}

/// With nothing listening on the SMTP port, the e-mail consumer starts,
/// answers `/healthz` and keeps running: the mails wait in `mail_outbox`.
#[tokio::test]
async fn with_the_smtp_server_down_the_email_consumer_starts_and_keeps_running() {
    let ca = TestCa::new("smtp_down_at_start");
    let (db_name, db_url) = create_database().await;
    let _db = DropDatabase(db_name);
    let amqp = common::test_amqp();
    let _queues = DeleteQueues::orders(&amqp);
    let dir = TempDir::new("smtp_down_at_start");
    let env = trusted(&ca, required(PASSWORD, free_port()));
    let mut processes =
        Processes::new(&db_url, &amqp, dir.path(), RUST_LOG_VAR).role_env(Role::Email, env);
    processes.migrate();
    processes.spawn(Role::Email);
    let addr = processes.addr(Role::Email);
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Some(status) = processes.try_wait(Role::Email) {
            panic!(
                "consume email exited with {status}:\n{}",
                processes.log(Role::Email)
            );
        }
        let healthz = client.get(format!("http://{addr}/healthz")).send().await;
        if healthz.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no /healthz 200 after {:?}:\n{}",
            started.elapsed(),
            processes.log(Role::Email)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = processes.log(Role::Email);
    assert!(
        output.contains("SMTP server not reachable at start; mails wait"),
        "the warning:\n{output}"
    );
    assert!(!output.contains(PASSWORD), "the password shows:\n{output}");
    assert!(
        processes.try_wait(Role::Email).is_none(),
        "consume email stopped:\n{output}"
    );
}

/// `smtp://user:<password>@127.0.0.1:<port>?tls=required`.
fn required(password: &str, port: u16) -> String {
    format!("smtp://{USER}:{password}@127.0.0.1:{port}?tls=required")
}

/// `SMTP_URL`, with `ca` trusted.
fn trusted(ca: &TestCa, url: String) -> Vec<(&'static str, String)> {
    vec![
        ("SMTP_URL", url),
        ("SMTP_CA_FILE", ca.cert_file().display().to_string()),
    ]
}

/// Starts a server with `behaviour`, then `consume email` with the env of
/// `env(port)`; checks it stops with one line starting `error: SMTP_URL:`
/// and containing `cause`. Returns what the server recorded.
fn stops_on_the_server(
    case: &str,
    behaviour: Behaviour,
    env: impl FnOnce(u16) -> Vec<(&'static str, String)>,
    cause: &str,
) -> Vec<Event> {
    let dir = TempDir::new("smtp_stop");
    let mailbox = dir.path().join("mailbox.jsonl");
    let port = free_port();
    let _server = SmtpServer::start(port, &mailbox, &behaviour);
    let log_dir = dir.path().join("logs");
    stops_with_one_line(case, env(port), &log_dir, "error: SMTP_URL: ", cause);
    read_events(&mailbox)
}

/// Runs `consume email` with `env` until it exits: non-zero, its one
/// `error:` line starting with `expected` and containing `cause`, the
/// password nowhere. It logs to `<log_dir>/email-consumer.log`.
fn stops_with_one_line(
    case: &str,
    env: Vec<(&'static str, String)>,
    log_dir: &Path,
    expected: &str,
    cause: &str,
) {
    let (status, took, output) = run_until_exit(case, NO_DATABASE, env, log_dir);
    let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    eprintln!("{case}: {status} after {took:?}: {errors:?}");
    assert!(!output.contains(PASSWORD), "{case}: the password shows");
    assert!(!status.success(), "{case}: exited with {status}\n{output}");
    assert!(
        errors.len() == 1 && errors[0].starts_with(expected) && errors[0].contains(cause),
        "{case}: one line starting {expected:?} with {cause:?}, got {errors:?}\n{output}"
    );
}

/// The level `consume email` logs at, unless `info`.
const RUST_LOG_VAR: &str = "MAIL_TEST_RUST_LOG";

/// How long the e-mail consumer may take to stop on a bad setting.
const STOP: Duration = Duration::from_secs(10);

/// Runs `order-service consume email` with `env` against `db_url` until it
/// exits (killed after [`STOP`], failing the test for `case`); returns its
/// status, how long it ran and what it logged.
fn run_until_exit(
    case: &str,
    db_url: &str,
    env: Vec<(&'static str, String)>,
    log_dir: &Path,
) -> (ExitStatus, Duration, String) {
    let amqp = common::test_amqp();
    let mut processes =
        Processes::new(db_url, &amqp, log_dir, RUST_LOG_VAR).role_env(Role::Email, env);
    let started = Instant::now();
    processes.spawn(Role::Email);
    loop {
        if let Some(status) = processes.try_wait(Role::Email) {
            return (status, started.elapsed(), processes.log(Role::Email));
        }
        assert!(
            started.elapsed() < STOP,
            "{case}: consume email still runs after {STOP:?}:\n{}",
            processes.log(Role::Email)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
