//! The mailer, end to end, against a real SMTP server.
//!
//! Each test runs the real binary's roles as separate processes, as docker
//! compose runs them (`api`, `relay`, `consume billing`, and `consume email`
//! with `SMTP_URL` set, which runs the mailer in the same process), against a
//! database, an exchange and queues of its own, and an SMTP server of its own
//! on a port of its own: `tests/smtp/server.py` (aiosmtpd), which appends
//! every message it accepts to a mailbox file. The tests post orders to the
//! API and poll the mailbox and the `mail_outbox` table until their deadline
//! (no fixed sleeps):
//!
//! - every event's mail arrives exactly once, two per order, naming the
//!   order, with `Message-ID: <mail_outbox.transaction_id@order-service>`;
//! - a mailer killed with SIGKILL mid-send and started again loses no mail,
//!   and whatever it sends again carries the same `Message-ID`;
//! - with the SMTP server down, mails wait (pending, with `last_error`) and
//!   all arrive, once each, when it comes up;
//! - a recipient refused with 550 is given up on (`next_attempt_at =
//!   'infinity'`), and the other users' mails still arrive;
//! - the e-mail consumer's `/metrics` counts the mails sent and failed and
//!   reads the mails' outbox gauges, and `order-service outbox status` shows
//!   the mails' outbox (with a given-up mail: ignored until fixed, see
//!   `outbox_status_lists_a_given_up_mail`);
//! - over STARTTLS and implicit TLS with AUTH, mails arrive once each; a
//!   server without STARTTLS, under `tls=required`, gets no mail and no
//!   password (`mail/tls.rs`, with certificates the test makes:
//!   `tls/certs.rs`);
//! - a bad `SMTP_URL` or `SMTP_CA_FILE`, or a server that refuses the
//!   settings for good (an untrusted certificate, no STARTTLS under
//!   `tls=required`, a refused password), stops the e-mail consumer at start
//!   with one line naming it; a server only down does not (`mail/stop.rs`).
//!
//! ```text
//! cargo test --test mail
//! ```
//!
//! needs Postgres and RabbitMQ as the other suites do (`TEST_DATABASE_URL`,
//! `TEST_AMQP_URL`) and `python3` with `aiosmtpd` (`python3 -m pip install
//! aiosmtpd`, as `.ci/run` does; `PYTHON` names another interpreter).
//! `MAIL_TEST_KEEP_LOGS=1` keeps the roles' logs and the mailbox;
//! `MAIL_TEST_RUST_LOG` sets the roles' `RUST_LOG` (default `info`).

#[path = "tls/certs.rs"]
mod certs;
#[path = "common/mod.rs"]
mod common;
// The SMTP fixture takes its ports from `crate::ports`, here and in the benchmark.
use common::ports;
#[path = "mail/fixture.rs"]
mod fixture;
#[path = "mail/smtp.rs"]
mod smtp;
#[path = "mail/stack.rs"]
mod stack;
#[path = "mail/stop.rs"]
mod stop;
#[path = "mail/tls.rs"]
mod tls;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fixture::{
    Fixture, MailOutboxRow, first_of_each_order, locked, mail_rows, message_id, sample, section,
    unlocked,
};
use smtp::{Behaviour, open_connections, read_mailbox};
use stack::Role;

/// How long the mails of a test may take to arrive (or the state to settle).
const SETTLE: Duration = Duration::from_secs(40);

