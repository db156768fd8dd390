//! After the faults: wait until the system has settled, then check that no
//! accepted order was lost and no event was applied twice, along the whole
//! chain: `order.created` (API) to billing and e-mail, billing's
//! `order.confirmed` (written in its dedup transaction) to e-mail, e-mail's
//! mail (written in its dedup transaction) to the SMTP server; and that
//! each order's events were applied, and its mails arrived, in sequence
//! ([`crate::order`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use order_service::orders::{BILLING, EMAIL, ORDER_CONFIRMED, SUBSCRIPTIONS};
use outbox_common::amqp::QueueNames;
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::LoadReport;
use crate::order::{self, OrderCheck};
use crate::smtp::read_mailbox;
use crate::stack::{AMQP_URL, Role, Stack};

/// How long the system may take to drain after the last fault. After the
/// memory alarm the mailers work off 40 s of orders' mails behind the
/// consumers' own backlog: measured in one CI run, 915 of 26,648 mails
/// were still unsent at 90 s, while the mailers sent about 220 a second.
const SETTLE_DEADLINE: Duration = Duration::from_secs(120);
/// The settled state must hold unchanged this long: longer than the
/// longest retry delay (600 ms), so a late redelivery would show.
const QUIET: Duration = Duration::from_millis(1500);

/// The counts every check is made of, read in one statement.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Counts {
    pub orders: i64,
    pub not_confirmed: i64,
    pub order_total: i64,
    /// Outbox rows of both event types.
    pub outbox: i64,
    pub unpublished: i64,
    /// `order.created` rows, and the orders they name.
    pub created: i64,
    pub created_orders: i64,
    /// `order.confirmed` rows, and the orders they name.
    pub confirmed: i64,
    pub confirmed_orders: i64,
    /// `order.confirmed` rows whose charge is the order's ledger row and
    /// amount.
    pub charges_matching: i64,
    pub ledger_rows: i64,
    pub ledger_orders: i64,
    pub ledger_total: i64,
    pub notifications: i64,
    /// "Order received" mails (`order.created`), and the orders they name.
    pub received_mails: i64,
    pub received_orders: i64,
    /// "Payment confirmed" mails (`order.confirmed`), and the orders they name.
    pub confirmed_mails: i64,
    pub confirmed_mail_orders: i64,
    /// Mails whose event is the outbox row of their order and type, with
    /// that type's subject.
    pub mails_matching: i64,
    /// Billing's dedup rows of `order.created` events, and e-mail's of each
    /// event type.
    pub billing_created: i64,
    pub email_created: i64,
    pub email_confirmed: i64,
    /// Dedup rows whose event is not in the outbox.
    pub orphans: i64,
    /// Rows of the mails' outbox, those not yet sent, and those whose
    /// event is a notification's (one mail per notification).
    pub mail_rows: i64,
    pub mail_rows_unpublished: i64,
    pub mail_rows_matching: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    counts: Counts,
    /// `SELECT consumer, count(*) FROM processed_messages GROUP BY consumer`.
    processed: BTreeMap<String, i64>,
    /// Ready messages in each main and retry queue.
    queued: BTreeMap<String, u32>,
    /// Consumers of each main queue, and how many there should be (one per
    /// process of that consumer).
    consumers: BTreeMap<String, u32>,
    consumers_expected: BTreeMap<String, u32>,
    /// Distinct `Message-ID`s the SMTP server accepted; `None` where no
    /// SMTP server runs (the mailer is off: mails are not checked).
    arrived: Option<usize>,
}

impl Snapshot {
    fn processed(&self, consumer: &str) -> i64 {
        self.processed.get(consumer).copied().unwrap_or(0)
    }

    /// Everything published, every order confirmed, billing through every
    /// `order.created`, e-mail through every event of both types, nothing
    /// waiting in a queue, every consumer process subscribed, every mail
    /// sent and at the SMTP server.
    fn settled(&self) -> bool {
        let c = &self.counts;
        c.unpublished == 0
            && c.not_confirmed == 0
            && c.confirmed == c.created
            && self.processed(BILLING) == c.created
            && self.processed(EMAIL) == c.outbox
            && self.queued.values().all(|&n| n == 0)
            && self.consumers == self.consumers_expected
            && self.arrived.is_none_or(|arrived| {
                c.mail_rows_unpublished == 0
                    && c.mail_rows == c.notifications
                    && arrived as i64 == c.mail_rows
            })
    }
}

