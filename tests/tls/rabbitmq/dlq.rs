//! `order-service dlq list` and `dlq replay` stopping: on a broker not
//! there, on SIGTERM while connecting, and on SIGTERM while a memory alarm
//! holds up a replay's publish (on a node of the test's own: the alarm
//! would block every other test on the machine's broker).

use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use inbox::dlq;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use order_service::config::AmqpConfig;
use order_service::orders::SUBSCRIPTIONS;
use outbox_common::amqp::{QueueNames, confirm_channel, declare_topology};

use super::fixture::{Proc, STOP_WITHIN, run_to_exit};
use crate::certs::TempDir;
use crate::common::rabbit_ctl::ctl;
use crate::common::rabbit_node::{CTL_TIMEOUT, OwnNode};
use crate::common::{eventually, free_port};

#[test]
fn dlq_commands_fail_within_seconds_when_the_broker_is_unreachable() {
    let dir = TempDir::new("dlq-unreachable");
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let env = [("AMQP_URL", url.as_str())];
    for command in ["list", "replay"] {
        let (status, took, output) = run_to_exit(&["dlq", command, "email"], &env, dir.path());
        assert!(!status.success(), "dlq {command}: {output}");
        assert!(took < STOP_WITHIN, "dlq {command} took {took:?}:\n{output}");
        assert!(
            output.contains("error: AMQP_URL: ") && output.contains("Connection refused"),
            "dlq {command}: {output}"
        );
    }
}

#[test]
fn dlq_list_stops_on_sigterm() {
    // A broker that accepts connections and never answers: each of the
    // three URLs would take the 5 s connect timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = vec![format!("amqp://guest:guest@127.0.0.1:{port}/%2f"); 3].join(",");
    let dir = TempDir::new("dlq-sigterm");
    let log = dir.path().join("dlq.log");
    let mut dlq = Proc::spawn(&["dlq", "list", "email"], &[("AMQP_URL", &url)], &log);
    silent.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let _held = loop {
        match silent.accept() {
            Ok((held, _)) => break held,
            Err(_) if started.elapsed() < STOP_WITHIN => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("dlq list never connected: {e}"),
        }
    };
    let status = sigterm_and_wait(&mut dlq.0, Duration::from_secs(3));
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("stopped while connecting to RabbitMQ"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_replay_stops_on_sigterm_while_a_memory_alarm_blocks_its_publish() {
    let mut own = OwnNode::new("osdlq").unwrap_or_else(|e| panic!("{e}"));
    let port = own.node.amqp_port;
    let config = format!("listeners.tcp.default = 127.0.0.1:{port}\n");
    tokio::task::block_in_place(|| own.start(&config)).unwrap_or_else(|e| panic!("{e}"));
    let name = own.node.name.clone();
    let rabbitmqctl = |args: &[&str]| {
        tokio::task::block_in_place(|| ctl(&name, args, CTL_TIMEOUT))
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let amqp = AmqpConfig::new(&url);
    let queues = QueueNames::new(&amqp, order_service::orders::EMAIL);

    // One letter in the DLQ, published now (inside the dedup window).
    let setup = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = confirm_channel(&setup).await.unwrap();
    declare_topology(&channel, &amqp, &SUBSCRIPTIONS)
        .await
        .unwrap();
    let letter = BasicProperties::default()
        .with_message_id("letter-1".into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64);
    dlq::publish(&channel, &queues.dlq, b"{}", letter)
        .await
        .unwrap();
    let _ = setup.close(200, "set up".into()).await;

    // A memory alarm: the node stops reading from connections that publish.
    rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    eventually("the memory alarm", Duration::from_secs(30), || async {
        let alarms = rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]);
        alarms.contains("memory").then_some(())
    })
    .await;

    let dir = TempDir::new("dlq-alarm");
    let log = dir.path().join("replay.log");
    let mut replay = Proc::spawn(&["dlq", "replay", "email"], &[("AMQP_URL", &url)], &log);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // The letter taken (unacked): the replay is at its publish, held up.
    let watch = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ready = || async {
        let channel = watch.create_channel().await.ok()?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare(queues.dlq.as_str().into(), passive, FieldTable::default())
            .await
            .ok()?;
        let _ = channel.close(200, "counted".into()).await;
        Some(queue.message_count())
    };
    let running = std::cell::RefCell::new(&mut replay.0);
    eventually("the replay to take the letter", STOP_WITHIN, || async {
        let exited = running.borrow_mut().try_wait().unwrap();
        assert!(exited.is_none(), "exited: {}", read_log());
        (ready().await? == 0).then_some(())
    })
    .await;

    // Well under the publish's own 5 s timeout.
    let status = sigterm_and_wait(&mut replay.0, Duration::from_secs(3));
    let output = read_log();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("dlq replay stopped by a signal"),
        "{output}"
    );

    // Once the alarm is over, the node sees the replay gone: the letter is
    // back in the DLQ (its copy may be in the main queue too, for the
    // consumers' dedup to absorb).
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    eventually(
        "the letter back in the DLQ",
        Duration::from_secs(30),
        || async { (ready().await? == 1).then_some(()) },
    )
    .await;
    let _ = watch.close(200, "test done".into()).await;
}

/// SIGTERM to `child`; its status once it exits, which must be within
/// `within`.
fn sigterm_and_wait(child: &mut Child, within: Duration) -> ExitStatus {
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(kill.unwrap().success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            signalled.elapsed() < within,
            "still running {within:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