/// Every order's two mails arrive once each and say what they should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_events_mail_arrives_exactly_once_naming_its_order() {
    let mut f = Fixture::start("normal", Behaviour::default(), true).await;
    let orders = f.post_orders("alice", 5).await;
    let rows = f.until_delivered(2 * orders.len()).await;
    let mails = f.mails();

    check_mails_name_their_orders(&rows, &orders, "alice");
    f.check_rows_are_the_events(&rows).await;
    let copies = check_every_row_arrived(&rows, &mails);
    assert!(
        copies.values().all(|&n| n == 1),
        "a mail arrived more than once: {copies:?}"
    );
    assert_eq!(mails.len(), rows.len(), "one mail per row, nothing else");
    let status = f.stack.outbox_status();
    let mails_status = section(&status, "mails (mail_outbox");
    assert!(
        mails_status.contains("pending rows:        0"),
        "outbox status after delivery:\n{status}"
    );
    let text = f.metrics(Role::Email).await;
    let expected = [
        ("mailer_sent_total", rows.len() as f64),
        ("mailer_failed_total", 0.0),
        ("mail_outbox_pending_rows", 0.0),
        ("mail_outbox_oldest_pending_age_seconds", 0.0),
        ("mail_outbox_given_up_rows", 0.0),
    ];
    for (name, value) in expected {
        assert_eq!(
            sample(&text, name),
            Some(value),
            "{name} on the e-mail consumer's /metrics:\n{text}"
        );
    }
}

/// A mailer killed with SIGKILL while sends are in flight, then started
/// again: no mail is lost, and a mail sent again is the same mail (same
/// Message-ID, same content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailer_killed_mid_send_loses_no_mail_and_resends_under_the_same_message_id() {
    const ORDERS: usize = 20;
    let behaviour = Behaviour {
        delay_ms: 300,
        ..Behaviour::default()
    };
    let mut f = Fixture::start("kill", behaviour, true).await;
    let orders = f.post_orders("bob", ORDERS).await;
    let total = 2 * ORDERS;

    // Kill while a round is in hand (rows claimed: sends in flight, with
    // 300 ms in DATA and 8 sends at once) and some of its mails have been
    // accepted but not yet marked (more arrivals than published rows): the
    // case that must send a mail again.
    let (mailbox, pool) = (f.mailbox.clone(), f.pool.clone());
    let (arrived_before, in_flight) = f
        .until(
            "a round in hand, some of its mails accepted",
            SETTLE,
            async || {
                let published = mail_rows(&pool)
                    .await
                    .iter()
                    .filter(|r| r.published)
                    .count();
                let n = read_mailbox(&mailbox).len();
                assert!(
                    n < total,
                    "every mail arrived before the kill: raise ORDERS or the delay"
                );
                let claimed = locked(&pool).await?;
                if n > published && claimed > 0 {
                    Ok((n, claimed))
                } else {
                    Err(format!(
                        "{n} of {total} arrived, {published} published, {claimed} rows claimed"
                    ))
                }
            },
        )
        .await;
    f.stack.processes.kill(Role::Email);
    assert!(
        arrived_before < total,
        "killed after {arrived_before} of {total}"
    );

    // Postgres has ended the dead mailer's transaction: its claims are free.
    f.until("the killed mailer's claims released", SETTLE, async || {
        unlocked(&pool).await
    })
    .await;
    // And the SMTP server has closed its connections: a mail whose DATA it
    // had finished before it saw the connection go is in the mailbox now,
    // one it had not is dropped; none can arrive later.
    f.until(
        "the killed mailer's SMTP sessions ended",
        SETTLE,
        async || match open_connections(&mailbox) {
            0 => Ok(()),
            n => Err(format!("{n} connections open")),
        },
    )
    .await;
    let at_kill = f.mails();
    let rows_at_kill = mail_rows(&f.pool).await;
    let published_at_kill: HashSet<String> = rows_at_kill
        .iter()
        .filter(|r| r.published)
        .map(|r| message_id(r.transaction_id))
        .collect();
    let arrived_at_kill: HashSet<String> = at_kill.iter().map(|m| m.message_id.clone()).collect();
    // Accepted by the server, not yet marked: these must be sent again.
    let unmarked: HashSet<String> = arrived_at_kill
        .difference(&published_at_kill)
        .cloned()
        .collect();
    assert!(
        rows_at_kill.iter().any(|r| !r.published),
        "every row was published before the kill"
    );

    f.stack.processes.restart(Role::Email).await;
    let rows = f.until_delivered(total).await;
    let mails = f.mails();
    check_mails_name_their_orders(&rows, &orders, "bob");
    let copies = check_every_row_arrived(&rows, &mails);
    let distinct = copies.len();
    let resent: HashSet<String> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    let resends = mails.len() - distinct;
    eprintln!(
        "kill -9 of the mailer with {in_flight} rows claimed: {} of {total} mails had arrived \
         ({arrived_before} when it was killed), {} rows were marked published; \
         {} accepted but unmarked; after the restart {} arrivals for {distinct} distinct \
         Message-IDs: {resends} resent ({} mails sent twice or more)",
        at_kill.len(),
        published_at_kill.len(),
        unmarked.len(),
        mails.len(),
        resent.len()
    );
    assert_eq!(distinct, rows.len(), "distinct Message-IDs == rows");
    assert_eq!(
        f.metric(Role::Email, "mailer_sent_total").await,
        Some((mails.len() - at_kill.len()) as f64),
        "the restarted mailer counts each mail it sent"
    );
    assert!(mails.len() >= rows.len(), "total arrivals >= rows");
    // A mail the server had accepted but the dead mailer had not marked is
    // sent again; one it had marked is never sent again; nothing else is.
    let missing: Vec<&String> = unmarked.difference(&resent).collect();
    assert!(
        missing.is_empty(),
        "accepted before the kill, unmarked, yet not sent again: {missing:?}"
    );
    let marked_resent: Vec<&String> = resent.intersection(&published_at_kill).collect();
    assert!(
        marked_resent.is_empty(),
        "marked published before the kill, yet sent again: {marked_resent:?}"
    );
    let unexpected: Vec<&String> = resent.difference(&arrived_at_kill).collect();
    assert!(
        unexpected.is_empty(),
        "sent more than once though not accepted before the kill: {unexpected:?}"
    );
}