/// What a scenario's final check found.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub orders: i64,
    /// `order.confirmed` rows (all published).
    pub confirmed: i64,
    /// Dedup rows of each consumer.
    pub billing_processed: i64,
    pub email_processed: i64,
    /// Notifications of each event type.
    pub received_mails: i64,
    pub confirmed_mails: i64,
    pub ledger_rows: i64,
    pub lost: i64,
    pub applied_twice: i64,
    pub dead_letters: usize,
    pub settled_in: Duration,
    /// Mails the SMTP server accepted (one per notification), and how many
    /// times one came again (a mailer killed mid-send sends it again).
    pub mails_arrived: usize,
    pub mails_repeated: usize,
    /// The e-mail consumer's applies, in sequence per order?
    pub order: OrderCheck,
    /// The mails' arrivals at the SMTP server, in sequence per order?
    pub mail_order: OrderCheck,
}

impl Verdict {
    /// Both ordering checks passed.
    pub fn in_order(&self) -> bool {
        self.order.passed() && self.mail_order.passed()
    }

    /// The ordering part of the summary line.
    pub fn ordering(&self) -> String {
        format!(
            "{}; {}",
            self.order.summary("order", "events"),
            self.mail_order.summary("mail-order", "mails")
        )
    }
}

pub async fn counts(pool: &PgPool) -> sqlx::Result<Counts> {
    sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM orders) AS orders, \
           (SELECT count(*) FROM orders WHERE status <> 'CONFIRMED') AS not_confirmed, \
           (SELECT coalesce(sum(amount), 0)::bigint FROM orders) AS order_total, \
           (SELECT count(*) FROM outbox) AS outbox, \
           (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished, \
           (SELECT count(*) FROM outbox WHERE event_type = 'order.created') AS created, \
           (SELECT count(DISTINCT aggregate_id) FROM outbox WHERE event_type = 'order.created') \
              AS created_orders, \
           (SELECT count(*) FROM outbox WHERE event_type = 'order.confirmed') AS confirmed, \
           (SELECT count(DISTINCT aggregate_id) FROM outbox WHERE event_type = 'order.confirmed') \
              AS confirmed_orders, \
           (SELECT count(*) FROM outbox x JOIN ledger l \
              ON l.id = (x.payload->'charge'->>'ledgerId')::bigint \
             AND l.order_id::text = x.aggregate_id \
             AND l.amount = (x.payload->'charge'->>'amount')::bigint \
            WHERE x.event_type = 'order.confirmed') AS charges_matching, \
           (SELECT count(*) FROM ledger) AS ledger_rows, \
           (SELECT count(DISTINCT order_id) FROM ledger) AS ledger_orders, \
           (SELECT coalesce(sum(amount), 0)::bigint FROM ledger) AS ledger_total, \
           (SELECT count(*) FROM notifications) AS notifications, \
           (SELECT count(*) FROM notifications WHERE event_type = 'order.created') AS received_mails, \
           (SELECT count(DISTINCT order_id) FROM notifications WHERE event_type = 'order.created') \
              AS received_orders, \
           (SELECT count(*) FROM notifications WHERE event_type = 'order.confirmed') \
              AS confirmed_mails, \
           (SELECT count(DISTINCT order_id) FROM notifications WHERE event_type = 'order.confirmed') \
              AS confirmed_mail_orders, \
           (SELECT count(*) FROM notifications n JOIN outbox x \
              ON x.transaction_id = n.transaction_id \
             AND x.event_type = n.event_type \
             AND x.aggregate_id = n.order_id::text \
            WHERE n.subject = CASE n.event_type \
              WHEN 'order.created' THEN 'Order ' || n.order_id || ' received' \
              WHEN 'order.confirmed' THEN 'Payment confirmed for order ' || n.order_id END) \
              AS mails_matching, \
           (SELECT count(*) FROM processed_messages p JOIN outbox x USING (transaction_id) \
            WHERE p.consumer = $1 AND x.event_type = 'order.created') AS billing_created, \
           (SELECT count(*) FROM processed_messages p JOIN outbox x USING (transaction_id) \
            WHERE p.consumer = $2 AND x.event_type = 'order.created') AS email_created, \
           (SELECT count(*) FROM processed_messages p JOIN outbox x USING (transaction_id) \
            WHERE p.consumer = $2 AND x.event_type = 'order.confirmed') AS email_confirmed, \
           (SELECT count(*) FROM processed_messages p WHERE NOT EXISTS \
              (SELECT 1 FROM outbox o WHERE o.transaction_id = p.transaction_id)) AS orphans, \
           (SELECT count(*) FROM mail_outbox) AS mail_rows, \
           (SELECT count(*) FROM mail_outbox WHERE published_at IS NULL) AS mail_rows_unpublished, \
           (SELECT count(*) FROM mail_outbox m JOIN notifications n \
              ON n.transaction_id = m.transaction_id AND n.event_type = m.event_type \
             AND n.order_id::text = m.aggregate_id) AS mail_rows_matching",
    )
    .bind(BILLING)
    .bind(EMAIL)
    .fetch_one(pool)
    .await
}

