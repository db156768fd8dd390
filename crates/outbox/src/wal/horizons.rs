//! Which rows the slot has passed, without a mark on each row.
//!
//! A row does not know the LSN of its commit, and `id`s do not follow the
//! commit sequence. So the relay takes a *horizon* now and then (each
//! `horizon_interval`, a minute by default): in one statement, the oldest
//! transaction still running (`pg_snapshot_xmin`, `X`), the WAL insert
//! position (`L`) and the largest committed `id` (`W`). A transaction older
//! than `X` had ended before `L` was read, so its commit lies before `L`.
//! Once the slot's confirmed position has reached `L` (the relay marks the
//! horizon `passed`), every row with `id <= W` written by a transaction
//! older than `X` (`age(xmin) > age(X)`) was streamed and confirmed. A
//! horizon costs one `INSERT` and later one `UPDATE`: two statements a
//! minute, against the polling relay's claim and mark of every row.
//!
//! Retention deletes such rows once their horizon is older than the
//! retention (they were written before it was taken), and never a row no
//! passed horizon covers. A relay whose slot was lost hands every row no
//! passed horizon covers back to the polling relay. `age()` counts in 31
//! bits: a horizon more than 2^31 transactions old is not used (its rows
//! wait for a newer one).

use std::sync::Arc;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, SqlSafeStr, SqlStr};

use outbox_common::prune::Prune;

fn sql(s: String) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(s)).into_sql_str()
}

/// The statements on `<table>_wal_horizons`.
#[derive(Debug, Clone)]
pub(crate) struct Horizons {
    take: SqlStr,
    pass: SqlStr,
    forget: SqlStr,
}

impl Horizons {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            take: sql(format!(
                "INSERT INTO {table}_wal_horizons (slot, lsn, max_id, oldest_xid) \
                 SELECT $1, pg_current_wal_insert_lsn(), \
                   coalesce((SELECT max(id) FROM {table}), 0), pg_snapshot_xmin(pg_current_snapshot())"
            )),
            pass: sql(format!(
                "UPDATE {table}_wal_horizons SET passed = true \
                 WHERE slot = $1 AND NOT passed AND lsn <= $2::text::pg_lsn AND lsn > '0/0'"
            )),
            // Keeps the newest passed horizon older than the retention (the
            // one retention uses) and everything newer.
            forget: sql(format!(
                "DELETE FROM {table}_wal_horizons WHERE slot = $1 AND lsn > '0/0' AND taken_at < ( \
                   SELECT max(taken_at) FROM {table}_wal_horizons \
                   WHERE slot = $1 AND passed AND taken_at < now() - make_interval(secs => $2))"
            )),
        }
    }

    /// Takes a horizon for `slot`.
    pub(crate) async fn take(&self, pool: &PgPool, slot: &str) -> sqlx::Result<()> {
        sqlx::query(self.take.clone())
            .bind(slot)
            .execute(pool)
            .await?;
        Ok(())
    }

    /// Marks passed the horizons of `slot` at or before `confirmed` (an LSN
    /// the slot has confirmed), and forgets those no longer needed.
    pub(crate) async fn pass(
        &self,
        pool: &PgPool,
        slot: &str,
        confirmed: &str,
        retention_secs: f64,
    ) -> sqlx::Result<()> {
        sqlx::query(self.pass.clone())
            .bind(slot)
            .bind(confirmed)
            .execute(pool)
            .await?;
        sqlx::query(self.forget.clone())
            .bind(slot)
            .bind(retention_secs)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// The pruning of rows the slot passed under a horizon older than the
/// retention, for [`outbox_common::prune::run`].
pub fn prune(table: &'static str, retention: std::time::Duration) -> Prune {
    let statement = sql(format!(
        "DELETE FROM {table} WHERE id IN ( \
           SELECT o.id FROM {table} AS o, ( \
             SELECT max_id, oldest_xid FROM {table}_wal_horizons \
             WHERE passed AND taken_at < now() - make_interval(secs => $1) \
               AND age(xid(oldest_xid)) > 0 \
             ORDER BY taken_at DESC LIMIT 1) AS h \
           WHERE o.id <= h.max_id AND o.published_at = 'infinity' \
             AND age(o.xmin) > age(xid(h.oldest_xid)) \
           ORDER BY o.id LIMIT $2 FOR UPDATE OF o SKIP LOCKED)"
    ));
    Prune::new(table, statement, retention)
}

/// Notes, before a slot is made again, that the rows its predecessor had
/// not passed must go to the polling relay: a row with no horizon
/// (`lsn = 0/0`), which [`hand_back_if_noted`] consumes.
pub(crate) async fn note_hand_back(
    conn: &mut PgConnection,
    table: &str,
    slot: &str,
) -> sqlx::Result<()> {
    let statement = format!(
        "INSERT INTO {table}_wal_horizons (slot, lsn, max_id, oldest_xid) \
         VALUES ($1, '0/0', -1, '0')"
    );
    sqlx::query(AssertSqlSafe(statement))
        .bind(slot)
        .execute(conn)
        .await?;
    Ok(())
}

/// When a hand-back is noted for `slot`: hands the WAL relay's rows that
/// no passed horizon of it covers to the polling relay (`published_at`
/// back to NULL, with a `last_error` saying why) and clears the note, in
/// one transaction. Returns how many rows.
pub(crate) async fn hand_back_if_noted(
    conn: &mut PgConnection,
    table: &str,
    slot: &str,
) -> sqlx::Result<u64> {
    let mut tx = conn.begin().await?;
    let noted = format!("DELETE FROM {table}_wal_horizons WHERE slot = $1 AND lsn = '0/0'");
    let notes = sqlx::query(AssertSqlSafe(noted))
        .bind(slot)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if notes == 0 {
        return Ok(0);
    }
    let statement = format!(
        "WITH h AS (SELECT max_id, oldest_xid FROM {table}_wal_horizons \
           WHERE slot = $1 AND passed AND age(xid(oldest_xid)) > 0 \
           ORDER BY taken_at DESC LIMIT 1) \
         UPDATE {table} AS o SET published_at = NULL, \
           last_error = 'handed to the polling relay: the WAL slot had not confirmed it' \
         WHERE o.published_at = 'infinity' AND NOT EXISTS ( \
           SELECT 1 FROM h WHERE o.id <= h.max_id AND age(o.xmin) > age(xid(h.oldest_xid)))"
    );
    let done = sqlx::query(AssertSqlSafe(statement))
        .bind(slot)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
