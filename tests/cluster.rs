//! Cluster fault test: the service against a three-node RabbitMQ cluster of
//! its own, with quorum queues, loses the node that leads its queues
//! mid-load, and must lose nothing and apply nothing twice.
//!
//! The harness (`cluster/rabbit.rs`) starts three NEW RabbitMQ nodes on this
//! machine (`rabbitA@localhost`, `rabbitB@localhost`, `rabbitC@localhost`,
//! AMQP 5681-5683, distribution 25681-25683, data under a fresh
//! `/tmp/ostest-cluster-<uuid>`, run as the `rabbitmq` user) and joins B and
//! C to A; the machine's own broker (5672) is left alone. The roles of the
//! real binary (`api`, `relay`, `consume billing`, `consume email`) run as
//! separate processes (`cluster/stack.rs`) with `AMQP_URL` set to the three
//! nodes' URLs, comma separated, and `QUEUE_TYPE=quorum`, while orders are
//! POSTed at [`RATE`]/s. Mid-load the test finds the node that leads the
//! queues (`rabbitmqctl list_queues name type leader online arguments`),
//! checks the queues are quorum queues with a member on each node, posts a
//! burst and stops that node (`rabbitmqctl -n <leader> stop`), keeps the
//! load going for [`DOWN`] from the moment its AMQP listener is gone,
//! starts the node again with the same env and lets the system settle.
//!
//! Pass: the fault suite's checks (`faults/checks.rs`, reused as is): every
//! order answered 202 exists and is CONFIRMED, one ledger row per order and
//! ledger total = order total, one `order.created` and one `order.confirmed`
//! outbox row per order and every row published, dedup rows billing =
//! orders and e-mail = 2 × orders, two notifications per order, dead-letter
//! queues empty or accounted for, each order's events applied by e-mail in
//! sequence (`faults/order.rs`). And the failover itself: the orders
//! written in the first half of the outage must be through the whole chain
//! (relay, billing, `order.confirmed`, e-mail) before the node is restarted,
//! i.e. on the two surviving nodes; after the settle every queue has its
//! three members online again.
//!
//! It needs root and starts servers, so it is `#[ignore]`d; run it with
//!
//! ```text
//! cargo test --test cluster -- --ignored --test-threads=1
//! ```
//!
//! One summary line goes straight to stderr (shown even when the output is
//! captured). `CLUSTER_KEEP_LOGS=1` keeps the roles' and the nodes' logs
//! (kept anyway when the test fails); `CLUSTER_RUST_LOG` sets the roles'
//! `RUST_LOG` (default `info`); `CLUSTER_VERBOSE=1` prints each step and each
//! `rabbitmqctl` call with its duration. About 2 minutes on 2 cores, most of
//! it the cluster's start (3 nodes, 2 joins) and `rabbitmqctl` calls.

#[allow(dead_code)]
#[path = "faults/checks.rs"]
mod checks;
mod common;
#[allow(dead_code)]
#[path = "faults/load.rs"]
mod load;
#[path = "faults/order.rs"]
mod order;
// The ordering checker reads an SMTP server's mailbox with the mail
// suite's fixture (none runs here: the mails are not checked).
use common::ports;
#[path = "cluster/rabbit.rs"]
mod rabbit;
#[allow(dead_code, unused_imports)]
#[path = "mail/smtp.rs"]
mod smtp;
#[path = "cluster/stack.rs"]
mod stack;

use std::io::Write;
use std::time::{Duration, Instant};

use common::eventually;
use load::Load;
use order_service::orders::{BILLING, SUBSCRIPTIONS};
use outbox_common::amqp::QueueNames;
use sqlx::PgPool;
use stack::Stack;

