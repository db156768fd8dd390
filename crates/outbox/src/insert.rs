//! The `INSERT` of outbox rows, and for a table with sequences, the
//! numbering of each row within its aggregate's history.
//!
//! A sequenced table `t` numbers its rows per aggregate (`seq`), unique
//! per aggregate (the index `t_aggregate_seq_key`), and gives each row its
//! `previous` map: for each event type, the number of the latest earlier
//! event of that type in the aggregate, from which a consumer bound to
//! some of the types finds the event it must wait for.
//!
//! Two ways in:
//! - [`statement`], any aggregate, after [`lock`] in the same transaction:
//!   the lock statement takes a transaction-level advisory lock per
//!   aggregate of the batch, in key order, held until the writer's
//!   transaction ends, so a second writer of the same aggregate waits and
//!   for one aggregate the commits follow one another as the numbers do
//!   (which a `bigserial` is not). The insert, a statement of its own and
//!   so a snapshot taken once the locks are held, goes on from each
//!   aggregate's latest row, found by the unique index. Nothing but the
//!   rows is written: no counter row (the counters in `t_aggregates` of
//!   the versions before are no longer read or written, only pruned). A
//!   writer that skips the lock is never misnumbered: the unique index
//!   refuses a number that a concurrent writer committed first.
//! - [`new_aggregates`], rows of aggregates that have none yet (a new
//!   order's first event): numbered from the batch alone ([`Numbers`]),
//!   with no lock and no read, as cheap as an unnumbered `INSERT`. If
//!   the aggregate has rows after all, the unique index refuses the
//!   statement whose numbers repeat one still in the table, and nothing is
//!   written.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::rows::NewOutboxEvent;

const COLUMNS: &str = "transaction_id, aggregate_type, aggregate_id, event_type, payload, headers";

/// The arrays of the rows, bound from `$first` on, of these types: the six
/// of [`COLUMNS`], then any more.
fn rows(first: usize, more: &[&str]) -> String {
    let types = ["uuid", "text", "text", "text", "jsonb", "jsonb"];
    let arrays: Vec<String> = types
        .iter()
        .chain(more)
        .enumerate()
        .map(|(i, t)| format!("${}::{t}[]", first + i))
        .collect();
    format!("unnest({})", arrays.join(", "))
}

/// `with` as the head of a statement's `WITH` list (`", "` closing it when
/// `more` follow), or nothing.
fn with_list(with: &str, more: bool) -> String {
    match (with.is_empty(), more) {
        (true, false) => String::new(),
        (true, true) => "WITH ".into(),
        (false, false) => format!("WITH {with} "),
        (false, true) => format!("WITH {with}, "),
    }
}

/// The statement writing rows into `name`, from six arrays bound from
/// `$first` on (see [`crate::Table::insert_statement`]), after the extra
/// common table expressions `with` (none when empty). In a sequenced table
/// it numbers each row after its aggregate's latest row, read through the
/// unique index, in the statement's snapshot: run after [`lock`] in the
/// same transaction, that snapshot holds every earlier writer's commit.
pub(crate) fn statement(name: &str, sequenced: bool, first: usize, with: &str) -> String {
    let rows = rows(first, &[]);
    if !sequenced {
        let with = with_list(with, false);
        return format!("{with}INSERT INTO {name} ({COLUMNS}) SELECT * FROM {rows}");
    }
    let with = with_list(with, true);
    format!(
        "{with}batch AS ( \
             SELECT b.*, \
               row_number() OVER (PARTITION BY aggregate_type, aggregate_id ORDER BY ord) AS rank \
             FROM {rows} WITH ORDINALITY AS b({COLUMNS}, ord)), \
         latest AS ( \
             SELECT k.aggregate_type, k.aggregate_id, coalesce(l.seq, 0) AS seq, \
               coalesce(l.by_type, '{{}}'::jsonb) AS by_type \
             FROM (SELECT DISTINCT aggregate_type, aggregate_id FROM batch) k \
             LEFT JOIN LATERAL ( \
               SELECT o.seq, \
                 coalesce(o.previous, '{{}}'::jsonb) || jsonb_build_object(o.event_type, o.seq) \
                   AS by_type \
               FROM {name} o \
               WHERE o.aggregate_type = k.aggregate_type AND o.aggregate_id = k.aggregate_id \
                 AND o.seq IS NOT NULL \
               ORDER BY o.seq DESC LIMIT 1) l ON true) \
         INSERT INTO {name} ({COLUMNS}, seq, previous) \
         SELECT b.transaction_id, b.aggregate_type, b.aggregate_id, b.event_type, b.payload, \
           b.headers, l.seq + b.rank, \
           l.by_type || coalesce(jsonb_object_agg(b.event_type, l.seq + b.rank) OVER ( \
             PARTITION BY b.aggregate_type, b.aggregate_id ORDER BY b.ord \
             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), '{{}}'::jsonb) \
         FROM batch b JOIN latest l USING (aggregate_type, aggregate_id) ORDER BY b.ord"
    )
}

