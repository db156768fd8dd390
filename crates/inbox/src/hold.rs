//! Holding the events of a handler in sequence that arrive before their
//! predecessor, durably, in Postgres.
//!
//! Per consumer and aggregate, `inbox_aggregates.last_seq` is the place of
//! the last event applied. In the dedup transaction, the rows of the
//! batch's aggregates are locked (sorted, so two transactions cannot
//! deadlock), and each new event is applied when its predecessor is
//! (`predecessor <= last_seq`), else held in `inbox_held` with its body and
//! headers, its delivery acked. Once a commit moves on an aggregate with
//! held events, those whose predecessor is now applied are published again
//! to the consumer's queue (confirmed, then deleted: a crash in between
//! publishes one twice, which the dedup rows absorb), and are applied like
//! any delivery: retried, dead-lettered, never lost.

use std::collections::{BTreeMap, HashSet};

use sqlx::PgConnection;
use uuid::Uuid;

use crate::handler::Event;
pub(crate) use crate::held::{HeldRow, Raw};

/// The dedup transaction's decision for a handler in sequence's new events.
#[derive(Debug, Default)]
pub(crate) struct SortedOut {
    /// To apply now, each aggregate's in sequence (events without a place
    /// first, as delivered).
    pub apply: Vec<Uuid>,
    /// To hold until their predecessor is applied.
    pub hold: Vec<Uuid>,
    /// The aggregates moved on, and their new last place.
    pub advanced: Vec<(String, String, i64)>,
}

/// Locks the batch's aggregates' rows and sorts `events` out.
pub(crate) async fn sort_out<E>(
    tx: &mut PgConnection,
    consumer: &str,
    events: &[Event<E>],
) -> sqlx::Result<SortedOut> {
    let mut by_aggregate: BTreeMap<(&str, &str), Vec<&Event<E>>> = BTreeMap::new();
    let mut out = SortedOut::default();
    for event in events {
        match &event.sequence {
            Some(s) => by_aggregate
                .entry((&s.aggregate_type, &s.aggregate_id))
                .or_default()
                .push(event),
            None => out.apply.push(event.id),
        }
    }
    if by_aggregate.is_empty() {
        return Ok(out);
    }
    let (types, ids): (Vec<&str>, Vec<&str>) = by_aggregate.keys().copied().unzip();
    // One round trip: a new aggregate's row is inserted, an existing one
    // locked by a no-op update; both stay locked until the commit.
    let last: Vec<(String, String, i64)> = sqlx::query_as(
        "INSERT INTO inbox_aggregates AS a (consumer, aggregate_type, aggregate_id) \
         SELECT $1, t, i FROM unnest($2::text[], $3::text[]) AS u(t, i) ORDER BY t, i \
         ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET last_seq = a.last_seq \
         RETURNING aggregate_type, aggregate_id, last_seq",
    )
    .bind(consumer)
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let last: BTreeMap<(String, String), i64> =
        last.into_iter().map(|(t, i, s)| ((t, i), s)).collect();
    for ((aggregate_type, aggregate_id), mut events) in by_aggregate {
        let key = (aggregate_type.to_owned(), aggregate_id.to_owned());
        let before = last.get(&key).copied().unwrap_or(0);
        let mut now = before;
        events.sort_by_key(|e| e.sequence.as_ref().map(|s| s.seq));
        for event in events {
            let place = event.sequence.as_ref().expect("sorted by their place");
            if place.predecessor <= now {
                out.apply.push(event.id);
                now = now.max(place.seq);
            } else {
                out.hold.push(event.id);
            }
        }
        if now != before {
            out.advanced.push((key.0, key.1, now));
        }
    }
    Ok(out)
}

