//! The transactional outbox: rows written with the business change
//! ([`store`]), the [`relay`] that publishes them with confirms, and the
//! wake-up signals that let the relay react within milliseconds of a commit.

pub mod relay;
pub mod store;

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The channel a cross-process relay listens on.
pub const NOTIFY_CHANNEL: &str = "outbox_wake";

/// An in-process wake-up for the relay. Notifications coalesce: many commits
/// while the relay is busy leave one pending wake-up.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    pub fn notify(&self) {
        self.0.notify_one();
    }

    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

/// For an API running without an in-process relay: turns wake-ups into a
/// Postgres `NOTIFY`, sent outside the order transactions (a NOTIFY inside
/// them would serialise every commit) and coalesced to one per burst.
pub async fn forward_wakes_as_notify(pool: PgPool, wake: Wake, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
        }
        if let Err(error) = sqlx::query("SELECT pg_notify('outbox_wake', '')")
            .execute(&pool)
            .await
        {
            // The relay's poll is the fallback; a lost wake-up only adds latency.
            tracing::debug!(%error, "could not send the relay wake-up");
        }
    }
}
