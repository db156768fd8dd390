//! Postgres pool and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
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
        .connect_lazy_with(connect_options(config)?);

    crate::shutdown::retry_until_cancelled("Postgres", cancel, || async {
        sqlx::query("SELECT 1").execute(&pool).await.map(|_| ())
    })
    .await
    .with_context(|| format!("waiting for Postgres at {}", config.database_url))?;
    if !config.skip_migrations {
        migrate(&pool).await?;
    }
    Ok(pool)
}

/// What a Postgres error means for the work that met it: the one SQLSTATE
/// classifier of the crate, used by the API, the order writer, the relay and
/// the inbox. Never matches message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Postgres refused the data (SQLSTATE classes 22 data exception, 23
    /// integrity constraint, 54 program limit such as a value too large for
    /// an index, P0 raised by a trigger): trying again fails again.
    Refused,
    /// The connection broke, or the server is shutting down or restarting
    /// (I/O, 08xxx, 57Pxx): the work can be retried on another connection.
    ConnectionLost,
    /// No connection could be had from the pool in time, or it is closed.
    Unavailable,
    /// Anything else (a read-only or full database, a deadlock, a bug in a
    /// statement): not the data's fault, so an outage to wait out.
    Other,
}

/// Classifies `error`; see [`ErrorKind`].
pub fn classify(error: &sqlx::Error) -> ErrorKind {
    match error {
        sqlx::Error::Io(_) => ErrorKind::ConnectionLost,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => ErrorKind::Unavailable,
        sqlx::Error::Database(db) => match db.code() {
            Some(c) if ["22", "23", "54", "P0"].iter().any(|k| c.starts_with(k)) => {
                ErrorKind::Refused
            }
            Some(c) if c.starts_with("08") || c.starts_with("57P") => ErrorKind::ConnectionLost,
            _ => ErrorKind::Other,
        },
        _ => ErrorKind::Other,
    }
}

/// Every statement of the service is bounded in time: a silent network
/// partition or a lock queue (behind an `ALTER`, say) fails the work, which
/// is then retried as an outage, instead of holding it forever.
const STATEMENT_TIMEOUT: &str = "30s";
const LOCK_TIMEOUT: &str = "10s";

/// The connection options of `DATABASE_URL`, with the time limits above. The
/// error never echoes the URL, which may carry a password.
fn connect_options(config: &DatabaseConfig) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = config.database_url.expose().parse().map_err(|_| {
        anyhow::anyhow!("DATABASE_URL {} is not a Postgres URL", config.database_url)
    })?;
    Ok(options.options([
        ("statement_timeout", STATEMENT_TIMEOUT),
        ("lock_timeout", LOCK_TIMEOUT),
    ]))
}

/// Applies pending migrations. Safe to run concurrently from several roles:
/// sqlx takes an advisory lock. Runs on a connection without the time
/// limits (an index build may take long), which it restores after.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("a connection for migrations")?;
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SET lock_timeout = 0")
        .execute(&mut *conn)
        .await?;
    let applied = MIGRATOR
        .run(&mut *conn)
        .await
        .context("applying migrations");
    // Back to the limits the connection was opened with.
    let _ = sqlx::query("RESET statement_timeout")
        .execute(&mut *conn)
        .await;
    let _ = sqlx::query("RESET lock_timeout").execute(&mut *conn).await;
    applied?;
    Ok(())
}
