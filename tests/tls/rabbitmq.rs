//! RabbitMQ over `amqps://`, against nodes of the test's own with a TLS
//! listener (`common/rabbit_node.rs`; certificates from [`TestCa`]), and the
//! clear stop of the real binary on each permanent misconfiguration.
//!
//! The nodes need root (they run as the `rabbitmq` user); the clear-stop
//! and `dlq` tests only need the machine's broker, or none.

#[path = "rabbitmq/dlq.rs"]
mod dlq;
#[path = "rabbitmq/fixture.rs"]
mod fixture;

use std::time::Duration;

use crate::certs::{TempDir, TestCa};
use crate::common::roles::free_addr;
use crate::common::{DropDatabase, create_database, eventually};
use fixture::{Proc, TlsNode, assert_stops, connect};

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_slow_to_start_is_waited_for_then_orders_flow_over_amqps() {
    let ca = TestCa::new("amqps");
    let mut node = TlsNode::new("ostls", &ca, false);
    let (db_name, db_url) = create_database().await;
    let _db = DropDatabase(db_name);
    let logs = TempDir::new("amqps-run");
    let url = node.url(&format!("cacertfile={}", ca.cert_file().display()));
    let addr = free_addr().to_string();
    let env = [
        ("DATABASE_URL", db_url.as_str()),
        ("AMQP_URL", url.as_str()),
        ("HTTP_ADDR", addr.as_str()),
    ];
    let log = logs.path().join("run.log");
    let mut run = Proc::spawn(&["run"], &env, &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The node is not up: the process waits (warning), it does not stop.
    eventually(
        "run to wait for RabbitMQ",
        Duration::from_secs(20),
        || async { read_log().contains("RabbitMQ not reachable").then_some(()) },
    )
    .await;
    assert!(run.0.try_wait().unwrap().is_none(), "{}", read_log());
    node.start();

    let client = reqwest::Client::new();
    let ready = format!("http://{addr}/readyz");
    eventually("run to be ready", Duration::from_secs(60), || async {
        let status = client.get(&ready).send().await.ok()?.status();
        status.is_success().then_some(())
    })
    .await;
    let order: serde_json::Value = client
        .post(format!("http://{addr}/orders"))
        .json(&serde_json::json!({"productId": "p-1", "userId": "user_tls", "amount": 700}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id: uuid::Uuid = order["orderId"].as_str().unwrap().parse().unwrap();

    let db = sqlx::PgPool::connect(&db_url).await.unwrap();
    let check = "SELECT o.status = 'CONFIRMED' AND (SELECT count(*) FROM notifications n \
                 WHERE n.order_id = o.id) = 2 FROM orders o WHERE o.id = $1";
    eventually(
        "the order to be confirmed and notified twice",
        Duration::from_secs(30),
        || async {
            let done: bool = sqlx::query_scalar(check)
                .bind(id)
                .fetch_one(&db)
                .await
                .ok()?;
            done.then_some(())
        },
    )
    .await;
    db.close().await;
    // The roles' connections (publisher, two consumers) are all TLS.
    let connections = node.connections();
    assert!(connections.len() >= 3, "{connections:?}");
    assert!(
        connections.iter().all(|c| c.starts_with("true\ttlsv1.")),
        "{connections:?}"
    );
    assert!(run.0.try_wait().unwrap().is_none(), "{}", read_log());
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_are_checked_both_ways() {
    let ca = TestCa::new("amqpsmtls");
    let other = TestCa::new("amqpsother");
    let client = ca.client("client", "guest");
    let mut node = TlsNode::new("ostlsmtls", &ca, true);
    node.start();
    let (ca_file, other_file) = (ca.cert_file(), other.cert_file());
    let identity = format!(
        "certfile={}&keyfile={}",
        client.cert.display(),
        client.key.display()
    );
    let with = |query: String| node.url(&format!("{query}&{identity}"));

    // A client certificate the node's CA signed: connected.
    let trusted = with(format!("cacertfile={}", ca_file.display()));
    connect(&trusted)
        .await
        .expect("connecting with a client certificate");
    // None: refused by the node, the message saying what to set.
    let anonymous = node.url(&format!("cacertfile={}", ca_file.display()));
    let error = connect(&anonymous).await.unwrap_err().to_string();
    // RabbitMQ 3.10 (OTP 25) sends the alert certificate_required after a
    // TLS 1.3 handshake (handshake_failure in 1.2) and closes: a client
    // already writing may see only the reset. Either way, this message.
    assert!(
        error.contains("client certificate: set certfile and keyfile"),
        "{error}"
    );
    // A server certificate the configured CA did not sign: refused.
    let untrusted = with(format!("cacertfile={}", other_file.display()));
    let error = connect(&untrusted).await.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
    // Without cacertfile the system's roots are trusted, and they do not
    // know the test's CA either.
    let error = connect(&with(String::new())).await.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
    // Unless verification is turned off, and only then.
    connect(&with(format!(
        "cacertfile={}&verify=verify_none",
        other_file.display()
    )))
    .await
    .expect("verify_none accepts any server certificate");
    // The name verified is server_name_indication's, when given.
    let misnamed = with(format!(
        "cacertfile={}&server_name_indication=other.example.com",
        ca_file.display()
    ));
    let error = connect(&misnamed).await.unwrap_err().to_string();
    assert!(
        error.contains(r#"not valid for name "other.example.com""#),
        "{error}"
    );

    // The real binary stops at once on the untrusted certificate, and on
    // the missing client certificate (alert, or the same close on a few
    // attempts in a row).
    let (db_name, db_url) = create_database().await;
    let _db = DropDatabase(db_name);
    let logs = TempDir::new("amqps-untrusted");
    for (url, cause) in [
        (&untrusted, "UnknownIssuer"),
        (&anonymous, "client certificate: set certfile and keyfile"),
    ] {
        tokio::task::block_in_place(|| {
            assert_stops(&["relay"], &db_url, url, cause, ":guest@", logs.path())
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_permanent_rabbitmq_misconfiguration_stops_a_role_at_once_with_one_line() {
    let (db_name, db_url) = create_database().await;
    let _db = DropDatabase(db_name);
    let dir = TempDir::new("amqp-stop");
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    // Each role that needs RabbitMQ makes the check: relay, consume, run.
    let (relay, billing, run): (&[&str], &[&str], &[&str]) =
        (&["relay"], &["consume", "billing"], &["run"]);
    let vhost = format!("no_such_vhost_{}", std::process::id());
    let cases = [
        (
            relay,
            "amqp://guest:s3cret-pw@127.0.0.1:5672/%2f".to_owned(),
            "ACCESS_REFUSED",
            "s3cret-pw",
        ),
        (
            billing,
            format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
            "vhost no_such_vhost",
            ":guest@",
        ),
        (
            run,
            "amqps://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            "no TLS on this port",
            ":guest@",
        ),
        (
            relay,
            "amqps://guest:guest@127.0.0.1:5671/%2f?cacertfile=/nonexistent/ca.pem".to_owned(),
            "cacertfile /nonexistent/ca.pem: No such file",
            ":guest@",
        ),
        (
            billing,
            format!(
                "amqps://guest:guest@127.0.0.1:5671/%2f?cacertfile={}",
                not_pem.display()
            ),
            "no PEM certificate",
            ":guest@",
        ),
        (
            run,
            "amqp://guest:guest@127.0.0.1:5672/%2f?verify=verify_none".to_owned(),
            "TLS parameters on an amqp:// URL (verify)",
            ":guest@",
        ),
    ];
    for (role, url, cause, password) in &cases {
        tokio::task::block_in_place(|| {
            assert_stops(role, &db_url, url, cause, password, dir.path())
        });
    }
}
