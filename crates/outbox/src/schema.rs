//! The SQL of an outbox table, shipped with the crate, for the service's
//! own migrations: the crate never creates or alters a table itself.
//!
//! Two supported ways:
//! - copy `sql/outbox.sql` (in this crate's folder) into your migrations
//!   folder as a new migration, renaming `outbox` throughout for a table of
//!   another name;
//! - or run [`create_table`] from a migration step of your own (as the
//!   example service does): `sqlx::raw_sql(AssertSqlSafe(create_table("outbox")))`.
//!
//! Either gives the table the [`Table`](crate::Table) statements expect:
//! the columns, the partial index of the relay's claim and the one of the
//! pruning, and for a table with sequences the unique index
//! `<name>_aggregate_seq_key` (without it, a writer's look-up of an
//! aggregate's latest row scans the table) and the table of the versions
//! before's counters, `<name>_aggregates`, which only the pruning reads now.

/// `sql/outbox.sql`: the `outbox` table.
pub const OUTBOX_SQL: &str = include_str!("../sql/outbox.sql");

/// The `CREATE TABLE` and `CREATE INDEX` statements of an outbox table
/// named `name` (a constant of the code, never input).
///
/// ```
/// let sql = outbox::schema::create_table("loyalty_outbox");
/// assert!(sql.contains("CREATE TABLE loyalty_outbox ("));
/// assert!(sql.contains("CREATE INDEX loyalty_outbox_unpublished_idx"));
/// ```
pub fn create_table(name: &str) -> String {
    OUTBOX_SQL
        .lines()
        .filter(|line| !line.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("outbox", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_the_outbox_table() {
        let sql = create_table("outbox");
        assert!(sql.starts_with("CREATE TABLE outbox ("), "{sql}");
        assert!(sql.contains("CONSTRAINT outbox_transaction_id_key UNIQUE"));
        assert!(sql.contains("ON outbox (published_at)"));
    }

    #[test]
    fn another_name_renames_the_table_its_constraint_and_indexes() {
        let sql = create_table("audit_outbox");
        assert!(sql.contains("CREATE TABLE audit_outbox ("));
        assert!(sql.contains("CONSTRAINT audit_outbox_transaction_id_key UNIQUE"));
        assert!(sql.contains("CREATE INDEX audit_outbox_published_at_idx ON audit_outbox"));
        assert!(!sql.contains(" outbox"), "{sql}");
    }
}
