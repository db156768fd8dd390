//! The queues a plain start declares: quorum queues by default (main, delay
//! and dead-letter queues), classic ones when asked, as `rabbitmqctl
//! list_queues name type` shows them to an operator.

use std::process::Command;

use order_service::config::QueueType;
use order_service::orders::SUBSCRIPTIONS;
use outbox_common::amqp::{declare_exchange, declare_topology};

use crate::helpers::{DeleteQueues, amqp_channel, test_amqp};

/// The type of every queue whose name starts with `prefix`, by name.
fn queue_types(prefix: &str) -> Vec<(String, String)> {
    let output = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "type"])
        .output()
        .expect("running rabbitmqctl (the tests run beside the broker)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut types: Vec<(String, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, kind) = line.split_once('\t')?;
            name.starts_with(prefix)
                .then(|| (name.to_owned(), kind.trim().to_owned()))
        })
        .collect();
    types.sort();
    types
}

async fn declared(queue_type: QueueType) -> Vec<(String, String)> {
    let mut amqp = test_amqp();
    amqp = amqp.with_queue_type(queue_type);
    let _queues = DeleteQueues::orders(&amqp);
    let (connection, channel) = amqp_channel().await;
    declare_exchange(&channel, &amqp).await.unwrap();
    declare_topology(&channel, &amqp, &SUBSCRIPTIONS)
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    queue_types(amqp.queue_prefix())
}

#[tokio::test]
async fn a_plain_start_declares_quorum_queues() {
    let queues = declared(QueueType::default()).await;
    // Two consumers, each a main queue, two delay queues and a DLQ.
    assert_eq!(queues.len(), 8, "{queues:?}");
    assert!(
        queues.iter().all(|(_, kind)| kind == "quorum"),
        "{queues:?}"
    );
}

#[tokio::test]
async fn queue_type_classic_declares_classic_queues() {
    let queues = declared(QueueType::Classic).await;
    assert_eq!(queues.len(), 8, "{queues:?}");
    assert!(
        queues.iter().all(|(_, kind)| kind == "classic"),
        "{queues:?}"
    );
}

/// A role whose loop has ended (returned, gave up or panicked) answers 503
/// on `/healthz`, naming the loop, so that an orchestrator restarts it; its
/// other loops running do not hide it.
#[tokio::test]
async fn healthz_fails_once_a_loop_of_the_role_has_ended() {
    use order_service::config::HttpConfig;
    use order_service::startup::{Probes, Roles};
    use tokio_util::sync::CancellationToken;

    let db = crate::helpers::TestDb::new().await;
    let roles = Roles::new(db.pool.clone(), CancellationToken::new());
    let _still_running = roles.status.running("relay");
    let consumer = roles.status.running("billing_service");
    let addr = roles
        .start_probes(&HttpConfig::default(), Probes::default())
        .await
        .expect("serving the probes");
    let healthz = || async {
        let response = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap();
        let status = response.status();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!(healthz().await.0, reqwest::StatusCode::OK);

    // The consumer's task ends by a panic: its guard goes with it.
    let ended = tokio::spawn(async move {
        let _guard = consumer;
        panic!("a bug in the consumer loop");
    });
    assert!(ended.await.is_err(), "the task panicked");

    let (status, body) = healthz().await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["endedLoops"], serde_json::json!(["billing_service"]));
    roles.cancel.cancel();
    roles.wait(std::time::Duration::from_secs(5)).await.unwrap();
    db.cleanup().await;
}