/// Orders written but not yet through the whole chain (their
/// `order.created` processed by both consumers, their `order.confirmed`
/// written and processed by e-mail): what a fault right now would catch in
/// flight.
pub async fn unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM ( \
           SELECT x.aggregate_id FROM outbox x \
           LEFT JOIN processed_messages p ON p.transaction_id = x.transaction_id \
           GROUP BY x.aggregate_id \
           HAVING count(p.consumer) FILTER (WHERE x.event_type = 'order.created') < 2 \
               OR count(p.consumer) FILTER (WHERE x.event_type = 'order.confirmed') < 1) u",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// Postgres' clock now, to compare with the rows' timestamps.
pub async fn db_now(pool: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
}

/// Outbox rows not yet published.
pub async fn unpublished(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(pool)
        .await
}

/// Outbox rows marked published in `from..=to` (Postgres' clock).
pub async fn published_between(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at BETWEEN $1 AND $2")
        .bind(from)
        .bind(to)
        .fetch_one(pool)
        .await
}

/// The first moment a row was marked published after `after` (Postgres'
/// clock), if one was.
pub async fn first_published_after(
    pool: &PgPool,
    after: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar("SELECT min(published_at) FROM outbox WHERE published_at > $1")
        .bind(after)
        .fetch_one(pool)
        .await
}

/// Orders never answered 202 (their ids are not in `accepted`): how many
/// were written, how many of them after `after`, and the last one's time.
pub async fn written_without_202(
    pool: &PgPool,
    accepted: &[Uuid],
    after: DateTime<Utc>,
) -> sqlx::Result<(i64, i64, Option<DateTime<Utc>>)> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE created_at > $2), max(created_at) \
         FROM orders WHERE id <> ALL($1::uuid[])",
    )
    .bind(accepted)
    .bind(after)
    .fetch_one(pool)
    .await
}

/// The orders written by `$1` (Postgres' clock) and not yet through the
/// whole chain: their `order.created` processed by both consumers, their
/// `order.confirmed` written, published and processed by e-mail. One
/// definition for the backlog and the stuck-order report.
macro_rules! unfinished_orders_by {
    () => {
        "SELECT o.id FROM orders o \
         JOIN outbox x ON x.aggregate_id = o.id::text \
         LEFT JOIN processed_messages p ON p.transaction_id = x.transaction_id \
         WHERE o.created_at <= $1 GROUP BY o.id \
         HAVING count(p.consumer) FILTER (WHERE x.event_type = 'order.created') < 2 \
             OR count(p.consumer) FILTER (WHERE x.event_type = 'order.confirmed') < 1"
    };
}

