//! The clear stop at start: a misconfigured `DATABASE_URL` ends the process
//! within seconds with one line naming it and the cause (never the
//! password); a Postgres only not up yet is waited for; the operator's
//! commands give up within seconds and stop on SIGTERM.

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;

use super::PASSWORD;
use super::cluster::{self, Cluster, Tls};
use super::process::{Process, install_crypto_provider, one_error_line};
use crate::certs::TestCa;
use crate::common::{self, eventually, roles};

#[tokio::test]
async fn each_permanent_misconfiguration_stops_the_start_with_one_line_naming_database_url() {
    let ca = TestCa::new("pgca");
    let other = TestCa::new("pgother");
    let client = ca.client("client", cluster::APP_USER);
    let mut tls = Cluster::init(Tls::On(&ca), PASSWORD);
    tls.start();
    let mut plain = Cluster::init(Tls::Off, PASSWORD);
    plain.start();
    let trusting = |ca: &TestCa| {
        format!(
            "sslmode=verify-full&sslrootcert={}",
            ca.cert_file().display()
        )
    };
    let missing = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:5432/ostest_missing_{}",
        uuid::Uuid::new_v4().simple()
    );
    let cases = [
        (
            "a database that does not exist",
            missing,
            "does not exist (SQLSTATE 3D000)".to_owned(),
        ),
        (
            "a refused password",
            tls.url("wrong-pass-word", &trusting(&ca)),
            r#"password authentication failed for user "app" (SQLSTATE 28P01)"#.to_owned(),
        ),
        (
            "sslmode=require against a server without TLS",
            plain.url(PASSWORD, "sslmode=require"),
            "TLS (sslmode=require): server does not support TLS".to_owned(),
        ),
        (
            "a plaintext login where the server takes only TLS",
            tls.url(PASSWORD, "sslmode=disable"),
            "no encryption (SQLSTATE 28000)".to_owned(),
        ),
        (
            "a certificate the sslrootcert CA did not sign (verify-full)",
            tls.url(PASSWORD, &trusting(&other)),
            "invalid peer certificate: UnknownIssuer".to_owned(),
        ),
        (
            "a certificate the sslrootcert CA did not sign (require, verified as libpq does)",
            tls.url(
                PASSWORD,
                &format!(
                    "sslmode=require&sslrootcert={}",
                    other.cert_file().display()
                ),
            ),
            "(sslmode=require with sslrootcert, verified as verify-full): \
             invalid peer certificate: UnknownIssuer"
                .to_owned(),
        ),
        (
            "sslmode=verify-ca, which would accept any public certificate",
            tls.url(
                PASSWORD,
                &format!("sslmode=verify-ca&sslrootcert={}", ca.cert_file().display()),
            ),
            "sslmode=verify-ca is not supported by this build: its root store also holds the \
             system's roots, so without the host-name check any public certificate would pass; \
             use verify-full"
                .to_owned(),
        ),
        (
            "an unreadable sslrootcert",
            tls.url(
                PASSWORD,
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            ),
            "sslrootcert /nonexistent/ca.pem cannot be read".to_owned(),
        ),
        (
            "an unreadable sslkey",
            tls.url(
                PASSWORD,
                &format!(
                    "{}&sslcert={}&sslkey=/nonexistent/client.key",
                    trusting(&ca),
                    client.cert.display()
                ),
            ),
            "sslkey /nonexistent/client.key cannot be read".to_owned(),
        ),
    ];
    for (case, url, cause) in cases {
        // The api waits without end for a Postgres that is only down, so an
        // exit at all shows the failure was taken as permanent.
        let api = Process::start(&["api"], &url, roles::free_addr(), &common::test_amqp());
        let (status, output) = api.exit_within(Duration::from_secs(10)).await;
        assert!(!status.success(), "{case}: exits non-zero\n{output}");
        let line = one_error_line(&output, case);
        assert!(
            line.starts_with("error: DATABASE_URL (postgres://"),
            "{case}: {line}"
        );
        assert!(line.contains(&cause), "{case}: {line:?} names {cause:?}");
        for secret in [PASSWORD, "wrong-pass-word"] {
            assert!(
                !output.contains(secret),
                "{case}: a password was printed\n{output}"
            );
        }
    }
}

