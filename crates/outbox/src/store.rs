//! Writing and reading outbox rows. An outbox is a [`Table`] of rows with the
//! same columns (an `outbox` of events, say, and one of messages for another
//! sink): written in the caller's transaction (writers take `&mut
//! PgConnection`), claimed with `FOR UPDATE SKIP LOCKED`, marked published
//! or failed with a growing backoff.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, SqlStr};
use uuid::Uuid;

use outbox_common::prune::Prune;

use crate::confirms::Failed;
use crate::rows::{FailedRow, OutboxRow, OutboxStatus};
use crate::statements::Statements;

/// One outbox table and its statements, built once from its name.
#[derive(Debug, Clone)]
pub struct Table {
    pub(crate) name: &'static str,
    /// Whether its rows are numbered within their aggregate ([`Table::with_sequences`]).
    pub(crate) sequenced: bool,
    pub(crate) sql: Arc<Statements>,
}

impl Table {
    /// The statements of the outbox table `name` (a constant, never input).
    pub fn named(name: &'static str) -> Self {
        Self::build(name, false)
    }

    /// This table, its rows numbered within their aggregate (`seq`, and
    /// `previous`: see the `insert` module), under a lock per aggregate
    /// held by the writer's transaction ([`Table::lock_aggregates`]) and
    /// its unique index `<name>_aggregate_seq_key` on `(aggregate_type,
    /// aggregate_id, seq)`; the relay publishes them as headers, for the
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

    /// The pruning of the counters in `<name>_aggregates` that versions
    /// before kept (a table [`Table::with_sequences`]) and that no writer
    /// reads or writes now: rows of aggregates written to no longer than
    /// `retention` ago, so that the table empties after an upgrade.
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
