//! The service's tables: the outbox and dedup tables from the SQL the core
//! crates ship (never copied by hand, never the order service's
//! migrations), and the service's own.

use sqlx::{AssertSqlSafe, PgPool};

use crate::awards::OUTBOX_TABLE;

/// `sql/loyalty.sql`: `awards` (the writer's rows) and `balances` (the
/// consumer's).
pub const OWN_SQL: &str = include_str!("../sql/loyalty.sql");

/// Creates every table of the service in an empty database, in one
/// transaction: `loyalty_outbox` from [`outbox::schema::create_table`],
/// `processed_messages` from [`inbox::schema::SQL`], then [`OWN_SQL`].
///
/// The demo and the tests start from an empty database each time. A
/// long-lived service would rather put the same SQL in its migrations
/// (`sqlx::migrate!`), so that it runs once per database.
pub async fn create_tables(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // A table name of this crate's, never input: safe to splice.
    let outbox = AssertSqlSafe(outbox::schema::create_table(OUTBOX_TABLE));
    sqlx::raw_sql(outbox).execute(&mut *tx).await?;
    sqlx::raw_sql(inbox::schema::SQL).execute(&mut *tx).await?;
    sqlx::raw_sql(OWN_SQL).execute(&mut *tx).await?;
    tx.commit().await
}
