//! Databases of a test's (or a benchmark's) own on a Postgres server: the
//! one place that creates and drops them. Shared by the test binaries and
//! the benchmark (which includes this file), so it uses sqlx, tokio and uuid only.

use std::future::Future;

use sqlx::{Connection as _, Executor as _, PgConnection};
use uuid::Uuid;

/// Runs `cleanup` to the end on a thread of its own, from a `Drop`: it works
/// while a test unwinds from a failed assertion, inside or outside a runtime.
/// Returns its output, or `None` if no runtime could run it.
pub fn run_to_end<F>(cleanup: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let done = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|runtime| runtime.block_on(cleanup))
    });
    done.join().ok()?.ok()
}

/// Creates an empty database `<prefix>_<uuid>` on the server of
/// `admin_url`; returns its name and URL (`admin_url` naming it instead,
/// its query such as `?sslmode=...` kept).
pub async fn create(admin_url: &str, prefix: &str) -> Result<(String, String), sqlx::Error> {
    let name = format!("{prefix}_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url).await?;
    // A name cannot be bound; this one is ours, made of [a-z0-9_].
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let _ = admin.close().await;
    let url = with_database(admin_url, &name);
    Ok((name, url))
}

/// Drops database `name` on the server of `admin_url`, closing its
/// sessions first; nothing if it is gone already.
pub async fn remove(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    drop_slots(&mut admin, name).await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin.close().await
}

/// Drops the logical replication slots of database `name` (a WAL relay's):
/// Postgres refuses to drop a database that has one. An active slot's
/// reader is ended first, and the drop tried again until its session is
/// gone (a deadline of 10 s).
async fn drop_slots(admin: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE database = $1 AND active_pid IS NOT NULL",
        )
        .bind(name)
        .execute(&mut *admin)
        .await?;
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut *admin)
        .await;
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&mut *admin)
                .await?;
        if left == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return dropped.map(|_| ());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `url` naming database `name` instead, its query kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    format!(
        "{}/{name}{query}",
        base.rsplit_once('/').expect("a URL with a database").0
    )
}
