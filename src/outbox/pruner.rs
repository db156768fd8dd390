//! The pruner: a task of its own that deletes published outbox rows past
//! their retention, in bounded batches, once a minute. A failure is logged
//! and tried again at the next round.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::store;
use crate::shutdown::sleep_or_cancel;

/// How often the pruner runs.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes published rows older than `retention_secs`, `batch` at a time,
/// until none is left; returns how many went.
pub async fn prune_published(pool: &PgPool, retention_secs: i64, batch: i64) -> sqlx::Result<u64> {
    let mut total = 0;
    loop {
        let mut conn = pool.acquire().await?;
        let deleted = store::prune_published(&mut conn, retention_secs, batch).await?;
        total += deleted;
        if (deleted as i64) < batch {
            return Ok(total);
        }
    }
}

/// Prunes every [`PRUNE_INTERVAL`] until `cancel` fires.
pub async fn run(pool: PgPool, retention_secs: i64, batch: i64, cancel: CancellationToken) {
    loop {
        match prune_published(&pool, retention_secs, batch).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "pruned published outbox rows"),
            Err(error) => tracing::warn!(%error, "pruning the outbox failed; will retry"),
        }
        if !sleep_or_cancel(PRUNE_INTERVAL, &cancel).await {
            return;
        }
    }
}
