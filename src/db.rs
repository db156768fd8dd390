//! Postgres pool and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

/// Pooled connections idle at least this long are pinged before use.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds a pool and waits (with backoff) until Postgres answers, so a role
/// started before its database comes up simply waits. Applies migrations unless
/// told not to.
pub async fn connect(
    config: &DatabaseConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(config.pool_size)
        .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
        // A connection idle for a while is checked before use (it may have
        // outlived a Postgres restart); one in steady use is not, which saves
        // a round trip per transaction under load. A connection that fails
        // anyway is dropped by the pool (sqlx pings every connection given
        // back), and the work on it is retried: a new order's write on
        // another connection at once, a delivery by redelivery, a relay batch
        // after its backoff; other requests get a 503.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy(config.database_url.expose())
        .with_context(|| format!("invalid DATABASE_URL {}", config.database_url))?;

    let mut backoff = crate::shutdown::Backoff::default();
    loop {
        match sqlx::query("SELECT 1").execute(&pool).await {
            Ok(_) => break,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    url = %config.database_url,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "Postgres not reachable yet"
                );
                if !crate::shutdown::sleep_or_cancel(delay, cancel).await {
                    anyhow::bail!("cancelled while waiting for Postgres");
                }
            }
        }
    }
    if !config.skip_migrations {
        migrate(&pool).await?;
    }
    Ok(pool)
}

/// Whether `error` means the connection itself failed (it broke, or the
/// server is shutting down or restarting): the work can be retried on
/// another connection, where any other error would fail again.
pub fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        // Connection exceptions (08xxx) and operator intervention (57Pxx).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Applies pending migrations. Safe to run concurrently from several roles:
/// sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}
