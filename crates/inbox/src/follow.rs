//! Held events that follow, applied in the transaction of the event they
//! waited for. When the dedup transaction moves on a place marked
//! `waiting`, it takes the aggregate's held events whose predecessor the
//! place has now reached (each aggregate's in sequence, as its place moves
//! on with them) out of `inbox_held`, moves the place past them, and hands
//! them to the handler with the batch: no second pass through the broker.
//! At most [`FOLLOW_AT_ONCE`] follow in one transaction; the release
//! publishes the rest again to the queue. If the transaction is refused
//! or fails, all of it rolls back and the batch is tried again without
//! following, so that a held event the handler refuses never fails the
//! event it waited for: the held events are then published again to the
//! queue, as the sweep does.

use std::collections::{BTreeMap, HashSet};

use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::handler::Event;
use crate::hold::SortedOut;
use crate::sequence::Sequence;
use outbox_common::amqp::headers::{ATTEMPT_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// Adds to `candidates` (the batch's events to apply) the held events that
/// follow them now, if `follow`, for the aggregates `sorted` moved on while
/// `waiting`. Returns the ids of those that follow, and the aggregates the
/// release is to look at after the commit: those of which some events
/// stay held (without following, every one moved on).
pub(crate) async fn along<E: DeserializeOwned>(
    tx: &mut PgConnection,
    consumer: &str,
    sorted: Option<&SortedOut>,
    follow: bool,
    candidates: &mut Vec<Event<E>>,
) -> sqlx::Result<(HashSet<Uuid>, Vec<(String, String)>)> {
    let Some(moved) = sorted.map(|s| &s.moved).filter(|m| !m.is_empty()) else {
        return Ok((HashSet::new(), Vec::new()));
    };
    if !follow {
        let all = moved.iter().map(|(t, i, _)| (t.clone(), i.clone()));
        return Ok((HashSet::new(), all.collect()));
    }
    let (events, stay) = take(tx, consumer, moved, candidates).await?;
    let following = events.iter().map(|e| e.id).collect();
    candidates.extend(events);
    Ok((following, stay))
}

/// The most held events that follow in one transaction.
pub(crate) const FOLLOW_AT_ONCE: usize = 64;

/// A held event, as the dedup transaction reads it back.
#[derive(sqlx::FromRow)]
struct Held {
    transaction_id: Uuid,
    aggregate_type: String,
    aggregate_id: String,
    seq: i64,
    predecessor: i64,
    event_type: String,
    body: Vec<u8>,
    headers: serde_json::Value,
}

/// Takes the held events that follow now, for `places` (aggregates this
/// transaction moved on while marked `waiting`, as type, id and the place
/// they reached), and moves the places past them. Their `waiting` mark
/// stays: cleared here, it would write the place's index entries again
/// (a partial index names it), where moving `last_seq` alone is a
/// heap-only update; the sweep clears it within a second, and until then
/// a transaction that moves the place on looks for held events and finds
/// none. An event whose body does not parse stays held, with those after
/// it, for the release to publish it (and the dead-letter queue to take
/// it). A held event of which a copy is among `applying` (the batch's
/// events applied now) is taken out but not returned: it is applied once.
///
/// Returns the events that follow, and the aggregates of `places` some of
/// whose events stay held.
async fn take<E: DeserializeOwned>(
    tx: &mut PgConnection,
    consumer: &str,
    places: &[(String, String, i64)],
    applying: &[Event<E>],
) -> sqlx::Result<(Vec<Event<E>>, Vec<(String, String)>)> {
    let (types, ids): (Vec<&str>, Vec<&str>) = places
        .iter()
        .map(|(t, i, _)| (t.as_str(), i.as_str()))
        .unzip();
    // Each aggregate's held events through the index on its key: a join
    // would leave the plan to the table's statistics, which a table of a
    // few rows and many deleted ones (or none, before its first ANALYZE)
    // lets read every held event of the consumer.
    let held: Vec<Held> = sqlx::query_as(
        "SELECT h.* \
         FROM (SELECT DISTINCT t, i FROM unnest($2::text[], $3::text[]) AS k(t, i)) k \
         CROSS JOIN LATERAL (SELECT transaction_id, aggregate_type, aggregate_id, seq, \
             predecessor, event_type, body, headers \
           FROM inbox_held WHERE consumer = $1 AND aggregate_type = k.t AND aggregate_id = k.i \
           ORDER BY seq) h \
         ORDER BY h.aggregate_type, h.aggregate_id, h.seq",
    )
    .bind(consumer)
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    if held.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut reached: BTreeMap<(&str, &str), (i64, bool)> = places
        .iter()
        .map(|(t, i, last)| ((t.as_str(), i.as_str()), (*last, false)))
        .collect();
    let mut events = Vec::new();
    for row in &held {
        let Some((now, stays)) = reached.get_mut(&(&row.aggregate_type, &row.aggregate_id)) else {
            continue;
        };
        let follows = !*stays && row.predecessor <= *now && events.len() < FOLLOW_AT_ONCE;
        match follows.then(|| parse(row)).flatten() {
            Some(event) => {
                *now = (*now).max(row.seq);
                events.push(event);
            }
            None => *stays = true,
        }
    }
    let stay: Vec<(String, String)> = reached
        .iter()
        .filter(|(_, (_, stays))| *stays)
        .map(|((t, i), _)| ((*t).to_owned(), (*i).to_owned()))
        .collect();
    if events.is_empty() {
        return Ok((events, stay));
    }
    let taken: Vec<Uuid> = events.iter().map(|e: &Event<E>| e.id).collect();
    let (mut types, mut ids, mut lasts) = (vec![], vec![], vec![]);
    for ((t, i), (last, _)) in &reached {
        types.push(*t);
        ids.push(*i);
        lasts.push(*last);
    }
    sqlx::query(
        "WITH taken AS (DELETE FROM inbox_held WHERE consumer = $1 \
           AND transaction_id = ANY($2::uuid[])) \
         INSERT INTO inbox_aggregates AS a (consumer, aggregate_type, aggregate_id, last_seq) \
         SELECT $1, t, i, last FROM unnest($3::text[], $4::text[], $5::bigint[]) AS k(t, i, last) \
         ORDER BY t, i \
         ON CONFLICT (consumer, aggregate_type, aggregate_id) DO UPDATE SET \
           last_seq = greatest(a.last_seq, excluded.last_seq)",
    )
    .bind(consumer)
    .bind(&taken)
    .bind(&types)
    .bind(&ids)
    .bind(&lasts)
    .execute(&mut *tx)
    .await?;
    let applying: HashSet<Uuid> = applying.iter().map(|e| e.id).collect();
    let events = events
        .into_iter()
        .filter(|e| !applying.contains(&e.id))
        .collect();
    Ok((events, stay))
}

/// The event a held row keeps, if its body parses.
fn parse<E: DeserializeOwned>(row: &Held) -> Option<Event<E>> {
    let body = serde_json::from_slice(&row.body).ok()?;
    let header = |name: &str| row.headers.get(name).cloned();
    let trace_headers: serde_json::Map<String, serde_json::Value> =
        [TRACEPARENT_HEADER, TRACESTATE_HEADER]
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), header(name)?)))
            .collect();
    Some(Event {
        id: row.transaction_id,
        event_type: row.event_type.clone(),
        body,
        attempt: header(ATTEMPT_HEADER)
            .and_then(|a| a.as_u64())
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0),
        trace_headers: serde_json::Value::Object(trace_headers),
        sequence: Some(Sequence {
            aggregate_type: row.aggregate_type.clone(),
            aggregate_id: row.aggregate_id.clone(),
            seq: row.seq,
            predecessor: row.predecessor,
        }),
    })
}
