//! The SQL the core crates ship (`outbox::schema`, `inbox::schema`) makes
//! the same tables as the order service's migrations: a service that
//! builds its tables from it gets what the relay and the inbox were
//! written and measured against. When they differ, the crates' SQL is the
//! one to fix: the migrations are applied and never edited.

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

use crate::common::{DropDatabase, create_database};
use crate::helpers::TestDb;

/// What must be the same of one table: its columns (name, type, NOT NULL,
/// default), its constraints, its indexes and its storage options.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    columns: Vec<(String, String, bool, Option<String>)>,
    constraints: Vec<(String, String)>,
    indexes: Vec<String>,
    reloptions: Option<Vec<String>>,
}

async fn shape(pool: &PgPool, table: &str) -> Shape {
    let columns = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                pg_get_expr(d.adbin, d.adrelid) \
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attname",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let constraints = sqlx::query_as(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
         WHERE conrelid = $1::regclass ORDER BY conname",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let indexes = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1 \
         ORDER BY indexname",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    let reloptions = sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = $1::regclass")
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
    Shape {
        columns,
        constraints,
        indexes,
        reloptions,
    }
}

#[tokio::test]
async fn the_shipped_sql_makes_the_tables_the_migrations_make() {
    let migrated = TestDb::new().await;
    let (name, url) = create_database().await;
    let _guard = DropDatabase(name);
    let shipped = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    // The supported way for a service of its own (examples/loyalty does this).
    let outbox = AssertSqlSafe(outbox::schema::create_table("outbox"));
    sqlx::raw_sql(outbox).execute(&shipped).await.unwrap();
    sqlx::raw_sql(inbox::schema::SQL)
        .execute(&shipped)
        .await
        .unwrap();

    for table in [
        "outbox",
        "outbox_aggregates",
        "outbox_wal_horizons",
        "processed_messages",
        "inbox_aggregates",
        "inbox_held",
    ] {
        let (want, got) = (
            shape(&migrated.pool, table).await,
            shape(&shipped, table).await,
        );
        assert_eq!(
            got, want,
            "{table}: the shipped SQL (left) and the migrations (right)"
        );
    }
    // The fillfactors are the storage options that differ from the default.
    let outbox = shape(&shipped, "outbox").await;
    assert_eq!(outbox.reloptions, Some(vec!["fillfactor=50".to_owned()]));
    let places = shape(&shipped, "inbox_aggregates").await;
    assert_eq!(places.reloptions, Some(vec!["fillfactor=70".to_owned()]));
    assert!(!outbox.indexes.is_empty() && !outbox.columns.is_empty());
    shipped.close().await;
    migrated.cleanup().await;
}
