//! What is kept of a held delivery, the message it becomes again, and the
//! queries of the release and the sweep over the held events.

use std::collections::HashSet;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use sqlx::PgConnection;
use uuid::Uuid;

/// What of a delivery is kept while it is held, to publish it again.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Its headers' text and integer values.
    pub headers: serde_json::Value,
}

impl Raw {
    pub fn of(delivery: &Delivery) -> Self {
        let headers = delivery.properties.headers().as_ref().map(|h| {
            h.inner()
                .iter()
                .filter_map(|(name, value)| {
                    let value = match value {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
                        AMQPValue::ShortString(s) => s.as_str().into(),
                        AMQPValue::LongLongInt(n) => (*n).into(),
                        AMQPValue::LongInt(n) => (*n).into(),
                        AMQPValue::LongUInt(n) => (*n).into(),
                        _ => return None,
                    };
                    Some((name.as_str().to_owned(), value))
                })
                .collect::<serde_json::Map<_, _>>()
        });
        Self {
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: delivery.data.clone(),
            headers: headers.map_or(serde_json::json!({}), serde_json::Value::Object),
        }
    }
}

/// A held event ready to be published again.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct HeldRow {
    pub transaction_id: Uuid,
    pub event_type: String,
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
}

impl HeldRow {
    /// The properties it is published again with: those the relay gave it.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(map) = self.headers.as_object() {
            for (name, value) in map {
                let value = match value {
                    serde_json::Value::String(s) => AMQPValue::LongString(s.as_str().into()),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(n) => AMQPValue::LongLongInt(n),
                        None => continue,
                    },
                    _ => continue,
                };
                headers.insert(name.as_str().into(), value);
            }
        }
        BasicProperties::default()
            .with_message_id(self.transaction_id.to_string().into())
            .with_type(self.event_type.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers)
    }
}

/// Held events whose predecessor is applied now, at most `limit`: of the
/// aggregates `among` names, as (type, id), or (`None`, the sweep) of all.
pub(crate) async fn releasable(
    conn: &mut PgConnection,
    consumer: &str,
    among: Option<&[(String, String)]>,
    limit: i64,
) -> sqlx::Result<Vec<HeldRow>> {
    let Some(among) = among else {
        return sqlx::query_as(
            // Driven from the held events (few), each aggregate's place found
            // by its primary key: never a scan of every place.
            "SELECT h.transaction_id, h.event_type, h.body, h.headers FROM inbox_held h \
             WHERE h.consumer = $1 AND h.predecessor <= (SELECT a.last_seq FROM inbox_aggregates a \
               WHERE a.consumer = h.consumer AND a.aggregate_type = h.aggregate_type \
                 AND a.aggregate_id = h.aggregate_id) \
             ORDER BY h.aggregate_type, h.aggregate_id, h.seq LIMIT $2",
        )
        .bind(consumer)
        .bind(limit)
        .fetch_all(conn)
        .await;
    };
    let (types, ids): (Vec<&str>, Vec<&str>) =
        among.iter().map(|(t, i)| (t.as_str(), i.as_str())).unzip();
    sqlx::query_as(
        // Driven from the named aggregates, by the held events' index and
        // the places' primary key.
        "SELECT h.transaction_id, h.event_type, h.body, h.headers \
         FROM (SELECT DISTINCT t, i FROM unnest($2::text[], $3::text[]) AS k(t, i)) k \
         JOIN inbox_aggregates a \
           ON a.consumer = $1 AND a.aggregate_type = k.t AND a.aggregate_id = k.i \
         JOIN inbox_held h ON h.consumer = $1 AND h.aggregate_type = k.t \
           AND h.aggregate_id = k.i AND h.predecessor <= a.last_seq \
         ORDER BY h.aggregate_type, h.aggregate_id, h.seq LIMIT $4",
    )
    .bind(consumer)
    .bind(&types)
    .bind(&ids)
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

/// Clears `waiting` on the consumer's places that hold no event any more,
/// at most [`CLEAR_AT_ONCE`] a sweep; returns how many. The places are
/// locked first, skipping those a transaction has (the sweep never waits
/// on a handler; a skipped mark is only kept, which is safe), and checked
/// again in a statement of their own: a hold committed before the lock is
/// seen then, and its mark kept.
pub(crate) async fn clear_waiting(conn: &mut PgConnection, consumer: &str) -> sqlx::Result<u64> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (types, ids): (Vec<String>, Vec<String>) = sqlx::query_as::<_, (String, String)>(
        "SELECT aggregate_type, aggregate_id FROM inbox_aggregates a \
         WHERE consumer = $1 AND waiting AND NOT EXISTS (SELECT 1 FROM inbox_held h \
           WHERE h.consumer = a.consumer AND h.aggregate_type = a.aggregate_type \
             AND h.aggregate_id = a.aggregate_id) \
         ORDER BY aggregate_type, aggregate_id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(consumer)
    .bind(CLEAR_AT_ONCE)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .unzip();
    if types.is_empty() {
        return Ok(0);
    }
    // `waiting` in the filter: the marked places only (a partial index),
    // whatever plan is cached, never a join over every place.
    let cleared = sqlx::query(
        "UPDATE inbox_aggregates a SET waiting = false \
         FROM unnest($2::text[], $3::text[]) AS k(t, i) \
         WHERE a.consumer = $1 AND a.waiting AND a.aggregate_type = k.t AND a.aggregate_id = k.i \
           AND NOT EXISTS (SELECT 1 FROM inbox_held h WHERE h.consumer = a.consumer \
             AND h.aggregate_type = a.aggregate_type AND h.aggregate_id = a.aggregate_id)",
    )
    .bind(consumer)
    .bind(&types)
    .bind(&ids)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(cleared)
}

/// The most waiting marks one sweep clears.
const CLEAR_AT_ONCE: i64 = 1_000;

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
