//! The service's pruning: the outbox crate's prunes of its tables, the inbox
//! crate's of the dedup rows, and the API's idempotency keys, run by
//! [`outbox_common::prune::run`].

use std::time::Duration;

use outbox_common::prune::Prune;
use sqlx::SqlStr;

pub use outbox_common::prune::{PRUNE_BATCH, run};

/// Idempotency keys older than `retention`.
pub fn idempotency_keys(retention: Duration) -> Prune {
    Prune::new(
        "idempotency keys",
        SqlStr::from_static(
            "DELETE FROM idempotency_keys WHERE key IN ( \
             SELECT key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        ),
        retention,
    )
}
