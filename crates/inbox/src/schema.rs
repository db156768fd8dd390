//! The SQL of the dedup table, shipped with the crate, for the service's
//! own migrations: the crate never creates or alters a table itself. Copy
//! `sql/inbox.sql` (in this crate's folder) into your migrations folder as a
//! new migration, or run [`SQL`] from a migration step of your own (as the
//! example service does).

/// `sql/inbox.sql`: the `processed_messages` table and its pruning index.
pub const SQL: &str = include_str!("../sql/inbox.sql");
