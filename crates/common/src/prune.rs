//! Bounded tables: one task per role deletes what it owns past its
//! retention (published outbox rows, a consumer's dedup rows, a service's
//! own tables), in bounded batches, at least once a minute. A failure is logged
//! and tried again at the next round; nothing waits on it.

use std::time::Duration;

use sqlx::{PgPool, SqlStr};
use tokio_util::sync::CancellationToken;

use crate::shutdown::sleep_or_cancel;

/// Rows deleted per statement: short transactions, short locks.
pub const PRUNE_BATCH: i64 = 1_000;

/// One table's pruning: a `DELETE` of at most `$2` rows older than `$1`
/// seconds (and of key `$3`, when it has one). The outbox crate makes the
/// prunes of its tables, the inbox crate those of its dedup rows; a service
/// adds its own.
#[derive(Debug, Clone)]
pub struct Prune {
    what: &'static str,
    statement: SqlStr,
    retention: Duration,
    key: Option<&'static str>,
    batch: i64,
}

impl Prune {
    /// Deletes with `statement` (`$1`: the retention in seconds, `$2`: the
    /// batch) what is older than `retention`; `what` names it in the logs.
    pub fn new(what: &'static str, statement: SqlStr, retention: Duration) -> Self {
        Self {
            what,
            statement,
            retention,
            key: None,
            batch: PRUNE_BATCH,
        }
    }

    /// Binds `key` as `$3` (a consumer's name, say).
    pub fn with_key(self, key: &'static str) -> Self {
        Self {
            key: Some(key),
            ..self
        }
    }

    /// This prune, `batch` rows per statement (default [`PRUNE_BATCH`]).
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
