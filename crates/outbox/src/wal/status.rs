//! What `outbox status` and the probes read of the WAL relay's slots.

use sqlx::PgPool;

/// One logical slot of the database (`pgoutput`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct SlotStatus {
    /// Its name.
    pub slot: String,
    /// The session reading it, if one does.
    pub reader_pid: Option<i32>,
    /// WAL bytes between the server's position and the slot's confirmed one.
    pub lag_bytes: Option<i64>,
    /// How long the server waited for the reader's last confirmed position
    /// (`pg_stat_replication.flush_lag`; none when caught up or unread).
    pub flush_lag_secs: Option<f64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (past `max_slot_wal_keep_size`).
    pub wal_status: Option<String>,
    /// Age of its newest passed horizon (see [`super::horizons`]).
    pub passed_horizon_age_secs: Option<f64>,
}

/// The `pgoutput` slots of the current database, with the horizons of
/// `table`.
pub async fn slots(pool: &PgPool, table: &str) -> sqlx::Result<Vec<SlotStatus>> {
    let statement = format!(
        "SELECT s.slot_name::text AS slot, s.active_pid AS reader_pid, \
           pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes, \
           extract(epoch FROM r.flush_lag)::float8 AS flush_lag_secs, s.wal_status, \
           (SELECT extract(epoch FROM now() - max(h.taken_at))::float8 \
              FROM {table}_wal_horizons h WHERE h.slot = s.slot_name AND h.passed) \
             AS passed_horizon_age_secs \
         FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.database = current_database() AND s.plugin = 'pgoutput' ORDER BY s.slot_name"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(statement))
        .fetch_all(pool)
        .await
}
