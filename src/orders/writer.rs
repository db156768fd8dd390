//! Group commit for new orders. Requests that arrive together share one
//! transaction: each order is still written with its outbox row in the same
//! transaction, and each client is answered only after that commit. Under
//! load this turns many small commits (each waiting for its own WAL flush)
//! into a few larger ones. With one request at a time it is one transaction
//! per order, as before.

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, SqlSafeStr, SqlStr};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use crate::db::ErrorKind;
use crate::orders::{EVENTS, NewOrder, OrderEvent};
use outbox::{NewOutboxEvent, Wake};

/// Orders per shared transaction at most.
const MAX_BATCH: usize = 64;
/// Transactions in flight at once (one collects while another commits).
const WRITERS: usize = 4;

/// An order to write, and what its `order.created` outbox row needs.
struct NewRow {
    order_id: Uuid,
    order: NewOrder,
    /// The request's trace context, stored with the outbox row.
    trace_headers: serde_json::Value,
}

/// One order waiting for its commit.
struct Job {
    row: NewRow,
    reply: oneshot::Sender<Result<(), sqlx::Error>>,
}

/// The queue of orders to write. Cloned into the API state; the writer tasks
/// stop once every clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct OrderWriter {
    jobs: mpsc::Sender<Job>,
}

impl OrderWriter {
    /// Starts the writer tasks; `wake` is signalled after each commit, before
    /// the clients are answered, so the relay starts on the new rows at once.
    pub fn start(pool: PgPool, wake: Wake) -> Self {
        let (jobs, receiver) = mpsc::channel::<Job>(1024);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..WRITERS {
            tokio::spawn(write_batches(pool.clone(), receiver.clone(), wake.clone()));
        }
        Self { jobs }
    }

    /// Writes the order and its `order.created` outbox row; returns once they
    /// are committed.
    pub async fn write(
        &self,
        order_id: Uuid,
        order: NewOrder,
        trace_headers: serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            row: NewRow {
                order_id,
                order,
                trace_headers,
            },
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::WorkerCrashed)?
    }
}

/// Takes whatever is queued (up to `MAX_BATCH`) and writes it in one
/// transaction; never waits for more to arrive, so an idle system adds no delay.
async fn write_batches(pool: PgPool, receiver: Arc<Mutex<mpsc::Receiver<Job>>>, wake: Wake) {
    loop {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        {
            let mut receiver = receiver.lock().await;
            match receiver.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        // A request that has already been answered (its timeout's 503) is
        // not written: its client was told the order failed and may retry.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        match write_retrying(&pool, &batch).await {
            Ok(()) => {
                wake.notify();
                for job in batch {
                    let _ = job.reply.send(Ok(()));
                }
            }
            // One bad order must not fail the others: write each alone. Any
            // other failure (Postgres unreachable) would fail each alone too.
            Err(error) if batch.len() > 1 && crate::db::classify(&error) == ErrorKind::Refused => {
                for job in batch {
                    if job.reply.is_closed() {
                        continue;
                    }
                    let result = write_retrying(&pool, std::slice::from_ref(&job)).await;
                    if result.is_ok() {
                        wake.notify();
                    }
                    let _ = job.reply.send(result);
                }
            }
            Err(error) => {
                let mut jobs = batch.into_iter();
                let first = jobs.next().expect("a batch is never empty");
                for job in jobs {
                    let _ = job.reply.send(Err(same_kind(&error)));
                }
                let _ = first.reply.send(Err(error));
            }
        }
    }
}

/// The event announcing a new order, and its outbox row.
pub fn order_created(
    order_id: Uuid,
    order: &NewOrder,
    at: DateTime<Utc>,
    trace_headers: serde_json::Value,
) -> NewOutboxEvent {
    OrderEvent {
        transaction_id: Uuid::new_v4(),
        order_id,
        product_id: order.product_id.clone(),
        user_id: order.user_id.clone(),
        amount: order.amount,
        timestamp: at,
    }
    .created_row(trace_headers)
}

