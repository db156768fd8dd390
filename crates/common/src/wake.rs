//! Waking the relay within milliseconds of a commit: in one process an
//! in-memory signal; across processes a Postgres `NOTIFY`, sent outside the
//! writers' transactions and coalesced, and a LISTEN task that turns it back
//! into the in-memory signal.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::shutdown::{Backoff, sleep_or_cancel};

/// The channel a cross-process relay listens on.
pub const NOTIFY_CHANNEL: &str = "outbox_wake";

/// An in-process wake-up for the relay. Notifications coalesce: many commits
/// while the relay is busy leave one pending wake-up.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    /// Wakes the waiter now, or at its next wait.
    pub fn notify(&self) {
        self.0.notify_one();
    }

    /// Waits for a wake-up.
    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

/// For writers without an in-process relay (an API, a consumer that writes
/// outbox rows): turns wake-ups into a Postgres `NOTIFY`, sent outside their
/// transactions (a NOTIFY inside them would serialise every commit) and
/// coalesced to one per burst.
pub async fn forward_wakes_as_notify(pool: PgPool, wake: Wake, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(NOTIFY_CHANNEL)
            .execute(&pool)
            .await
        {
            // The relay's poll is the fallback; a lost wake-up only adds latency.
            tracing::debug!(%error, "could not send the relay wake-up");
        }
    }
}

/// The LISTEN task of a relay in its own process: each `NOTIFY outbox_wake`
/// wakes the relay. When the listener fails it says so and listens again
/// after a backoff; meanwhile the relay's poll carries on.
pub async fn listen(pool: PgPool, wake: Wake, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !cancel.is_cancelled() {
        let error = match listen_once(&pool, &wake, &cancel, &mut backoff).await {
            Ok(()) => return,
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "outbox LISTEN failed; the relay polls meanwhile");
        sleep_or_cancel(delay, &cancel).await;
    }
}

/// Listens until `cancel` (`Ok`) or the listener fails.
async fn listen_once(
    pool: &PgPool,
    wake: &Wake,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
) -> sqlx::Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Closing the pool at shutdown ends the wait through `cancel`, not an error.
    listener.ignore_pool_close_event(true);
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::debug!("listening for outbox wake-ups");
    backoff.reset();
    // A wake-up now: rows may have been written while nobody listened.
    wake.notify();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            notification = listener.try_recv() => match notification? {
                Some(_) => wake.notify(),
                None => return Err(sqlx::Error::Protocol("the LISTEN connection was closed".into())),
            },
        }
    }
}