/// The SMTP server is down when the roles start and the orders come: the
/// mails wait, with the error recorded; once it is up, each arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_smtp_server_down_mails_wait_then_each_arrives_once() {
    let mut f = Fixture::start("down", Behaviour::default(), false).await;
    let orders = f.post_orders("carol", 3).await;
    let total = 2 * orders.len();

    let pool = f.pool.clone();
    let rows = f
        .until(
            "each order's first mail pending with last_error set, the second waiting untried",
            SETTLE,
            async || {
                let rows = mail_rows(&pool).await;
                let (first, waiting) = first_of_each_order(&rows);
                let failing = first
                    .iter()
                    .filter(|r| !r.published && r.attempts >= 1 && r.last_error.is_some())
                    .count();
                let untried = waiting
                    .iter()
                    .filter(|r| !r.published && r.attempts == 0 && r.last_error.is_none())
                    .count();
                if rows.len() == total && failing == orders.len() && untried == orders.len() {
                    Ok(rows)
                } else {
                    Err(format!(
                        "{failing} first and {untried} waiting of {} rows: {rows:#?}",
                        rows.len()
                    ))
                }
            },
        )
        .await;
    assert!(
        rows.iter().all(|r| !r.given_up),
        "a refused connection is temporary, never given up: {rows:#?}"
    );
    eprintln!(
        "SMTP down: last_error = {:?}",
        rows[0].last_error.as_deref().unwrap_or_default()
    );
    let status = f.stack.outbox_status();
    let mails_status = section(&status, "mails (mail_outbox");
    assert!(
        mails_status.contains(&format!("pending rows:        {total}"))
            && mails_status.contains(&format!("rows with errors:    {}", orders.len())),
        "outbox status with SMTP down:\n{status}"
    );
    assert!(f.mails().is_empty(), "nothing can arrive yet");
    let text = f.metrics(Role::Email).await;
    let failed = sample(&text, "mailer_failed_total").unwrap_or_default();
    let age = sample(&text, "mail_outbox_oldest_pending_age_seconds").unwrap_or_default();
    assert!(
        sample(&text, "mail_outbox_pending_rows") == Some(total as f64)
            && sample(&text, "mailer_sent_total") == Some(0.0)
            && failed >= orders.len() as f64
            && age > 0.0,
        "the e-mail consumer's /metrics with SMTP down:\n{text}"
    );

    f.start_smtp(Behaviour::default());
    let rows = f.until_delivered(total).await;
    let mails = f.mails();
    check_mails_name_their_orders(&rows, &orders, "carol");
    let copies = check_every_row_arrived(&rows, &mails);
    assert!(
        copies.values().all(|&n| n == 1),
        "a mail arrived more than once: {copies:?}"
    );
    assert_eq!(mails.len(), total);
    assert_eq!(
        f.metric(Role::Email, "mailer_sent_total").await,
        Some(total as f64)
    );
    assert_eq!(
        f.metric(Role::Email, "mail_outbox_pending_rows").await,
        Some(0.0)
    );
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempts).collect();
    eprintln!("SMTP down, then up: attempts per row before the send that worked: {attempts:?}");
}