/// [`write_together`], tried again when the connection it ran on failed.
/// Pooled connections in steady use are not pinged before use, and after a
/// Postgres restart every idle one is dead: each try takes the next one (the
/// pool closes the dead), at most as many tries as the pool holds. Safe: the
/// statement is atomic, and the order ids are this batch's own, so a retry
/// that finds them taken means the lost try did commit: that is success.
async fn write_retrying(pool: &PgPool, batch: &[Job]) -> Result<(), sqlx::Error> {
    let rows: Vec<&NewRow> = batch.iter().map(|job| &job.row).collect();
    let mut tries = 0;
    loop {
        let result = async { write_together(&mut *pool.acquire().await?, &rows).await }.await;
        match result {
            Err(error)
                if crate::db::classify(&error) == ErrorKind::ConnectionLost
                    && tries < pool.size() =>
            {
                tracing::debug!(%error, "connection lost while writing orders; trying another");
                tries += 1;
            }
            Err(error) if tries > 0 && already_written(&error) => {
                tracing::debug!("the write whose connection was lost had committed");
                return Ok(());
            }
            result => return result,
        }
    }
}

/// An error of the same kind as `error` (sqlx's errors cannot be cloned),
/// so that each request of a failed batch gets the answer its cause calls for.
fn same_kind(error: &sqlx::Error) -> sqlx::Error {
    match crate::db::classify(error) {
        ErrorKind::Unavailable => sqlx::Error::PoolTimedOut,
        ErrorKind::ConnectionLost => sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            error.to_string(),
        )),
        ErrorKind::Refused | ErrorKind::Other => sqlx::Error::Protocol(error.to_string()),
    }
}

/// The orders' primary key, or their events' places (the first of each
/// new order), refused an id: on a retry, the earlier try's.
fn already_written(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.is_unique_violation()
            && matches!(db.constraint(), Some("orders_pkey" | "outbox_aggregate_seq_key")))
}

/// The orders and their outbox rows in ONE statement: on a pooled
/// connection it is a transaction of its own, without a `BEGIN` or `COMMIT`
/// round trip; on a transaction it is part of it. All the orders and all
/// their outbox rows are written together or not at all.
async fn write_together(conn: &mut PgConnection, rows: &[&NewRow]) -> Result<(), sqlx::Error> {
    let now = Utc::now();
    let events: Vec<NewOutboxEvent> = rows
        .iter()
        .map(|r| order_created(r.order_id, &r.order, now, r.trace_headers.clone()))
        .collect();
    let orders = sqlx::query(WRITE_TOGETHER.clone())
        .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.order.product_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.order.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.order.amount).collect::<Vec<_>>())
        .bind(now);
    EVENTS
        .bind_new_aggregates(orders, &events)
        .execute(conn)
        .await?;
    Ok(())
}

/// The orders (`$1` to `$5`) in a CTE, then the outbox crate's own insert
/// of their rows (`$6` on), built once. Each order is new, and so is its
/// aggregate: its `order.created` is numbered 1 with no lock to take and
/// no row to read.
static WRITE_TOGETHER: LazyLock<SqlStr> = LazyLock::new(|| {
    let sql = EVENTS.new_aggregates_statement(
        6,
        "new_orders AS ( \
             INSERT INTO orders (id, product_id, user_id, amount, created_at, updated_at) \
             SELECT id, product_id, user_id, amount, $5, $5 \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[]) AS t(id, product_id, user_id, amount))",
    );
    AssertSqlSafe(sql).into_sql_str()
});

/// Writes one order and its outbox row on `conn` (the caller's transaction),
/// with the same statement as the group commits.
pub async fn write_one(
    conn: &mut PgConnection,
    order_id: Uuid,
    order: NewOrder,
    trace_headers: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let row = NewRow {
        order_id,
        order,
        trace_headers,
    };
    write_together(conn, &[&row]).await
}
