//! Postgres over TLS with libpq's `sslmode`: the real binary against the
//! machine's Postgres (`ssl = on`) and against clusters of the test's own
//! ([`cluster`]) with certificates of a test CA; the clear stop at start
//! ([`stop`]); and `migrate` stopped while it waits for another's
//! ([`migrate`]).

#[path = "postgres/cluster.rs"]
mod cluster;
#[path = "postgres/migrate.rs"]
mod migrate;
#[path = "postgres/process.rs"]
mod process;
#[path = "postgres/stop.rs"]
mod stop;

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use self::cluster::{APP_DATABASE, Cluster, Tls};
use self::process::{Process, get_order, one_error_line};
use crate::certs::TestCa;
use crate::common::{self, eventually, roles};

/// In every URL of these tests; it must never be printed.
const PASSWORD: &str = "pg-s3cret-never-printed";

#[tokio::test]
async fn the_roles_run_end_to_end_with_sslmode_require_and_every_connection_is_encrypted() {
    let (name, url) = common::create_database().await;
    let _database = common::DropDatabase(name.clone());
    let amqp = common::test_amqp();
    let _queues = common::DeleteQueues::orders(&amqp);
    // The machine's server trusts any password, so the URL can carry one.
    let url = url.replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1) + "?sslmode=require";
    assert!(url.contains(PASSWORD), "the URL carries a password: {url}");

    let addr = roles::free_addr();
    let run = Process::start(&["run"], &url, addr, &amqp);
    let location = run.order_round_trip(addr).await;
    eventually(
        "the order to be confirmed",
        Duration::from_secs(30),
        || async { (get_order(addr, &location).await?["status"] == "CONFIRMED").then_some(()) },
    )
    .await;

    let mut admin = PgConnection::connect(&common::admin_url()).await.unwrap();
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(&name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(total > 0, "the roles hold connections to {name}");
    assert_eq!(encrypted, total, "every connection of the roles is TLS");
    assert!(
        !run.output().contains(PASSWORD),
        "the password reached the log"
    );
}

#[tokio::test]
async fn verify_full_with_the_clusters_ca_serves_orders_over_tls() {
    let ca = TestCa::new("pgca");
    let mut cluster = Cluster::init(Tls::On(&ca), PASSWORD);
    cluster.start();
    let query = format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.cert_file().display()
    );

    let migrate = Process::start(
        &["migrate"],
        &cluster.url(PASSWORD, &query),
        roles::free_addr(),
        &common::test_amqp(),
    );
    let (status, output) = migrate.exit_within(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "migrate over verify-full failed:\n{output}"
    );

    let addr = roles::free_addr();
    let api = Process::start(
        &["api"],
        &cluster.url(PASSWORD, &query),
        addr,
        &common::test_amqp(),
    );
    let location = api.order_round_trip(addr).await;
    let order = get_order(addr, &location).await.expect("the order");
    assert_eq!(order["status"], "PENDING", "{order}");

    let connections = cluster.psql(&format!(
        "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = '{APP_DATABASE}'"
    ));
    let connections: Vec<&str> = connections.lines().collect();
    assert!(!connections.is_empty(), "the api holds connections");
    assert!(connections.iter().all(|ssl| *ssl == "t"), "{connections:?}");
}

#[tokio::test]
async fn the_client_certificate_of_sslcert_and_sslkey_is_shown_to_a_server_that_asks_for_one() {
    let ca = TestCa::new("pgclient");
    let client = ca.client("client", cluster::APP_USER);
    let mut cluster = Cluster::init(Tls::ClientCert(&ca), PASSWORD);
    cluster.start();
    let verify = format!(
        "sslmode=verify-full&sslrootcert={}",
        ca.cert_file().display()
    );
    let with_certificate = format!(
        "{verify}&sslcert={}&sslkey={}",
        client.cert.display(),
        client.key.display()
    );

    let migrate = Process::start(
        &["migrate"],
        &cluster.url(PASSWORD, &with_certificate),
        roles::free_addr(),
        &common::test_amqp(),
    );
    let (status, output) = migrate.exit_within(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "migrate with a client certificate:\n{output}"
    );

    let without = Process::start(
        &["migrate"],
        &cluster.url(PASSWORD, &verify),
        roles::free_addr(),
        &common::test_amqp(),
    );
    let (status, output) = without.exit_within(Duration::from_secs(10)).await;
    assert!(!status.success(), "refused without one:\n{output}");
    let line = one_error_line(&output, "no client certificate");
    assert!(line.contains("certificate (SQLSTATE 28000)"), "{line}");
}