/// The statement taking, for the rest of the writer's transaction, the lock
/// of each aggregate of the rows about to be written into `name`: a
/// transaction-level advisory lock keyed by a 64-bit hash of the table's
/// name, the aggregate type and its id, from two arrays (`$1` the types,
/// `$2` the ids), taken in key order (the outer `ORDER BY`: Postgres
/// evaluates a volatile function of the select list after the sort) so
/// that two writers of the same aggregates, one call each, cannot deadlock
/// on them; a transaction that calls it twice, for different aggregates,
/// can meet another in the other order, and Postgres then aborts one. Its
/// own statement, before [`statement`]: a snapshot taken before the lock
/// was granted would miss the rows of the writer it waited for.
pub(crate) fn lock(name: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock(k) FROM ( \
             SELECT DISTINCT hashtextextended(i, hashtextextended(t, hashtextextended('{name}', 0))) \
               AS k \
             FROM unnest($1::text[], $2::text[]) AS a(t, i)) AS keys \
         ORDER BY k"
    )
}

/// The statement writing rows of new aggregates into the sequenced table
/// `name`, from eight arrays bound from `$first` on: the six of
/// [`statement`], then the rows' numbers (`bigint[]`) and `previous` maps
/// (`jsonb[]`) as [`Numbers`] gives them.
pub(crate) fn new_aggregates(name: &str, first: usize, with: &str) -> String {
    let with = with_list(with, false);
    let rows = rows(first, &["bigint", "jsonb"]);
    format!("{with}INSERT INTO {name} ({COLUMNS}, seq, previous) SELECT * FROM {rows}")
}

/// The numbers and `previous` maps of rows that open their aggregates, in
/// the rows' order: 1, 2, ... per aggregate, each map naming the latest
/// earlier row of each type in the batch (the rule [`statement`] follows
/// from an aggregate with no rows).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Numbers {
    pub(crate) seq: Vec<i64>,
    pub(crate) previous: Vec<Value>,
}

impl Numbers {
    pub(crate) fn of(events: &[NewOutboxEvent]) -> Self {
        // Per aggregate: its last number, and the latest number of each type.
        type Latest = (i64, Map<String, Value>);
        let mut latest: HashMap<(&str, &str), Latest> = HashMap::new();
        let mut numbers = Self::default();
        for event in events {
            let key = (event.aggregate_type, event.aggregate_id.as_str());
            let (last, by_type) = latest.entry(key).or_default();
            *last += 1;
            numbers.seq.push(*last);
            numbers.previous.push(Value::Object(by_type.clone()));
            by_type.insert(event.event_type.to_owned(), Value::from(*last));
        }
        numbers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(aggregate_id: &str, event_type: &'static str) -> NewOutboxEvent {
        NewOutboxEvent {
            transaction_id: uuid::Uuid::nil(),
            aggregate_type: "cart",
            aggregate_id: aggregate_id.to_owned(),
            event_type,
            payload: json!({}),
            headers: json!({}),
        }
    }

    #[test]
    fn new_aggregates_are_numbered_from_one_with_the_latest_earlier_event_of_each_type() {
        let events = [
            ("c-1", "a"),
            ("c-1", "b"),
            ("c-2", "a"),
            ("c-1", "a"),
            ("c-1", "c"),
        ]
        .map(|(id, t)| event(id, t));
        let numbers = Numbers::of(&events);
        assert_eq!(numbers.seq, [1, 2, 1, 3, 4]);
        assert_eq!(
            numbers.previous,
            [
                json!({}),
                json!({"a": 1}),
                json!({}),
                json!({"a": 1, "b": 2}),
                json!({"a": 3, "b": 2}),
            ]
        );
    }

    #[test]
    fn the_new_aggregates_statement_reads_eight_arrays_after_the_writers_own() {
        let sql = new_aggregates("outbox", 3, "w AS (SELECT $1, $2)");
        assert!(
            sql.starts_with("WITH w AS (SELECT $1, $2) INSERT INTO outbox ("),
            "{sql}"
        );
        assert!(
            sql.ends_with("$7::jsonb[], $8::jsonb[], $9::bigint[], $10::jsonb[])"),
            "{sql}"
        );
    }
}