/// A 550 for one recipient gives that user's mails up, records why, and
/// holds nothing else back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_550_gives_that_recipients_mails_up_and_the_others_arrive() {
    const REFUSED: &str = "refused_user";
    let behaviour = Behaviour {
        reject: Some(REFUSED.into()),
        ..Behaviour::default()
    };
    let mut f = Fixture::start("reject", behaviour, true).await;
    let mut refused = f.post_orders(REFUSED, 1).await;
    let mut accepted = f.post_orders("dave", 1).await;
    refused.extend(f.post_orders(REFUSED, 1).await);
    accepted.extend(f.post_orders("dave", 2).await);
    let total = 2 * (refused.len() + accepted.len());

    let pool = f.pool.clone();
    let settled = async || {
        let rows = mail_rows(&pool).await;
        let done = rows.iter().all(|r| {
            if r.to.starts_with(REFUSED) {
                r.given_up
            } else {
                r.published
            }
        });
        if rows.len() == total && done {
            Ok(rows)
        } else {
            Err(format!("{rows:#?}"))
        }
    };
    let rows = f
        .until("refused mails given up, the others sent", SETTLE, settled)
        .await;
    let (given_up, sent): (Vec<MailOutboxRow>, Vec<MailOutboxRow>) = rows
        .iter()
        .cloned()
        .partition(|r| r.to.starts_with(REFUSED));
    assert_eq!(given_up.len(), 2 * refused.len());
    for row in &given_up {
        let error = row.last_error.as_deref().unwrap_or_default();
        assert!(
            !row.published && row.given_up && row.attempts == 1 && error.contains("550"),
            "a 550 gives the mail up at once, with the reason: {row:#?}"
        );
    }
    eprintln!("550: last_error = {:?}", given_up[0].last_error);
    let mails = f.mails();
    assert!(
        mails
            .iter()
            .all(|m| m.to.iter().all(|to| !to.contains(REFUSED))),
        "a refused recipient got a mail: {mails:#?}"
    );
    check_mails_name_their_orders(&sent, &accepted, "dave");
    let copies = check_every_row_arrived(&sent, &mails);
    assert!(
        copies.values().all(|&n| n == 1),
        "a mail arrived more than once: {copies:?}"
    );
    assert_eq!(mails.len(), sent.len(), "only the accepted users' mails");
    let text = f.metrics(Role::Email).await;
    let expected = [
        ("mailer_sent_total", sent.len() as f64),
        ("mailer_failed_total", given_up.len() as f64),
        ("mail_outbox_pending_rows", 0.0),
        ("mail_outbox_given_up_rows", given_up.len() as f64),
    ];
    for (name, value) in expected {
        assert_eq!(
            sample(&text, name),
            Some(value),
            "{name} on the e-mail consumer's /metrics:\n{text}"
        );
    }

    // Given up means out of the way: a later order's mails still go.
    let later = f.post_orders("dave", 1).await;
    let rows = f.until_delivered_or_given_up(total + 2).await;
    let later_rows: Vec<MailOutboxRow> = rows
        .into_iter()
        .filter(|r| r.aggregate_id == later[0].to_string())
        .collect();
    check_every_row_arrived(&later_rows, &f.mails());
}

