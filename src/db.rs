//! Postgres pool and migrations, and the start on a database: the
//! connect options of `DATABASE_URL` with libpq's TLS parameters
//! (`options`), and the first connection that waits for a Postgres not up
//! yet but stops on a misconfiguration (`start`).

mod options;
mod replication;
mod start;

pub use self::replication::replication_config;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

pub use self::start::StartError;
use crate::config::DatabaseConfig;
pub use outbox_common::sqlstate::{ErrorKind, classify, refuses_login};

/// Pooled connections idle at least this long are pinged before use.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How long an operator's command (`migrate`, `outbox status`) waits for a
/// Postgres it cannot reach before it gives up with the last error.
pub const COMMAND_PATIENCE: Duration = Duration::from_secs(10);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds a pool once Postgres answers, for a role: a Postgres started
/// after the role (connection refused, starting up) is waited for with
/// backoff until `cancel` fires; a misconfiguration that waiting cannot
/// mend is a [`StartError`] at once. Applies migrations unless told not to.
pub async fn connect(
    config: &DatabaseConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<PgPool> {
    open(config, cancel, None).await
}

/// [`connect`] for an operator's command: an unreachable Postgres is an
/// error after [`COMMAND_PATIENCE`], not a wait without end, and no
/// migration is applied (`migrate` applies them itself; the tools only
/// read and skip).
pub async fn connect_for_command(
    config: &DatabaseConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<PgPool> {
    let config = DatabaseConfig {
        skip_migrations: true,
        ..config.clone()
    };
    open(&config, cancel, Some(COMMAND_PATIENCE)).await
}

async fn open(
    config: &DatabaseConfig,
    cancel: &CancellationToken,
    patience: Option<Duration>,
) -> anyhow::Result<PgPool> {
    let options = options::connect_options(&config.database_url)?;
    // One connection of its own first: its error tells an outage from a
    // refusal, where the pool's would only say that it timed out.
    start::wait_until_up(&options, config.database_url.redacted(), cancel, patience).await?;
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
        .connect_lazy_with(options.connect);
    if !config.skip_migrations {
        migrate(&pool).await?;
    }
    Ok(pool)
}

/// Applies pending migrations. Safe to run concurrently from several roles:
/// sqlx takes an advisory lock. Runs on a connection without the time
/// limits (an index build may take long), which it restores after.
///
/// Dropping the future (SIGTERM during `migrate`) loses no work: sqlx runs
/// each migration in a transaction, never committed once its connection is
/// dropped. The server notices the lost client within a second even while
/// the migration waits on the lock or runs a long statement, and rolls back.
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
    // Postgres 14 and later; an older server only notices at its next write.
    let _ = sqlx::query("SET client_connection_check_interval = '1s'")
        .execute(&mut *conn)
        .await;
    let applied = MIGRATOR
        .run(&mut *conn)
        .await
        .context("applying migrations");
    // Back to the limits the connection was opened with.
    for reset in [
        "RESET statement_timeout",
        "RESET lock_timeout",
        "RESET client_connection_check_interval",
    ] {
        let _ = sqlx::query(reset).execute(&mut *conn).await;
    }
    applied?;
    Ok(())
}
