//! Holding the events of a handler in sequence that arrive before their
//! predecessor, durably, in Postgres.
//!
//! Per consumer and aggregate, `inbox_aggregates.last_seq` is the place of
//! the last event applied. In the dedup transaction, before the dedup rows
//! are written, one statement locks the rows of the batch's aggregates
//! (sorted, so two transactions cannot deadlock) and moves them on: each
//! event is applied when its predecessor is (`predecessor <= last_seq`),
//! else held in `inbox_held` with its body and headers and no dedup row,
//! its delivery acked, and its aggregate marked `waiting`. A transaction
//! that moves on a waiting aggregate applies the held events that follow
//! ([`crate::follow`]); the release publishes again to the consumer's queue
//! what it left (confirmed, then deleted: a crash in between publishes one
//! twice, which the dedup rows absorb), to be applied like any delivery:
//! retried, dead-lettered, never lost.

use std::collections::{BTreeMap, HashMap};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::Consumer;
use crate::chain::Chain;
use crate::handler::{Event, Handler};
use crate::held::Raw;

/// A batch's deliveries by event id: what a held event is kept from (read
/// only for the events held).
pub(crate) type Deliveries<'a> = std::collections::HashMap<Uuid, &'a lapin::message::Delivery>;

/// The dedup transaction's decision for a handler in sequence's events.
#[derive(Debug, Default)]
pub(crate) struct SortedOut {
    /// To apply now, each aggregate's in sequence (events without a place
    /// first, as delivered).
    pub apply: Vec<Uuid>,
    /// To hold until their predecessor is applied.
    pub hold: Vec<Uuid>,
    /// The aggregates moved on while marked `waiting`, as (type, id, the
    /// place reached): they may have held events, which may follow now.
    pub moved: Vec<(String, String, i64)>,
}

/// Locks, reads and moves on the batch's aggregates' places in one
/// statement, and sorts `events` out by where each place stood.
///
/// The places are upserted sorted by key (two transactions cannot
/// deadlock); each keeps the transaction's lock to its end, so a second
/// transaction of the same aggregate waits and then reads the place this
/// one left. The statement computes the new place from the current one
/// with [`Chain::steps`], keeps the place it found in `prior_seq`, and
/// sets `waiting` when it holds an event; it returns all three from the
/// row as it stands after any wait, so the decision is exact.
///
/// The place's `updated_at` (indexed, for the pruning) moves at most once
/// a second: the update that moves a place on a moment after the one that
/// made it changes no indexed column (unless `waiting`, which a partial
/// index names, changes), and is a heap-only (HOT) update in
/// the room the table's fillfactor leaves, with no index entries written.
/// The pruning is that second coarser.
pub(crate) async fn sort_out<E>(
    tx: &mut PgConnection,
    consumer: &str,
    events: &[Event<E>],
) -> sqlx::Result<SortedOut> {
    let mut grouped: BTreeMap<(&str, &str), Vec<&Event<E>>> = BTreeMap::new();
    let mut out = SortedOut::default();
    for event in events {
        match &event.sequence {
            Some(s) => grouped
                .entry((&s.aggregate_type, &s.aggregate_id))
                .or_default()
                .push(event),
            None => out.apply.push(event.id),
        }
    }
    let by_aggregate: BTreeMap<(&str, &str), Chain<'_, E>> = grouped
        .into_iter()
        .map(|(key, events)| (key, Chain::new(events)))
        .collect();
    if by_aggregate.is_empty() {
        return Ok(out);
    }
    let mut keys = (Vec::new(), Vec::new());
    // A new place starts at 0.
    let mut new = (Vec::new(), Vec::new());
    let mut steps = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((aggregate_type, aggregate_id), chain) in &by_aggregate {
        keys.0.push(*aggregate_type);
        keys.1.push(*aggregate_id);
        let (last, applied) = chain.run(0);
        new.0.push(last);
        new.1.push(!applied.iter().all(|a| *a));
        for (from, to, complete) in chain.steps() {
            steps.0.push(*aggregate_type);
            steps.1.push(*aggregate_id);
            steps.2.push(from);
            steps.3.push(to);
            steps.4.push(complete);
        }
    }
    let places: Vec<(String, String, i64, i64, bool)> = sqlx::query_as(
        "WITH steps AS (SELECT * FROM unnest($6::text[], $7::text[], $8::bigint[], \
           $9::bigint[], $10::boolean[]) AS s(t, i, from_seq, to_seq, complete)) \
         INSERT INTO inbox_aggregates AS a \
           (consumer, aggregate_type, aggregate_id, last_seq, prior_seq, waiting) \
         SELECT $1, t, i, last, 0, waiting \
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::boolean[]) AS k(t, i, last, waiting) \
         ORDER BY t, i \
         ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET \
           prior_seq = a.last_seq, \
           last_seq = greatest(a.last_seq, (SELECT max(s.to_seq) FROM steps s \
             WHERE s.t = a.aggregate_type AND s.i = a.aggregate_id AND s.from_seq <= a.last_seq)), \
           waiting = a.waiting OR NOT EXISTS (SELECT 1 FROM steps s \
             WHERE s.t = a.aggregate_type AND s.i = a.aggregate_id AND s.from_seq <= a.last_seq \
               AND s.complete), \
           updated_at = CASE WHEN a.updated_at < now() - interval '1 second' \
             THEN now() ELSE a.updated_at END \
         RETURNING aggregate_type, aggregate_id, prior_seq, last_seq, waiting",
    )
    .bind(consumer)
    .bind(&keys.0)
    .bind(&keys.1)
    .bind(&new.0)
    .bind(&new.1)
    .bind(&steps.0)
    .bind(&steps.1)
    .bind(&steps.2)
    .bind(&steps.3)
    .bind(&steps.4)
    .fetch_all(&mut *tx)
    .await?;
    if places.len() != by_aggregate.len() {
        return Err(sqlx::Error::Protocol(format!(
            "{} places moved for {} aggregates",
            places.len(),
            by_aggregate.len()
        )));
    }
    for (aggregate_type, aggregate_id, prior, last, waiting) in places {
        let key = (aggregate_type.as_str(), aggregate_id.as_str());
        let Some(chain) = by_aggregate.get(&key) else {
            return Err(sqlx::Error::Protocol(format!(
                "a place of {aggregate_type} {aggregate_id}, not in the batch, moved"
            )));
        };
        let (now, applied) = chain.run(prior);
        if now != last {
            return Err(sqlx::Error::Protocol(format!(
                "the place of {aggregate_type} {aggregate_id} moved from {prior} to {last}, \
                 where its events lead to {now}"
            )));
        }
        for (event, applies) in chain.events.iter().zip(applied) {
            if applies {
                &mut out.apply
            } else {
                &mut out.hold
            }
            .push(event.id);
        }
        if waiting && last > prior {
            out.moved.push((aggregate_type, aggregate_id, last));
        }
    }
    Ok(out)
}

