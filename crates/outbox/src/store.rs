//! Writing and reading outbox rows. An outbox is a [`Table`] of rows with the
//! same columns (an `outbox` of events, say, and one of messages for another
//! sink): written in the caller's transaction (writers take `&mut
//! PgConnection`), claimed with `FOR UPDATE SKIP LOCKED`, marked published
//! or failed with a growing backoff.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, SqlStr};
use uuid::Uuid;

use outbox_common::prune::Prune;

use crate::confirms::Failed;
use crate::rows::{FailedRow, NewOutboxEvent, OutboxRow, OutboxStatus};
use crate::statements::Statements;

/// One outbox table and its statements, built once from its name.
#[derive(Debug, Clone)]
pub struct Table {
    name: &'static str,
    /// Whether its rows are numbered within their aggregate ([`Table::with_sequences`]).
    sequenced: bool,
    sql: Arc<Statements>,
}

impl Table {
    /// The statements of the outbox table `name` (a constant, never input).
    pub fn named(name: &'static str) -> Self {
        Self::build(name, false)
    }

    /// This table, its rows numbered within their aggregate (`seq`, and
    /// `previous`: see the `insert` module), through its counter table
    /// `<name>_aggregates` and its unique index `<name>_aggregate_seq_key`
    /// on `(aggregate_type, aggregate_id, seq)`; the relay publishes them as headers, for the
    /// consumers that apply an aggregate's events in sequence.
    pub fn with_sequences(self) -> Self {
        Self::build(self.name, true)
    }

    fn build(name: &'static str, sequenced: bool) -> Self {
        Self {
            name,
            sequenced,
            sql: Arc::new(Statements::new(name, sequenced)),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The `INSERT` of rows into this table, from six arrays bound from
    /// `$first` on: transaction ids (`uuid[]`), aggregate types, aggregate
    /// ids, event types (`text[]`), payloads and headers (`jsonb[]`)
    /// ([`Table::bind_events`] binds them); `with` is a list of common
    /// table expressions of the writer's own to run first in the same
    /// statement (`""` for none). For a writer that puts its own change and
    /// its outbox rows in one statement: [`Table::insert_many`] runs it
    /// alone.
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

    /// Writes rows on `conn`, in one statement: the caller's transaction (a
    /// request's, or a consumer's dedup transaction) covers them together
    /// with the change they describe.
    pub async fn insert_many(
        &self,
        conn: &mut PgConnection,
        events: &[NewOutboxEvent],
    ) -> sqlx::Result<()> {
        let insert = Self::bind_events(sqlx::query(self.sql.insert.clone()), events);
        execute_unless_empty(conn, events, insert).await
    }

    /// The `INSERT` of rows each of which belongs to an aggregate with no
    /// row in this table yet (a new order's first event, say), from the
    /// arrays [`Table::bind_new_aggregates`] binds from `$first` on, after
    /// the writer's `with` (as [`Table::insert_statement`]). In a table
    /// [`Table::with_sequences`] they are numbered from the batch alone
    /// (1, 2, ... per aggregate, in order), with no counter and no read:
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

    /// Locks up to `limit` due rows, oldest first, skipping rows another
    /// claimer holds. The locks last until the caller's transaction ends.
    pub async fn claim_due(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> sqlx::Result<Vec<OutboxRow>> {
        sqlx::query_as(self.sql.claim.clone())
            .bind(limit)
            .fetch_all(conn)
            .await
    }

    /// [`Table::claim_due`], taking of each aggregate only its first pending
    /// row, and only when no earlier row of it is pending: a sink that
    /// delivers each claimed row before the next claim then hands one
    /// aggregate's rows over in sequence (the rows of a handler that
    /// wrote them in sequence), one at a time, while different aggregates
    /// go in parallel. A row given up on holds back nothing.
    pub async fn claim_due_in_sequence(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> sqlx::Result<Vec<OutboxRow>> {
        sqlx::query_as(self.sql.claim_in_sequence.clone())
            .bind(limit)
            .fetch_all(conn)
            .await
    }

    /// Marks the rows `ids` published.
    pub async fn mark_published(&self, conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let result = sqlx::query(self.sql.published.clone())
            .bind(ids)
            .execute(conn)
            .await?;
        Ok(result.rows_affected())
    }

    /// Records a failed attempt for each row, found by its `transaction_id`.
    /// The row becomes due again (`published_at` back to NULL, for a row its
    /// own batch had marked published before the broker's return was
    /// matched to it), with `attempts + 1`, `last_error`, and a retry time
    /// that grows with the attempts (1 s, 2 s, 4 s … capped at 5 minutes).
    pub async fn mark_failed(
        &self,
        conn: &mut PgConnection,
        failures: &[Failed],
    ) -> sqlx::Result<u64> {
        self.record(conn, &self.sql.failed, failures).await
    }

    /// Gives up on rows refused for good (a permanent SMTP refusal, say):
    /// `last_error` says why, and they are never due again.
    pub async fn mark_given_up(
        &self,
        conn: &mut PgConnection,
        failures: &[Failed],
    ) -> sqlx::Result<u64> {
        self.record(conn, &self.sql.given_up, failures).await
    }

    async fn record(
        &self,
        conn: &mut PgConnection,
        statement: &SqlStr,
        failures: &[Failed],
    ) -> sqlx::Result<u64> {
        if failures.is_empty() {
            return Ok(0);
        }
        let (transaction_ids, errors): (Vec<Uuid>, Vec<String>) = failures
            .iter()
            .map(|f| (f.transaction_id, f.error.to_string()))
            .unzip();
        let result = sqlx::query(statement.clone())
            .bind(&transaction_ids)
            .bind(&errors)
            .execute(conn)
            .await?;
        Ok(result.rows_affected())
    }

    /// The pruning of rows published more than `retention` ago, for
    /// [`outbox_common::prune::run`].
    pub fn prune(&self, retention: Duration) -> Prune {
        Prune::new(self.name, self.sql.prune.clone(), retention)
    }

    /// The pruning of the counters of aggregates written to no longer than
    /// `retention` ago (a table [`Table::with_sequences`]); an aggregate
    /// written to again after that goes on from its latest row in the
    /// table, or, that pruned too, starts again at 1, which a consumer
    /// applies at once (it has no predecessor).
    pub fn prune_counters(&self, retention: Duration) -> Option<Prune> {
        self.sequenced
            .then(|| Prune::new(self.name, self.sql.prune_counters.clone(), retention))
    }

    /// The table's pending rows, lag, errors and given-up rows.
    pub async fn status(&self, conn: &mut PgConnection) -> sqlx::Result<OutboxStatus> {
        sqlx::query_as(self.sql.status.clone())
            .fetch_one(conn)
            .await
    }

    /// The `limit` newest rows with an error.
    pub async fn recent_failures(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> sqlx::Result<Vec<FailedRow>> {
        sqlx::query_as(self.sql.failures.clone())
            .bind(limit)
            .fetch_all(conn)
            .await
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
