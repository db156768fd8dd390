//! What the WAL relay needs of Postgres, made at its start (each step does
//! nothing when already done, so every relay runs it):
//!
//! 1. `wal_level = logical`, or a clear stop;
//! 2. a publication of the outbox table's inserts;
//! 3. the logical slot (`pgoutput`);
//! 4. the table's `published_at` defaulting to `'infinity'`: a row written
//!    from then on is the WAL relay's, and the polling relay's claim (rows
//!    whose `published_at` is NULL) passes it over. A row the broker
//!    refuses is handed back to the polling relay by the same `UPDATE` that
//!    marks a polling failure (`published_at` back to NULL, an attempt, its
//!    error). Rows written before the default are NULL: the polling relay,
//!    which runs beside the WAL relay, publishes them.
//!
//! Postgres 15 does not carry a logical slot to a standby. After a
//! failover the slot is gone while the default (in the replicated catalog)
//! still hands new rows to it: a relay that must create the slot while the
//! default is already set hands every row no passed horizon covers back
//! to the polling relay (see [`Horizons`](super::horizons)), so nothing
//! written before the new slot's start is lost. Duplicates are possible;
//! the consumers deduplicate.

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use super::WalError;
use super::horizons;

/// A slot or publication name: the relay puts it in statements, so it must
/// be a plain identifier.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), WalError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(WalError::Config(format!(
            "{what} {name:?} is not a plain identifier (lower-case letters, digits and _, at most 63)"
        )))
    }
}

/// What the setup found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// The slot did not exist and was created.
    pub created_slot: bool,
    /// Rows handed back to the polling relay because the slot had been lost.
    pub handed_back: u64,
}

/// Runs the steps above for `table`, `publication` and `slot`, on one
/// connection that holds an advisory lock of the slot's meanwhile: two
/// relays starting together set up one after the other, so neither hands
/// back rows while the other's slot is still being made.
pub(crate) async fn run(
    pool: &PgPool,
    table: &str,
    publication: &str,
    slot: &str,
) -> Result<Setup, WalError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock(hashtext('outbox wal setup ' || $1))")
        .bind(slot)
        .execute(&mut *conn)
        .await?;
    let result = steps(&mut conn, table, publication, slot).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext('outbox wal setup ' || $1))")
        .bind(slot)
        .execute(&mut *conn)
        .await;
    if unlocked.is_err() {
        // A connection that may still hold the lock goes, and the lock with it.
        conn.detach();
    }
    result
}

async fn steps(
    conn: &mut PgConnection,
    table: &str,
    publication: &str,
    slot: &str,
) -> Result<Setup, WalError> {
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&mut *conn)
        .await?;
    if level != "logical" {
        return Err(WalError::Config(format!(
            "RELAY_MODE=wal needs Postgres's wal_level = logical, and it is {level}: \
             ALTER SYSTEM SET wal_level = logical, then restart Postgres"
        )));
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        let create =
            format!("CREATE PUBLICATION {publication} FOR TABLE {table} WITH (publish = 'insert')");
        ignore_duplicate(
            sqlx::raw_sql(AssertSqlSafe(create))
                .execute(&mut *conn)
                .await,
        )?;
    }
    let taken_over = published_at_default(conn, table).await?;
    let mut created_slot = false;
    if !usable_slot(conn, slot).await? {
        // Noted before the slot exists, so a crash before the hand-back
        // below has it done by the next start (a second one only repeats it).
        if taken_over {
            horizons::note_hand_back(conn, table, slot).await?;
        }
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(&mut *conn)
            .await?;
        created_slot = true;
        tracing::info!(slot, "created the logical replication slot");
    }
    let handed_back = horizons::hand_back_if_noted(conn, table, slot).await?;
    if handed_back > 0 {
        tracing::warn!(
            slot,
            rows = handed_back,
            "the slot was lost (a failover, past max_slot_wal_keep_size, or dropped) while the \
             table was the WAL relay's: rows no passed horizon covers are handed to the polling relay"
        );
    }
    if !taken_over {
        let alter = format!("ALTER TABLE {table} ALTER COLUMN published_at SET DEFAULT 'infinity'");
        sqlx::raw_sql(AssertSqlSafe(alter))
            .execute(&mut *conn)
            .await?;
        tracing::info!(
            table,
            "new rows default to published_at = 'infinity': the WAL relay's"
        );
    }
    Ok(Setup {
        created_slot,
        handed_back,
    })
}

/// Whether the table's `published_at` defaults to `'infinity'` (a WAL
/// relay has started on it).
async fn published_at_default(conn: &mut PgConnection, table: &str) -> Result<bool, WalError> {
    let default: Option<String> = sqlx::query(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a \
         JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE a.attrelid = $1::regclass AND a.attname = 'published_at'",
    )
    .bind(table)
    .fetch_optional(&mut *conn)
    .await?
    .map(|row| row.get(0));
    Ok(default.is_some_and(|d| d.contains("infinity")))
}

/// Whether `slot` exists and can be read: a slot of another database or
/// plugin is a clear stop; one invalidated past `max_slot_wal_keep_size`
/// (`wal_status = 'lost'`) is dropped, to be made again.
async fn usable_slot(conn: &mut PgConnection, slot: &str) -> Result<bool, WalError> {
    let found: Option<(bool, Option<String>, bool)> = sqlx::query_as(
        "SELECT database = current_database() AND plugin = 'pgoutput', wal_status, active \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?;
    match found {
        None => Ok(false),
        Some((false, _, _)) => Err(WalError::Config(format!(
            "slot {slot} belongs to another database or is not a pgoutput slot: name another WAL_SLOT"
        ))),
        Some((true, Some(status), false)) if status == "lost" => {
            tracing::warn!(
                slot,
                "the slot was invalidated (past max_slot_wal_keep_size): making it again"
            );
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(slot)
                .execute(&mut *conn)
                .await?;
            Ok(false)
        }
        Some(_) => Ok(true),
    }
}

/// Whether another session reads `slot` now.
pub(crate) async fn slot_in_use(pool: &PgPool, slot: &str) -> Result<bool, WalError> {
    let active: Option<bool> =
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    Ok(active.unwrap_or(false))
}

/// `Some(())` when done, `None` when another relay did it first.
fn ignore_duplicate<T>(result: sqlx::Result<T>) -> Result<Option<T>, WalError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some("42710") | Some("23505")) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Undoes the setup for `table`: rows default to NULL again (the polling
/// relay's), rows the slot has not passed are handed to the polling relay,
/// and the slot is dropped (it must not be in use).
pub async fn switch_to_polling(pool: &PgPool, table: &str, slot: &str) -> Result<u64, WalError> {
    let alter = format!("ALTER TABLE {table} ALTER COLUMN published_at DROP DEFAULT");
    sqlx::raw_sql(AssertSqlSafe(alter)).execute(pool).await?;
    let mut conn = pool.acquire().await?;
    horizons::note_hand_back(&mut conn, table, slot).await?;
    let handed_back = horizons::hand_back_if_noted(&mut conn, table, slot).await?;
    if slot_in_use(pool, slot).await? {
        return Err(WalError::Config(format!(
            "slot {slot} is still read: stop the WAL relays first"
        )));
    }
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .execute(pool)
    .await?;
    Ok(handed_back)
}