/// Holds `events` (with what their `deliveries` carried). A held event
/// has no dedup row: it is not applied yet, and its copy published again
/// must not count as a duplicate.
pub(crate) async fn hold<E>(
    tx: &mut PgConnection,
    consumer: &str,
    events: &[&Event<E>],
    deliveries: &Deliveries<'_>,
) -> sqlx::Result<()> {
    let mut rows = Vec::new();
    for event in events {
        if let (Some(place), Some(delivery)) = (&event.sequence, deliveries.get(&event.id)) {
            rows.push((event, place, Raw::of(delivery)));
        }
    }
    let ids: Vec<Uuid> = rows.iter().map(|(e, _, _)| e.id).collect();
    sqlx::query(
        "INSERT INTO inbox_held (consumer, transaction_id, aggregate_type, aggregate_id, seq, \
           predecessor, event_type, routing_key, body, headers) \
         SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], \
           $7::text[], $8::text[], $9::bytea[], $10::jsonb[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(&ids)
    .bind(
        rows.iter()
            .map(|(_, p, _)| p.aggregate_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, p, _)| p.aggregate_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|(_, p, _)| p.seq).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|(_, p, _)| p.predecessor)
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(e, _, _)| e.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, _, r)| r.routing_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|(_, _, r)| r.body.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|(_, _, r)| &r.headers).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl<H: Handler> Consumer<H> {
    /// Sorts a handler in sequence's events out (locking their aggregates'
    /// rows), holds those that come before their predecessor, and returns
    /// the others, each aggregate's in sequence, to apply now.
    pub(crate) async fn sort_out(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[Event<H::Event>],
        raw: &Deliveries<'_>,
    ) -> sqlx::Result<(SortedOut, Vec<Event<H::Event>>)> {
        let sorted = sort_out(tx, self.name(), events).await?;
        // A held event is published again from what its delivery carried.
        if let Some(id) = sorted.hold.iter().find(|id| !raw.contains_key(id)) {
            let why =
                format!("event {id} must wait for its predecessor, but came without its delivery");
            return Err(sqlx::Error::Protocol(why));
        }
        let by_id: HashMap<Uuid, &Event<H::Event>> = events.iter().map(|e| (e.id, e)).collect();
        let held: Vec<&Event<H::Event>> = sorted.hold.iter().map(|id| by_id[id]).collect();
        if !held.is_empty() {
            hold(tx, self.name(), &held, raw).await?;
        }
        let apply = sorted.apply.iter().map(|id| by_id[id].clone()).collect();
        Ok((sorted, apply))
    }
}