/// `order-service outbox status` shows a mail given up on (and why), beside
/// one still to be retried.
#[tokio::test]
async fn outbox_status_lists_a_given_up_mail() {
    let (db_name, db_url) = common::create_database().await;
    let _db = common::DropDatabase(db_name);
    let dir = certs::TempDir::new("outbox_status");
    common::roles::migrate(
        &db_url,
        &common::test_amqp(),
        dir.path(),
        "MAIL_TEST_RUST_LOG",
    );
    let pool = sqlx::PgPool::connect(&db_url)
        .await
        .expect("the test database");
    sqlx::query(
        "INSERT INTO mail_outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, \
           attempts, next_attempt_at, last_error) VALUES \
         (gen_random_uuid(), 'order', 'o1', 'order.created', '{}', 1, 'infinity', \
           'permanent error (550): 5.1.1 mailbox unavailable'), \
         (gen_random_uuid(), 'order', 'o2', 'order.created', '{}', 1, now() + interval '1 second', \
           'Connection error: Connection refused (os error 111)')",
    )
    .execute(&pool)
    .await
    .expect("writing a given-up and a failing mail");
    let status = stack::outbox_status(&db_url).unwrap_or_else(|e| panic!("{e}"));
    let mails = section(&status, "mails (mail_outbox");
    assert!(
        mails.contains("pending rows:        1")
            && mails.contains("rows with errors:    2")
            && mails.contains("given up (refused):  1")
            && mails.contains("(550)"),
        "outbox status:\n{status}"
    );
}

/// Two rows per order: "Order <id> received" (order.created) and "Payment
/// confirmed for order <id>" (order.confirmed), to `<user>@example.com`,
/// each naming the order in its subject and body.
fn check_mails_name_their_orders(rows: &[MailOutboxRow], orders: &[uuid::Uuid], user: &str) {
    for order in orders {
        let id = order.to_string();
        let mine: Vec<&MailOutboxRow> = rows.iter().filter(|r| r.aggregate_id == id).collect();
        let subjects: HashSet<(String, String)> = mine
            .iter()
            .map(|r| (r.event_type.clone(), r.subject.clone()))
            .collect();
        let expected = HashSet::from([
            ("order.created".to_owned(), format!("Order {id} received")),
            (
                "order.confirmed".to_owned(),
                format!("Payment confirmed for order {id}"),
            ),
        ]);
        assert_eq!(mine.len(), 2, "two mails for order {id}: {mine:#?}");
        assert_eq!(subjects, expected, "the mails of order {id}");
        for row in mine {
            assert!(row.body.contains(&id), "the body names the order: {row:#?}");
            assert_eq!(row.to, format!("{user}@example.com"));
        }
    }
}

/// Every row's mail arrived (by `Message-ID`), each copy the row's own
/// mail; no mail arrived that no row accounts for. Returns the copies per
/// `Message-ID` among the rows'.
fn check_every_row_arrived(rows: &[MailOutboxRow], mails: &[smtp::Mail]) -> HashMap<String, usize> {
    let by_id: HashMap<String, &MailOutboxRow> = rows
        .iter()
        .map(|r| (message_id(r.transaction_id), r))
        .collect();
    let mut copies: HashMap<String, usize> = HashMap::new();
    for mail in mails {
        let Some(row) = by_id.get(&mail.message_id) else {
            continue;
        };
        *copies.entry(mail.message_id.clone()).or_default() += 1;
        assert_eq!(mail.to, vec![row.to.clone()], "recipient of {row:#?}");
        assert_eq!(mail.subject, row.subject, "subject of {row:#?}");
        assert_eq!(mail.body, row.body, "body of {row:#?}");
        assert_eq!(mail.from, "orders@example.com", "envelope sender");
    }
    let missing: Vec<&MailOutboxRow> = by_id
        .iter()
        .filter(|(id, _)| !copies.contains_key(*id))
        .map(|(_, r)| *r)
        .collect();
    assert!(missing.is_empty(), "mails never arrived: {missing:#?}");
    copies
}
