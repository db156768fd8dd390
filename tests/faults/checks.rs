//! After the faults: wait until the system has settled, then check that no
//! accepted order was lost and no event was applied twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use order_service::amqp::{BILLING, CONSUMERS, EMAIL, QueueNames};
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::LoadReport;
use crate::stack::{AMQP_URL, Stack};

/// How long the system may take to drain after the last fault.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);
/// The settled state must hold unchanged this long: longer than the
/// longest retry delay (500 ms), so a late redelivery would show.
const QUIET: Duration = Duration::from_millis(1500);

/// The counts every check is made of, read in one statement.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Counts {
    pub orders: i64,
    pub not_confirmed: i64,
    pub order_total: i64,
    pub outbox: i64,
    pub unpublished: i64,
    pub ledger_rows: i64,
    pub ledger_orders: i64,
    pub ledger_total: i64,
    pub notifications: i64,
    pub notified_orders: i64,
    /// Dedup rows whose event is not in the outbox.
    pub orphans: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    counts: Counts,
    /// `SELECT consumer, count(*) FROM processed_messages GROUP BY consumer`.
    processed: BTreeMap<String, i64>,
    /// Ready messages in each main and retry queue.
    queued: BTreeMap<String, u32>,
}

impl Snapshot {
    fn processed(&self, consumer: &str) -> i64 {
        self.processed.get(consumer).copied().unwrap_or(0)
    }

    /// Everything published, every event processed by both consumers,
    /// nothing waiting in a queue.
    fn settled(&self) -> bool {
        let c = &self.counts;
        c.unpublished == 0
            && c.not_confirmed == 0
            && CONSUMERS.iter().all(|q| self.processed(q) == c.outbox)
            && self.queued.values().all(|&n| n == 0)
    }
}

/// What a scenario's final check found.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub orders: i64,
    pub lost: i64,
    pub applied_twice: i64,
    pub dead_letters: usize,
    pub settled_in: Duration,
}

pub async fn counts(pool: &PgPool) -> sqlx::Result<Counts> {
    sqlx::query_as(
        "SELECT \
           (SELECT count(*) FROM orders) AS orders, \
           (SELECT count(*) FROM orders WHERE status <> 'CONFIRMED') AS not_confirmed, \
           (SELECT coalesce(sum(amount), 0)::bigint FROM orders) AS order_total, \
           (SELECT count(*) FROM outbox) AS outbox, \
           (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS unpublished, \
           (SELECT count(*) FROM ledger) AS ledger_rows, \
           (SELECT count(DISTINCT order_id) FROM ledger) AS ledger_orders, \
           (SELECT coalesce(sum(amount), 0)::bigint FROM ledger) AS ledger_total, \
           (SELECT count(*) FROM notifications) AS notifications, \
           (SELECT count(DISTINCT order_id) FROM notifications) AS notified_orders, \
           (SELECT count(*) FROM processed_messages p WHERE NOT EXISTS \
              (SELECT 1 FROM outbox o WHERE o.transaction_id = p.transaction_id)) AS orphans",
    )
    .fetch_one(pool)
    .await
}

/// Orders written but not yet processed by both consumers: what a fault
/// right now would catch in flight.
pub async fn unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox o WHERE \
           (SELECT count(*) FROM processed_messages p WHERE p.transaction_id = o.transaction_id) < 2",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
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
    let depths = queue_depths(stack, false)
        .await
        .map_err(|e| e.to_string())?;
    for (queue, n) in depths {
        queued.insert(queue, n);
    }
    Ok(Snapshot {
        counts,
        processed: processed.into_iter().collect(),
        queued,
    })
}

/// Ready messages per queue (a passive declare), main and retry queues, or
/// the dead-letter queues.
async fn queue_depths(stack: &Stack, dlq: bool) -> Result<Vec<(String, u32)>, lapin::Error> {
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut depths = Vec::new();
    for consumer in CONSUMERS {
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
            depths.push((queue, declared.message_count()));
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
        let crashed = stack.exited();
        assert!(
            crashed.is_empty(),
            "a role crashed instead of recovering: {crashed:?}\n{}",
            stack.diagnostics()
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
                    stack.diagnostics()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settled_in = started.elapsed() - QUIET;
    let context = format!("{last:#?}\n{}", stack.diagnostics());
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
    assert_eq!(c.outbox, c.orders, "one outbox row per order\n{context}");
    assert_eq!(c.unpublished, 0, "every outbox row published\n{context}");
    for consumer in [EMAIL, BILLING] {
        assert_eq!(
            last.processed(consumer),
            c.outbox,
            "{consumer} processed every event exactly once\n{context}"
        );
    }
    assert_eq!(last.processed.len(), 2, "only our two consumers\n{context}");
    assert_eq!(c.orphans, 0, "dedup rows match outbox events\n{context}");
    assert_eq!(
        (c.ledger_rows, c.ledger_orders),
        (c.orders, c.orders),
        "one ledger row per order\n{context}"
    );
    assert_eq!(c.ledger_total, c.order_total, "ledger total\n{context}");
    assert_eq!(c.not_confirmed, 0, "every order CONFIRMED\n{context}");
    assert_eq!(
        (c.notifications, c.notified_orders),
        (c.orders, c.orders),
        "one notification per order\n{context}"
    );
    let dead_letters = check_dead_letters(stack, &context).await;
    Verdict {
        orders: c.orders,
        lost,
        applied_twice: (c.ledger_rows - c.ledger_orders) + (c.notifications - c.notified_orders),
        dead_letters,
        settled_in,
    }
}

/// The dead-letter queues should be empty. A dead letter is accounted for
/// only if its event was nevertheless processed by that consumer (e.g. a
/// duplicate copy); anything else would be an order left behind.
async fn check_dead_letters(stack: &Stack, context: &str) -> usize {
    let depths = queue_depths(stack, true)
        .await
        .expect("counting dead letters");
    let total: u32 = depths.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return 0;
    }
    let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    let mut unaccounted = Vec::new();
    for consumer in CONSUMERS {
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
