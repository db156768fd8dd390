//! Postgres's executor time per order, by statement, from
//! `pg_stat_statements`, when the server loads it
//! (`shared_preload_libraries = 'pg_stat_statements'`, then a restart):
//! where an order's Postgres time goes, and the relay's share of it.

use sqlx::PgPool;

/// One statement's executor time and calls per order.
#[derive(Debug, Clone)]
pub struct Statement {
    pub query: String,
    pub us_per_order: f64,
    pub calls_per_order: f64,
}

/// Creates the extension in the step's database and resets the counters;
/// false when the server does not load the library.
pub async fn prepare(pool: &PgPool) -> anyhow::Result<bool> {
    let loaded: String = sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
        .fetch_one(pool)
        .await?;
    if !loaded.contains("pg_stat_statements") {
        return Ok(false);
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await?;
    Ok(true)
}

/// This database's statements since [`prepare`], per order, slowest first.
pub async fn per_order(pool: &PgPool, orders: i64) -> anyhow::Result<Vec<Statement>> {
    let rows: Vec<(String, f64, i64)> = sqlx::query_as(
        "SELECT query, total_exec_time, calls FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY total_exec_time DESC",
    )
    .fetch_all(pool)
    .await?;
    let orders = orders.max(1) as f64;
    Ok(rows
        .into_iter()
        .map(|(query, ms, calls)| Statement {
            query: query.split_whitespace().collect::<Vec<_>>().join(" "),
            us_per_order: ms * 1000.0 / orders,
            calls_per_order: calls as f64 / orders,
        })
        .collect())
}

/// Whether a statement is the relay's: the polling relay's claim and
/// marks of `outbox` (not the mails' outbox), the WAL relay's visibility
/// check (one a batch), horizons and lag reads.
pub fn is_relays(query: &str) -> bool {
    let polling = (query.contains("FROM outbox ") && query.contains("FOR UPDATE SKIP LOCKED"))
        || query.starts_with("UPDATE outbox ");
    polling
        || query.contains("_wal_horizons")
        || query.contains("pg_replication_slots")
        || query.contains("pg_visible_in_snapshot")
}

/// The relay's share and the total, µs per order, and the top statements
/// as one line each.
pub fn summary(statements: &[Statement]) -> (f64, f64, Vec<String>) {
    let relay = statements
        .iter()
        .filter(|s| is_relays(&s.query))
        .map(|s| s.us_per_order)
        .sum();
    let total = statements.iter().map(|s| s.us_per_order).sum();
    let top = statements
        .iter()
        .take(10)
        .map(|s| {
            let query: String = s.query.chars().take(90).collect();
            format!(
                "{:.0} µs ({:.2} calls){}: {query}",
                s.us_per_order,
                s.calls_per_order,
                if is_relays(&s.query) { " [relay]" } else { "" }
            )
        })
        .collect();
    (relay, total, top)
}
