//! Writing outbox rows, in the caller's transaction: the statements of
//! [`Table`] that insert, and the binding of their arrays.

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use crate::rows::NewOutboxEvent;
use crate::store::Table;

impl Table {
    /// The `INSERT` of rows into this table, from six arrays bound from
    /// `$first` on: transaction ids (`uuid[]`), aggregate types, aggregate
    /// ids, event types (`text[]`), payloads and headers (`jsonb[]`)
    /// ([`Table::bind_events`] binds them); `with` is a list of common
    /// table expressions of the writer's own to run first in the same
    /// statement (`""` for none). For a writer that puts its own change and
    /// its outbox rows in one statement: [`Table::insert_many`] runs it
    /// alone. In a table [`Table::with_sequences`], run
    /// [`Table::lock_aggregates`] first, in the same transaction.
    ///
    /// ```
    /// let outbox = outbox::Table::named("outbox");
    /// let insert = outbox.insert_statement(3, "");
    /// assert!(insert.starts_with("INSERT INTO outbox (transaction_id,"));
    /// assert!(insert.contains("unnest($3::uuid[], $4::text[]"));
    /// let with = outbox.insert_statement(2, "new_users AS (INSERT INTO users (id) VALUES ($1))");
    /// assert!(with.starts_with("WITH new_users AS ("));
    /// ```
    pub fn insert_statement(&self, first: usize, with: &str) -> String {
        crate::insert::statement(self.name, self.sequenced, first, with)
    }

    /// Writes one row on `conn`, the caller's transaction.
    pub async fn insert(
        &self,
        conn: &mut PgConnection,
        event: &NewOutboxEvent,
    ) -> sqlx::Result<()> {
        self.insert_many(conn, std::slice::from_ref(event)).await
    }

    /// Writes rows on `conn`, in one statement (after
    /// [`Table::lock_aggregates`]'s, in a table with sequences): the
    /// caller's transaction (a request's, or a consumer's dedup
    /// transaction) covers them together with the change they describe.
    pub async fn insert_many(
        &self,
        conn: &mut PgConnection,
        events: &[NewOutboxEvent],
    ) -> sqlx::Result<()> {
        self.lock_aggregates(conn, events).await?;
        let insert = Self::bind_events(sqlx::query(self.sql.insert.clone()), events);
        execute_unless_empty(conn, events, insert).await
    }

    /// In a table [`Table::with_sequences`], locks the aggregates of
    /// `events` until the end of `conn`'s transaction, so that a second
    /// writer of one of them waits for this one's commit and numbers after
    /// it: run it before the statement of [`Table::insert_statement`], in
    /// the same transaction ([`Table::insert_many`] does both). Without
    /// it, two writers of one aggregate at once take the same number and
    /// the unique index refuses the later one. A no-op in other tables.
    pub async fn lock_aggregates(
        &self,
        conn: &mut PgConnection,
        events: &[NewOutboxEvent],
    ) -> sqlx::Result<()> {
        if !self.sequenced || events.is_empty() {
            return Ok(());
        }
        let (types, ids): (Vec<&str>, Vec<&str>) = events
            .iter()
            .map(|e| (e.aggregate_type, e.aggregate_id.as_str()))
            .unzip();
        let lock = sqlx::query(self.sql.lock.clone()).bind(types).bind(ids);
        lock.execute(conn).await.map(drop)
    }

    /// The `INSERT` of rows each of which belongs to an aggregate with no
    /// row in this table yet (a new order's first event, say), from the
    /// arrays [`Table::bind_new_aggregates`] binds from `$first` on, after
    /// the writer's `with` (as [`Table::insert_statement`]). In a table
    /// [`Table::with_sequences`] they are numbered from the batch alone
    /// (1, 2, ... per aggregate, in order), with no lock and no read:
    /// as cheap as an unnumbered insert. An aggregate that has rows after
    /// all makes the statement fail on `<name>_aggregate_seq_key` (a
    /// unique violation) when a number repeats one still in the table, and
    /// nothing is written. Later rows of the aggregate, written by
    /// [`Table::insert_statement`], go on from them.
    pub fn new_aggregates_statement(&self, first: usize, with: &str) -> String {
        if self.sequenced {
            crate::insert::new_aggregates(self.name, first, with)
        } else {
            self.insert_statement(first, with)
        }
    }

    /// Writes rows of new aggregates on `conn`, the caller's transaction
    /// ([`Table::new_aggregates_statement`]).
    pub async fn insert_new_aggregates(
        &self,
        conn: &mut PgConnection,
        events: &[NewOutboxEvent],
    ) -> sqlx::Result<()> {
        let insert = sqlx::query(self.sql.insert_new_aggregates.clone());
        execute_unless_empty(conn, events, self.bind_new_aggregates(insert, events)).await
    }

    /// Binds `events` to `query` as the arrays that
    /// [`Table::new_aggregates_statement`] reads: the six of
    /// [`Table::bind_events`], then, in a table with sequences, their
    /// numbers and `previous` maps.
    pub fn bind_new_aggregates<'q>(
        &self,
        query: Query<'q, Postgres, PgArguments>,
        events: &'q [NewOutboxEvent],
    ) -> Query<'q, Postgres, PgArguments> {
        let query = Self::bind_events(query, events);
        if !self.sequenced {
            return query;
        }
        let numbers = crate::insert::Numbers::of(events);
        query.bind(numbers.seq).bind(numbers.previous)
    }

    /// Binds `events` to `query` as the six arrays that
    /// [`Table::insert_statement`] reads, in its sequence: for a writer's own
    /// statement, after its own parameters.
    pub fn bind_events<'q>(
        query: Query<'q, Postgres, PgArguments>,
        events: &'q [NewOutboxEvent],
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(events.iter().map(|e| e.transaction_id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.aggregate_type).collect::<Vec<_>>())
            .bind(
                events
                    .iter()
                    .map(|e| e.aggregate_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|e| e.event_type).collect::<Vec<_>>())
            .bind(events.iter().map(|e| &e.payload).collect::<Vec<_>>())
            .bind(events.iter().map(|e| &e.headers).collect::<Vec<_>>())
    }
}

/// Runs `insert`, the statement writing `events`, unless there are none.
async fn execute_unless_empty(
    conn: &mut PgConnection,
    events: &[NewOutboxEvent],
    insert: Query<'_, Postgres, PgArguments>,
) -> sqlx::Result<()> {
    if !events.is_empty() {
        insert.execute(conn).await?;
    }
    Ok(())
}