#[tokio::test]
async fn a_postgres_that_is_not_up_yet_is_waited_for() {
    let ca = TestCa::new("pgwait");
    let mut cluster = Cluster::init(Tls::On(&ca), PASSWORD);
    // Started once to make the login and database, so that the api meets
    // only "connection refused" and "starting up" while it waits.
    cluster.start();
    cluster.stop();
    let query = format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.cert_file().display()
    );
    let addr = roles::free_addr();
    let mut api = Process::start(
        &["api"],
        &cluster.url(PASSWORD, &query),
        addr,
        &common::test_amqp(),
    );

    eventually(
        "the api to report Postgres unreachable",
        Duration::from_secs(30),
        || async {
            api.output()
                .contains("Postgres not reachable")
                .then_some(())
        },
    )
    .await;
    assert!(
        api.child.try_wait().unwrap().is_none(),
        "the api waits:\n{}",
        api.output()
    );

    cluster.start();
    install_crypto_provider();
    eventually("the api to be ready", Duration::from_secs(60), || async {
        let response = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (response.status() == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test]
async fn operator_commands_give_up_within_seconds_on_an_unreachable_postgres() {
    let url = unreachable_url();
    let migrate = Process::start(&["migrate"], &url, roles::free_addr(), &common::test_amqp());
    let status_cmd = Process::start(
        &["outbox", "status"],
        &url,
        roles::free_addr(),
        &common::test_amqp(),
    );
    let patience = order_service::db::COMMAND_PATIENCE;
    for (command, process) in [("migrate", migrate), ("outbox status", status_cmd)] {
        // Patience and a margin for a loaded machine: what matters is that
        // they end on their own, with the reason.
        let (status, output) = process
            .exit_within(patience + Duration::from_secs(30))
            .await;
        assert!(!status.success(), "{command} exits non-zero\n{output}");
        let line = one_error_line(&output, command);
        assert!(
            line.starts_with("error: DATABASE_URL (postgres://app:***@127.0.0.1:"),
            "{line}"
        );
        let gave_up = format!("Postgres not reachable within {}s", patience.as_secs());
        assert!(line.contains(&gave_up), "{line}");
        assert!(line.contains("Connection refused"), "{line}");
        assert!(!output.contains(PASSWORD), "{output}");
    }
}

/// A role waits for Postgres without end, so only the signal can end it
/// (an operator's command gives up by itself, which would race the signal;
/// `migrate` on SIGTERM is in [`super::migrate`]).
#[tokio::test]
async fn a_start_waiting_for_postgres_stops_on_sigterm() {
    let url = unreachable_url();
    let api = Process::start(&["api"], &url, roles::free_addr(), &common::test_amqp());
    eventually(
        "the api to report Postgres unreachable",
        Duration::from_secs(30),
        || async {
            api.output()
                .contains("Postgres not reachable")
                .then_some(())
        },
    )
    .await;
    let pid = api.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let (status, output) = api.exit_within(Duration::from_secs(15)).await;
    assert!(!status.success(), "{output}");
    let line = one_error_line(&output, "api on SIGTERM");
    assert_eq!(
        line,
        "error: DATABASE_URL (postgres://app:***@127.0.0.1:1/orders): \
         stopped while waiting for Postgres"
    );
}

/// A URL whose port refuses every connection. Port 1 (tcpmux), not a free
/// ephemeral port: no cluster of another test can take it meanwhile, and no
/// outgoing socket can have it as its own port (which would connect the
/// client to itself).
fn unreachable_url() -> String {
    let refused = std::net::TcpStream::connect("127.0.0.1:1").map_err(|e| e.kind());
    assert_eq!(
        refused.err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "nothing may listen on 127.0.0.1:1 for this test"
    );
    format!("postgres://app:{PASSWORD}@127.0.0.1:1/orders")
}