/// Orders posted per second.
const RATE: u32 = 100;
/// Orders posted at once right before the stop, so it lands mid-batch.
const BURST: usize = 100;
/// How long the leader stays down while the load goes on.
const DOWN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root; starts a 3-node RabbitMQ cluster; run with --ignored --test-threads=1"]
async fn accepted_orders_survive_losing_the_leader_of_a_three_node_cluster() {
    let started = Instant::now();
    let mut step = Step::new();
    step.at("checking the binary takes a cluster");
    binary_takes_a_cluster();

    step.at("starting the 3-node RabbitMQ cluster");
    let mut cluster = blocking(rabbit::Cluster::start).unwrap_or_else(|e| panic!("{e}"));
    let seed = cluster.nodes[0].name.clone();

    step.at("starting the roles against the cluster");
    let mut stack = Stack::start(&cluster.amqp_urls()).await;
    let load = Load::start(stack.orders_url(), RATE);

    step.at("orders flowing before the fault");
    // Which node leads the queues, asked mid-load while the orders start to
    // flow (`rabbitmqctl` takes seconds on a busy machine).
    let prefix = stack.amqp.queue_prefix().to_owned();
    let listing = tokio::task::spawn_blocking({
        let (seed, prefix) = (seed.clone(), prefix.clone());
        move || rabbit::list_queues(&seed, &prefix)
    });
    confirmed_flow(
        &stack.pool,
        300,
        "300 orders to be CONFIRMED before the fault",
    )
    .await;
    let queues = listing
        .await
        .expect("the list_queues thread")
        .unwrap_or_else(|e| panic!("{e}"));
    check_topology(&stack, &queues);
    let leader = leader_of_the_queues(&stack, &queues);
    step.stopped = Some(leader.clone());
    let ports = cluster.ports();
    let connected_before = role_connections(&stack, &ports);

    step.at("stopping the leader");
    // A burst right before the stop, so that it lands on full batches.
    load.burst(BURST);
    let stopping = cluster.stop_node(&leader);
    eventually(
        "the stopped node to close its AMQP listener",
        Duration::from_secs(60),
        || async { stopping.down().then_some(()) },
    )
    .await;
    // The node is down for AMQP: what was written by now and is not through
    // the chain must go through the surviving nodes.
    let stopped = Instant::now();
    let down_at = db_now(&stack.pool).await;
    let in_flight = unfinished_since(&stack.pool, down_at).await;
    let (accepted_before, confirmed_before) = (load.accepted(), confirmed(&stack.pool).await);
    // Times the drain of that backlog (a task of its own: the restart
    // blocks a worker).
    let drain = tokio::spawn({
        let pool = stack.pool.clone();
        async move {
            loop {
                if unfinished_since(&pool, down_at).await == 0 {
                    return stopped.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    step.at("keeping the load going while the leader is down");
    // The scenario's duration, not a wait for an effect.
    tokio::time::sleep(DOWN / 2).await;
    let mid_at = db_now(&stack.pool).await;
    let connected_down = role_connections(&stack, &ports);
    tokio::time::sleep(DOWN.saturating_sub(stopped.elapsed())).await;
    // The failover: the orders written in the first half of the outage go
    // through the whole chain (relay, billing, e-mail) on the surviving
    // nodes, the node still down.
    let failed_over = tokio::time::timeout(Duration::from_secs(30), async {
        while unfinished_since(&stack.pool, mid_at).await > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let accepted_down = load.accepted() - accepted_before;
    let confirmed_down = confirmed(&stack.pool).await - confirmed_before;
    assert!(
        failed_over.is_ok(),
        "no failover: {} orders written in the first {:.1}s after {leader} went down were not \
         through the chain {:.1}s after it went down ({confirmed_down} orders confirmed \
         meanwhile; the roles' connections mid-outage: {})\n{}",
        unfinished_since(&stack.pool, mid_at).await,
        (DOWN / 2).as_secs_f64(),
        stopped.elapsed().as_secs_f64(),
        connections_list(&connected_down),
        stack.processes.diagnostics()
    );

    step.at("restarting the stopped node");
    let stop_took = blocking(|| stopping.wait()).unwrap_or_else(|e| panic!("{e}"));
    let down_for = stopped.elapsed();
    blocking(|| cluster.start_node(&leader)).unwrap_or_else(|e| panic!("{e}"));
    let restarted_in = stopped.elapsed() - down_for;
    orders_flow(&load, 200, "orders to flow after the restart").await;

    step.at("settling and checking the invariants");
    let load = load.stop().await;
    let verdict = checks::settle_and_verify(&mut stack, &load).await;
    let drained_in = drain.await.expect("the drain task");

    step.at("waiting for the restarted node's queue members");
    let queues_after = blocking(|| rabbit::await_members(&leader, &prefix, rabbit::NODES.len()))
        .unwrap_or_else(|e| panic!("{e}"));
    let rejoined_in = stopped.elapsed() - down_for;
    let led = main_queues(&stack)
        .filter(|q| leader_named(&queues, q) == leader)
        .count();
    let leaders_after: Vec<String> = main_queues(&stack)
        .map(|q| leader_named(&queues_after, &q))
        .collect();
    let (accepted, refused) = (load.accepted.len(), load.failed + load.server_errors);
    let (lost, twice) = (verdict.lost, verdict.applied_twice);
    let (before, during) = (
        connections_list(&connected_before),
        connections_list(&connected_down),
    );
    say(&format!(
        "cluster: stopped {leader} (leader of {led} of 2 main queues; rabbitmqctl stop took \
         {:.1}s) under {RATE}/s, down {:.1}s; {accepted} orders accepted (202), {refused} \
         refused or failed, lost {lost}, applied twice {twice}; {in_flight} orders in flight \
         when it went down, drained {:.1}s after; {accepted_down} accepted and {confirmed_down} \
         confirmed while it was down; roles on {before} before, on {during} during the outage; \
         restarted in {:.1}s (AMQP open), all its queue members online within {:.1}s, main \
         queues led by {}; settled {:.1}s after the load stopped ({} orders, {} dead letters, \
         {}); cluster up in {:.1}s, took {:.1}s",
        stop_took.as_secs_f64(),
        down_for.as_secs_f64(),
        drained_in.as_secs_f64(),
        restarted_in.as_secs_f64(),
        rejoined_in.as_secs_f64(),
        leaders_after.join(" and "),
        verdict.settled_in.as_secs_f64(),
        verdict.orders,
        verdict.dead_letters,
        verdict.order.summary("order", "events"),
        cluster.started_in.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    ));
    assert!(
        verdict.in_order(),
        "events applied out of sequence: {:?}",
        verdict.order.examples
    );
    step.done();
}

/// The contract the test is written against: `AMQP_URL` takes the nodes,
/// comma separated, and `QUEUE_TYPE` picks quorum queues.
fn binary_takes_a_cluster() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["relay", "--help"])
        .output()
        .expect("running order-service relay --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("QUEUE_TYPE"),
        "order-service does not know QUEUE_TYPE (quorum queues) yet; `relay --help`:\n{help}"
    );
}

/// Every queue of ours is a quorum queue, replicated on the three nodes;
/// the retry queues dead-letter at least once, with `reject-publish`.
fn check_topology(stack: &Stack, queues: &[rabbit::QueueInfo]) {
    let mut expected = Vec::new();
    for consumer in SUBSCRIPTIONS.iter().map(|s| s.consumer) {
        let names = QueueNames::new(&stack.amqp, consumer);
        expected.push((names.main, false));
        expected.extend(names.retries.into_iter().map(|(q, _)| (q, true)));
        expected.push((names.dlq, false));
    }
    for (name, retry) in expected {
        let queue = queues
            .iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| panic!("queue {name} not declared: {queues:#?}"));
        assert!(
            queue.kind == "quorum" && queue.online.len() == rabbit::NODES.len(),
            "{name} should be a quorum queue with a member on each node (QUEUE_TYPE=quorum): \
             {queue:#?}"
        );
        if retry {
            assert!(
                queue.arguments.contains("at-least-once")
                    && queue.arguments.contains("reject-publish"),
                "retry queue {name} should have x-dead-letter-strategy: at-least-once and \
                 x-overflow: reject-publish: {queue:#?}"
            );
        }
    }
}

/// The node leading most of the main queues (billing's on a tie).
fn leader_of_the_queues(stack: &Stack, queues: &[rabbit::QueueInfo]) -> String {
    let billing = leader_named(queues, &QueueNames::new(&stack.amqp, BILLING).main);
    let leaders: Vec<String> = main_queues(stack)
        .map(|q| leader_named(queues, &q))
        .collect();
    let most = leaders
        .iter()
        .max_by_key(|l| (leaders.iter().filter(|m| m == l).count(), **l == billing))
        .cloned()
        .unwrap_or_default();
    assert!(
        !most.is_empty(),
        "no leader found for the main queues: {queues:#?}"
    );
    most
}

fn main_queues(stack: &Stack) -> impl Iterator<Item = String> + '_ {
    SUBSCRIPTIONS
        .iter()
        .map(|s| QueueNames::new(&stack.amqp, s.consumer).main)
}

fn leader_named(queues: &[rabbit::QueueInfo], name: &str) -> String {
    queues
        .iter()
        .find(|q| q.name == name)
        .map(|q| q.leader.clone())
        .unwrap_or_default()
}

/// `relay on rabbitB@localhost, consume billing on ...`.
fn connections_list(connections: &[(&'static str, String)]) -> String {
    if connections.is_empty() {
        return "no node".into();
    }
    connections
        .iter()
        .map(|(role, node)| format!("{role} on {node}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which node each role's AMQP connections go to, from the client side
/// (`ss`: no `rabbitmqctl`, which takes seconds on a busy machine).
fn role_connections(stack: &Stack, ports: &[(String, u16)]) -> Vec<(&'static str, String)> {
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let pids = stack.processes.pids();
    let mut found = Vec::new();
    for line in out.lines() {
        let columns: Vec<&str> = line.split_whitespace().collect();
        let Some(port) = columns
            .get(3)
            .and_then(|peer| peer.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
        else {
            continue;
        };
        let Some((node, _)) = ports.iter().find(|(_, p)| *p == port) else {
            continue;
        };
        for (role, pid) in &pids {
            if line.contains(&format!("pid={pid},")) {
                found.push((role.name(), node.clone()));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

async fn db_now(pool: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .expect("the database clock")
}

/// Orders written up to `since` not yet through the whole chain: their
/// `order.created` processed by billing and e-mail and their
/// `order.confirmed` by e-mail (three dedup rows).
async fn unfinished_since(pool: &PgPool, since: chrono::DateTime<chrono::Utc>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM orders o \
         LEFT JOIN (SELECT x.aggregate_id, count(*) AS n FROM outbox x \
                    JOIN processed_messages p USING (transaction_id) \
                    GROUP BY x.aggregate_id) d ON d.aggregate_id = o.id::text \
         WHERE o.created_at <= $1 AND coalesce(d.n, 0) < 3",
    )
    .bind(since)
    .fetch_one(pool)
    .await
    .unwrap_or(i64::MAX)
}

async fn confirmed(pool: &PgPool) -> usize {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'CONFIRMED'")
        .fetch_one(pool)
        .await
        .expect("counting confirmed orders");
    n as usize
}

/// Waits until `n` more orders are CONFIRMED.
async fn confirmed_flow(pool: &PgPool, n: usize, what: &str) {
    let target = confirmed(pool).await + n;
    eventually(what, Duration::from_secs(60), || async {
        (confirmed(pool).await >= target).then_some(())
    })
    .await;
}

/// Waits until `n` more orders have been answered 202.
async fn orders_flow(load: &Load, n: usize, what: &str) {
    let target = load.accepted() + n;
    eventually(what, Duration::from_secs(30), || async {
        (load.accepted() >= target).then_some(())
    })
    .await;
}

/// Runs blocking work (`rabbitmqctl`) on this worker thread, letting the
/// runtime move the load's tasks to the other.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Straight to stderr: libtest captures `eprintln!`, not this.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Where the test is, for the line it writes when it fails.
struct Step {
    at: &'static str,
    started: Instant,
    stopped: Option<String>,
    done: bool,
}

impl Step {
    fn new() -> Self {
        Self {
            at: "",
            started: Instant::now(),
            stopped: None,
            done: false,
        }
    }

    fn at(&mut self, step: &'static str) {
        self.at = step;
        if std::env::var_os("CLUSTER_VERBOSE").is_some() {
            say(&format!(
                "cluster: {:6.1}s {step}",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }

    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.done {
            say(&format!(
                "cluster: FAILED while {} after {:.1}s (stopped node: {})",
                self.at,
                self.started.elapsed().as_secs_f64(),
                self.stopped.as_deref().unwrap_or("none yet")
            ));
        }
    }
}