/// Holds `events` (with what their deliveries carried, `raw`), and takes
/// back their dedup rows: a held event is not applied yet, so its copy
/// must not count as a duplicate once it is published again.
pub(crate) async fn hold<E>(
    tx: &mut PgConnection,
    consumer: &str,
    events: &[&Event<E>],
    raw: &std::collections::HashMap<Uuid, Raw>,
) -> sqlx::Result<()> {
    let mut rows = Vec::new();
    for event in events {
        if let (Some(place), Some(raw)) = (&event.sequence, raw.get(&event.id)) {
            rows.push((event, place, raw));
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
    sqlx::query("DELETE FROM processed_messages WHERE consumer = $1 AND transaction_id = ANY($2)")
        .bind(consumer)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Records the aggregates moved on (`sorted.advanced`, not empty), and
/// says whether any of them has held events (which may follow now).
/// Exact: a transaction holds an event only while it has its aggregate's
/// row locked, as this one has, so every hold of these aggregates is
/// committed or is this transaction's own.
/// (A held event's row is deleted by the release that published it again,
/// not by the apply of its copy.)
pub(crate) async fn advance(
    tx: &mut PgConnection,
    consumer: &str,
    sorted: &SortedOut,
) -> sqlx::Result<bool> {
    let (types, rest): (Vec<&str>, Vec<(&str, i64)>) = sorted
        .advanced
        .iter()
        .map(|(t, i, s)| (t.as_str(), (i.as_str(), *s)))
        .unzip();
    let (ids, seqs): (Vec<&str>, Vec<i64>) = rest.into_iter().unzip();
    // The rows exist (locked by `sort_out`): written through the conflict
    // path, so each is found by the primary key whatever plan is cached.
    // (An UPDATE ... FROM unnest(...) planned while the table was small
    // keeps a hash join over every row of the consumer's: 2 ms a statement
    // at 10,000 aggregates, measured.)
    let waiting: Vec<bool> = sqlx::query_scalar(
        "INSERT INTO inbox_aggregates AS a (consumer, aggregate_type, aggregate_id, last_seq) \
         SELECT $1, t, i, last FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(t, i, last) \
         ORDER BY t, i \
         ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE \
           SET last_seq = greatest(a.last_seq, excluded.last_seq), updated_at = now() \
         RETURNING EXISTS (SELECT 1 FROM inbox_held h WHERE h.consumer = a.consumer \
           AND h.aggregate_type = a.aggregate_type AND h.aggregate_id = a.aggregate_id)",
    )
    .bind(consumer)
    .bind(&types)
    .bind(&ids)
    .bind(&seqs)
    .fetch_all(&mut *tx)
    .await?;
    Ok(waiting.into_iter().any(|w| w))
}

/// Held events whose predecessor is applied now, at most `limit`.
pub(crate) async fn releasable(
    conn: &mut PgConnection,
    consumer: &str,
    limit: i64,
) -> sqlx::Result<Vec<HeldRow>> {
    sqlx::query_as(
        // Driven from the held events (few), each aggregate's place found by
        // its primary key: never a scan of every place.
        "SELECT h.transaction_id, h.event_type, h.body, h.headers FROM inbox_held h \
         WHERE h.consumer = $1 AND h.predecessor <= (SELECT a.last_seq FROM inbox_aggregates a \
           WHERE a.consumer = h.consumer AND a.aggregate_type = h.aggregate_type \
             AND a.aggregate_id = h.aggregate_id) \
         ORDER BY h.aggregate_type, h.aggregate_id, h.seq LIMIT $2",
    )
    .bind(consumer)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Held events older than `secs` seconds, at most `limit`: past the dedup
/// window they go to the dead-letter queue, so the table stays bounded.
pub(crate) async fn expired(
    conn: &mut PgConnection,
    consumer: &str,
    secs: f64,
    limit: i64,
) -> sqlx::Result<Vec<HeldRow>> {
    sqlx::query_as(
        "SELECT transaction_id, event_type, body, headers FROM inbox_held \
         WHERE consumer = $1 AND held_at < now() - make_interval(secs => $2) \
         ORDER BY held_at LIMIT $3",
    )
    .bind(consumer)
    .bind(secs)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes held events once they were published again (or dead-lettered).
pub(crate) async fn released(
    conn: &mut PgConnection,
    consumer: &str,
    ids: &HashSet<Uuid>,
) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = ids.iter().copied().collect();
    sqlx::query("DELETE FROM inbox_held WHERE consumer = $1 AND transaction_id = ANY($2)")
        .bind(consumer)
        .bind(&ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// How many events `consumer` holds, and the age of the oldest in seconds.
pub(crate) async fn held_count(
    conn: &mut PgConnection,
    consumer: &str,
) -> sqlx::Result<(i64, f64)> {
    sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM now() - min(held_at))::float8, 0) \
         FROM inbox_held WHERE consumer = $1",
    )
    .bind(consumer)
    .fetch_one(conn)
    .await
}
