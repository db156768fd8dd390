//! Postgres pool and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

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

/// Applies pending migrations. Safe to run concurrently from several roles:
/// sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}