/// The backlog left of what was written up to `until` (Postgres' clock):
/// outbox rows written by then and not yet published (the relay's part), and
/// orders written by then and not yet through the whole chain (their
/// `order.created` processed by both consumers, their `order.confirmed`
/// written, published and processed by e-mail).
pub async fn backlog_until(pool: &PgPool, until: DateTime<Utc>) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(concat!(
        "SELECT \
           (SELECT count(*) FROM outbox WHERE created_at <= $1 AND published_at IS NULL), \
           (SELECT count(*) FROM (",
        unfinished_orders_by!(),
        ") u)"
    ))
    .bind(until)
    .fetch_one(pool)
    .await
}

/// One event of a stuck order: the order, its type, its place, the
/// consumers that applied it, the e-mail consumer's place for the order,
/// and whether it is held.
type StuckEvent = (
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

/// Up to `limit` orders written by `until` and not through the whole
/// chain, each with its events: which consumers applied them, and what
/// the in-sequence e-mail consumer holds or last applied of the order.
pub async fn stuck_orders(pool: &PgPool, until: DateTime<Utc>, limit: i64) -> String {
    let rows: sqlx::Result<Vec<StuckEvent>> = sqlx::query_as(concat!(
        "WITH stuck AS (SELECT id::text AS id FROM (",
        unfinished_orders_by!(),
        " LIMIT $2) u) \
             SELECT s.id, x.event_type, x.seq, \
               (SELECT string_agg(p.consumer, ',') FROM processed_messages p \
                  WHERE p.transaction_id = x.transaction_id), \
               (SELECT max(a.last_seq) FROM inbox_aggregates a \
                  WHERE a.aggregate_id = s.id), \
               (SELECT count(*) FROM inbox_held h WHERE h.transaction_id = x.transaction_id) \
             FROM stuck s JOIN outbox x ON x.aggregate_id = s.id ORDER BY s.id, x.seq"
    ))
    .bind(until)
    .bind(limit)
    .fetch_all(pool)
    .await;
    match rows {
        Err(error) => format!("stuck orders not read: {error}"),
        Ok(rows) => rows
            .into_iter()
            .map(|(order, event, seq, applied_by, last_seq, held)| {
                format!(
                    "order {order} {event} seq {seq:?}: applied by {}, e-mail place {last_seq:?}, held {}",
                    applied_by.unwrap_or_else(|| "none".into()),
                    held.unwrap_or(0)
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// `order.confirmed` rows whose id is not the one derived from their
/// order's `order.created` id (UUIDv5 of it and "order.confirmed"), as
/// `(created id, confirmed id)`; an order confirmed without its
/// `order.created` row shows with a nil created id.
async fn misderived_confirmations(pool: &PgPool) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    let pairs: Vec<(Option<Uuid>, Uuid)> = sqlx::query_as(
        "SELECT o.transaction_id, c.transaction_id FROM outbox c \
         LEFT JOIN outbox o ON o.aggregate_id = c.aggregate_id AND o.event_type = 'order.created' \
         WHERE c.event_type = 'order.confirmed'",
    )
    .fetch_all(pool)
    .await?;
    Ok(pairs
        .into_iter()
        .map(|(created, confirmed)| (created.unwrap_or_default(), confirmed))
        .filter(|(created, confirmed)| {
            Uuid::new_v5(created, ORDER_CONFIRMED.as_bytes()) != *confirmed
        })
        .collect())
}

async fn snapshot(stack: &Stack) -> Result<Snapshot, String> {
    let counts = counts(&stack.pool).await.map_err(|e| e.to_string())?;
    let processed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT consumer, count(*) FROM processed_messages GROUP BY consumer ORDER BY consumer",
    )
    .fetch_all(&stack.pool)
    .await
    .map_err(|e| e.to_string())?;
    let mut queued = BTreeMap::new();
    let mut consumers = BTreeMap::new();
    let depths = queue_depths(stack, false)
        .await
        .map_err(|e| e.to_string())?;
    for (queue, n, subscribed) in depths {
        if !queue.contains(".retry.") {
            consumers.insert(queue.clone(), subscribed);
        }
        queued.insert(queue, n);
    }
    let arrived = stack.mailbox().map(|mailbox| {
        read_mailbox(mailbox)
            .into_iter()
            .map(|m| m.message_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    });
    Ok(Snapshot {
        counts,
        processed: processed.into_iter().collect(),
        queued,
        consumers,
        consumers_expected: consumers_expected(stack),
        arrived,
    })
}

/// One consumer per process of each consumer role the stack runs, on its
/// main queue.
fn consumers_expected(stack: &Stack) -> BTreeMap<String, u32> {
    let mut expected = BTreeMap::new();
    for &role in stack.processes.all() {
        let consumer = match role.kind() {
            Role::Billing => BILLING,
            Role::Email => EMAIL,
            _ => continue,
        };
        *expected
            .entry(QueueNames::new(&stack.amqp, consumer).main)
            .or_insert(0) += 1;
    }
    expected
}

/// Ready messages and consumers per queue (a passive declare), main and
/// retry queues, or the dead-letter queues.
async fn queue_depths(stack: &Stack, dlq: bool) -> Result<Vec<(String, u32, u32)>, lapin::Error> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut depths = Vec::new();
    for consumer in SUBSCRIPTIONS.iter().map(|s| s.consumer) {
        let names = QueueNames::new(&stack.amqp, consumer);
        let queues: Vec<String> = if dlq {
            vec![names.dlq]
        } else {
            let retries = names.retries.into_iter().map(|(q, _)| q);
            std::iter::once(names.main).chain(retries).collect()
        };
        for queue in queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            depths.push((queue, declared.message_count(), declared.consumer_count()));
        }
    }
    let _ = connection.close(200, "faults check".into()).await;
    Ok(depths)
}

/// Samples the ready messages of one consumer's main queue over a
/// connection of its own.
pub struct QueueProbe {
    connection: Connection,
    channel: lapin::Channel,
    pub queue: String,
}

impl QueueProbe {
    pub async fn open(stack: &Stack, consumer: &str) -> Self {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("connecting to RabbitMQ");
        let channel = connection.create_channel().await.expect("a channel");
        Self {
            connection,
            channel,
            queue: QueueNames::new(&stack.amqp, consumer).main,
        }
    }

    /// Ready messages in the queue now (a passive declare).
    pub async fn depth(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declaring {} passively: {e}", self.queue))
            .message_count()
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "faults probe".into()).await;
    }
}

/// Waits (at most [`SETTLE_DEADLINE`]) until the settled state has held for
/// [`QUIET`], failing early if a role died; then checks every invariant.
pub async fn settle_and_verify(stack: &mut Stack, load: &LoadReport) -> Verdict {
    let started = Instant::now();
    let mut stable: Option<(Snapshot, Instant)> = None;
    let last = loop {
        let crashed = stack.processes.exited();
        assert!(
            crashed.is_empty(),
            "a role crashed instead of recovering: {crashed:?}\n{}",
            stack.processes.diagnostics()
        );
        match snapshot(stack).await {
            Ok(now) if now.settled() => {
                let unchanged = stable.as_ref().is_some_and(|(since, _)| *since == now);
                if !unchanged {
                    stable = Some((now, Instant::now()));
                } else if stable.as_ref().is_some_and(|(_, at)| at.elapsed() >= QUIET) {
                    break now;
                }
            }
            now => {
                stable = None;
                assert!(
                    started.elapsed() < SETTLE_DEADLINE,
                    "the system did not settle within {SETTLE_DEADLINE:?}; last state: {now:#?}\n{}",
                    stack.processes.diagnostics()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settled_in = started.elapsed() - QUIET;
    let context = format!("{last:#?}\n{}", stack.processes.diagnostics());
    let c = &last.counts;

    let lost: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::uuid[]) AS a(id) \
         WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = a.id)",
    )
    .bind(&load.accepted)
    .fetch_one(&stack.pool)
    .await
    .expect("counting lost orders");
    assert_eq!(lost, 0, "orders answered 202 are missing\n{context}");
    assert!(
        load.unexpected.is_empty(),
        "valid orders got unexpected answers: {:?}",
        load.unexpected
    );
    let o = c.orders;
    assert_eq!(
        (c.created, c.created_orders),
        (o, o),
        "one order.created outbox row per order\n{context}"
    );
    assert_eq!(
        (c.confirmed, c.confirmed_orders),
        (o, o),
        "exactly one order.confirmed outbox row per order\n{context}"
    );
    assert_eq!(c.outbox, 2 * o, "no other outbox rows\n{context}");
    assert_eq!(c.unpublished, 0, "every outbox row published\n{context}");
    let misderived = misderived_confirmations(&stack.pool)
        .await
        .expect("reading the confirmation ids");
    assert!(
        misderived.is_empty(),
        "order.confirmed ids are UUIDv5(order.created id, \"order.confirmed\"); \
         (created, confirmed) pairs that are not: {misderived:?}\n{context}"
    );
    assert_eq!(
        c.charges_matching, o,
        "each order.confirmed carries its order's ledger row and amount\n{context}"
    );
    assert_eq!(
        (last.processed(BILLING), c.billing_created),
        (o, o),
        "billing processed every order.created exactly once, and nothing else\n{context}"
    );
    assert_eq!(
        (last.processed(EMAIL), c.email_created, c.email_confirmed),
        (2 * o, o, o),
        "e-mail processed every order.created and every order.confirmed exactly once\n{context}"
    );
    assert_eq!(last.processed.len(), 2, "only our two consumers\n{context}");
    assert_eq!(c.orphans, 0, "dedup rows match outbox events\n{context}");
    assert_eq!(
        (c.ledger_rows, c.ledger_orders),
        (o, o),
        "one ledger row per order\n{context}"
    );
    assert_eq!(c.ledger_total, c.order_total, "ledger total\n{context}");
    assert_eq!(c.not_confirmed, 0, "every order CONFIRMED\n{context}");
    assert_eq!(
        (c.received_mails, c.received_orders),
        (o, o),
        "one \"order received\" notification per order\n{context}"
    );
    assert_eq!(
        (c.confirmed_mails, c.confirmed_mail_orders),
        (o, o),
        "one \"payment confirmed\" notification per order\n{context}"
    );
    assert_eq!(
        (c.notifications, c.mails_matching),
        (2 * o, 2 * o),
        "two notifications per order, each for its own event with its subject\n{context}"
    );
    assert_eq!(
        stack.processes.pids().len(),
        stack.processes.all().len(),
        "every role's process runs (two relays, two e-mail consumers)\n{context}"
    );
    let (arrivals, mails_repeated) = match stack.mailbox() {
        Some(mailbox) => {
            assert_eq!(
                (c.mail_rows, c.mail_rows_matching),
                (2 * o, 2 * o),
                "one mail per notification, under its event's id\n{context}"
            );
            let (arrivals, repeated) = order::arrived(&stack.pool, mailbox)
                .await
                .expect("reading the mailbox and the outbox");
            let strangers = arrivals.iter().filter(|s| s.order.is_empty()).count();
            assert_eq!(
                (arrivals.len() as i64, strangers),
                (c.mail_rows, 0),
                "every mail reached the SMTP server, and no other\n{context}"
            );
            (arrivals, repeated)
        }
        None => (Vec::new(), 0),
    };
    let applied = order::applied(&stack.pool)
        .await
        .expect("reading the notifications in apply order");
    let dead_letters = check_dead_letters(stack, &context).await;
    Verdict {
        orders: o,
        confirmed: c.confirmed,
        billing_processed: last.processed(BILLING),
        email_processed: last.processed(EMAIL),
        received_mails: c.received_mails,
        confirmed_mails: c.confirmed_mails,
        ledger_rows: c.ledger_rows,
        lost,
        applied_twice: (c.ledger_rows - c.ledger_orders)
            + (c.confirmed - c.confirmed_orders)
            + (c.received_mails - c.received_orders)
            + (c.confirmed_mails - c.confirmed_mail_orders),
        dead_letters,
        settled_in,
        mails_arrived: arrivals.len(),
        mails_repeated,
        order: order::check(&applied),
        mail_order: order::check(&arrivals),
    }
}

/// The dead-letter queues should be empty. A dead letter is accounted for
/// only if its event was nevertheless processed by that consumer (e.g. a
/// duplicate copy); anything else would be an order left behind.
async fn check_dead_letters(stack: &Stack, context: &str) -> usize {
    let depths = queue_depths(stack, true)
        .await
        .expect("counting dead letters");
    let total: u32 = depths.iter().map(|(_, n, _)| n).sum();
    if total == 0 {
        return 0;
    }
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    let mut unaccounted = Vec::new();
    for consumer in SUBSCRIPTIONS.iter().map(|s| s.consumer) {
        let dlq = QueueNames::new(&stack.amqp, consumer).dlq;
        while let Some(got) = channel
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic_get")
        {
            let id = got
                .delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| Uuid::parse_str(id.as_str()).ok());
            let processed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM processed_messages WHERE consumer = $1 AND transaction_id = $2",
            )
            .bind(consumer)
            .bind(id)
            .fetch_one(&stack.pool)
            .await
            .expect("looking up a dead letter");
            if processed != 1 {
                unaccounted.push(format!("{dlq}: {id:?} {:?}", got.delivery.properties));
            }
        }
    }
    let _ = connection.close(200, "faults check".into()).await;
    assert!(
        unaccounted.is_empty(),
        "dead letters not accounted for: {unaccounted:#?}\n{context}"
    );
    total as usize
}

/// Dead letters in `consumer`'s DLQ (a passive declare).
pub async fn dlq_depth(stack: &Stack, consumer: &str) -> u32 {
    let dlq = QueueNames::new(&stack.amqp, consumer).dlq;
    queue_depths(stack, true)
        .await
        .expect("counting dead letters")
        .into_iter()
        .find(|(queue, _, _)| *queue == dlq)
        .map_or(0, |(_, n, _)| n)
}

/// The events of the orders of `product`: (event id, event type, order).
pub async fn events_of_product(
    pool: &PgPool,
    product: &str,
) -> sqlx::Result<Vec<(Uuid, String, Uuid)>> {
    sqlx::query_as(
        "SELECT x.transaction_id, x.event_type, o.id FROM orders o \
         JOIN outbox x ON x.aggregate_id = o.id::text \
         WHERE o.product_id = $1 ORDER BY o.id, x.id",
    )
    .bind(product)
    .fetch_all(pool)
    .await
}

/// Orders of other products than `product`, written up to `until`
/// (Postgres' clock), whose two notifications are not both there yet.
pub async fn others_unfinished(
    pool: &PgPool,
    product: &str,
    until: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM orders o \
         WHERE o.product_id <> $1 AND o.created_at <= $2 \
           AND (SELECT count(*) FROM notifications n WHERE n.order_id = o.id) < 2",
    )
    .bind(product)
    .bind(until)
    .fetch_one(pool)
    .await
}

/// The e-mail consumer's notifications of each order of `product`, their
/// event types in apply order.
pub async fn applied_of_product(
    pool: &PgPool,
    product: &str,
) -> sqlx::Result<BTreeMap<Uuid, Vec<String>>> {
    let rows: Vec<(Uuid, Vec<String>)> = sqlx::query_as(
        "SELECT o.id, coalesce(array_agg(n.event_type ORDER BY n.id) \
                  FILTER (WHERE n.id IS NOT NULL), '{}') \
         FROM orders o LEFT JOIN notifications n ON n.order_id = o.id \
         WHERE o.product_id = $1 GROUP BY o.id",
    )
    .bind(product)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Outbox rows published from a WAL relay's slot (`published_at` stays
/// `'infinity'`) and rows the polling relays marked published.
pub async fn published_by_mode(pool: &PgPool) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE published_at = 'infinity'), \
           count(*) FILTER (WHERE published_at < 'infinity') FROM outbox",
    )
    .fetch_one(pool)
    .await
}
