//! Bounded tables: one task per role deletes what it owns past its
//! retention (published outbox rows, a consumer's dedup rows, idempotency
//! keys), in bounded batches, at least once a minute. A failure is logged
//! and tried again at the next round; nothing waits on it.

use std::time::Duration;

use sqlx::{PgPool, SqlStr};
use tokio_util::sync::CancellationToken;

use crate::outbox::store::Table;
use crate::shutdown::sleep_or_cancel;

/// Rows deleted per statement: short transactions, short locks.
pub const PRUNE_BATCH: i64 = 1_000;

/// One table's pruning: a `DELETE` of at most `$2` rows older than `$1`
/// seconds (and of key `$3`, when the statement has one).
#[derive(Debug, Clone)]
pub struct Prune {
    /// What is pruned, for the logs.
    pub what: &'static str,
    pub statement: SqlStr,
    pub retention: Duration,
    pub key: Option<&'static str>,
    /// Rows per statement ([`PRUNE_BATCH`]).
    pub batch: i64,
}

/// The published rows of the outbox `table` (the events', or the mails').
pub fn published(table: &Table, retention: Duration) -> Prune {
    Prune {
        what: table.name,
        statement: table.prune_statement(),
        retention,
        key: None,
        batch: PRUNE_BATCH,
    }
}

/// The dedup rows of `consumer` (the `processed_messages` index on
/// `(consumer, processed_at)` keeps this a range scan).
pub fn dedup(consumer: &'static str, retention: Duration) -> Prune {
    Prune {
        what: "dedup rows",
        statement: SqlStr::from_static(
            "DELETE FROM processed_messages WHERE (consumer, transaction_id) IN ( \
             SELECT consumer, transaction_id FROM processed_messages \
             WHERE consumer = $3 AND processed_at < now() - make_interval(secs => $1) \
             ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        retention,
        key: Some(consumer),
        batch: PRUNE_BATCH,
    }
}

/// Idempotency keys.
pub fn idempotency_keys(retention: Duration) -> Prune {
    Prune {
        what: "idempotency keys",
        statement: SqlStr::from_static(
            "DELETE FROM idempotency_keys WHERE key IN ( \
             SELECT key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        retention,
        key: None,
        batch: PRUNE_BATCH,
    }
}

impl Prune {
    /// This prune, `batch` rows per statement.
    pub fn with_batch(self, batch: i64) -> Self {
        Self { batch, ..self }
    }

    /// Deletes everything past the retention, a batch at a time; returns how
    /// many rows went.
    pub async fn run_once(&self, pool: &PgPool) -> sqlx::Result<u64> {
        self.run_until(pool, &CancellationToken::new()).await
    }

    /// [`Prune::run_once`], stopping between batches once `cancel` fires, so
    /// a large first prune does not hold up a shutdown.
    async fn run_until(&self, pool: &PgPool, cancel: &CancellationToken) -> sqlx::Result<u64> {
        let mut total = 0;
        while !cancel.is_cancelled() {
            let mut query = sqlx::query(self.statement.clone())
                .bind(self.retention.as_secs_f64())
                .bind(self.batch);
            if let Some(key) = self.key {
                query = query.bind(key);
            }
            let deleted = query.execute(pool).await?.rows_affected();
            total += deleted;
            if (deleted as i64) < self.batch {
                break;
            }
        }
        Ok(total)
    }
}

/// Runs every prune each `interval` until `cancel` fires.
pub async fn run(pool: PgPool, prunes: Vec<Prune>, interval: Duration, cancel: CancellationToken) {
    loop {
        for prune in &prunes {
            match prune.run_until(&pool, &cancel).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(rows, what = prune.what, "pruned"),
                Err(error) => {
                    tracing::warn!(%error, what = prune.what, "pruning failed; will retry")
                }
            }
        }
        if !sleep_or_cancel(interval, &cancel).await {
            return;
        }
    }
}
