//! The two `pgoutput` messages the WAL relay reads (protocol version 1, text
//! values): a Relation, which names a table's columns, and an Insert, one
//! new row of it, turned into the [`OutboxRow`] the polling relay would
//! have claimed. Begin and Commit are decoded by `pgwire-replication`; the
//! publication publishes inserts only, so nothing else of the outbox comes.
//!
//! Values are the columns' text output, as the replication session prints
//! them: the session pins `DateStyle` to ISO and `TimeZone` to UTC (see
//! [`super::SESSION_OPTIONS`]), so a `timestamptz` always reads
//! `2026-12-06 23:03:53.123456+00`. A `jsonb` prints as `payload::text`
//! does, the bytes the polling relay publishes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::rows::OutboxRow;

/// Why a message could not be read: the stream is not what the relay
/// asked for (another protocol version, binary values, a changed table).
#[derive(Debug, thiserror::Error)]
#[error("decoding pgoutput: {0}")]
pub struct DecodeError(String);

fn error(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// What one message of the stream is, for the relay.
#[derive(Debug)]
pub(crate) enum Change {
    /// An insert into the outbox table.
    Row(Box<OutboxRow>),
    /// Anything else: a Relation (remembered), a type, an origin, or a
    /// change of another table.
    Other,
}

/// The outbox table's columns, from its Relation message: Postgres sends it
/// before the table's first change on a connection, and again after the
/// table changes.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    /// The outbox table's oid (pgoutput's relation id).
    table: u32,
    columns: Option<Vec<String>>,
}

impl Decoder {
    pub(crate) fn new(table: u32) -> Self {
        Self {
            table,
            columns: None,
        }
    }

    /// Reads one XLogData payload.
    pub(crate) fn decode(&mut self, data: &[u8]) -> Result<Change, DecodeError> {
        let mut r = Reader(data);
        match r.byte()? {
            b'R' => {
                let id = r.u32()?;
                let _namespace = r.cstr()?;
                let name = r.cstr()?;
                let _identity = r.byte()?;
                let count = r.u16()?;
                let mut columns = Vec::with_capacity(count.into());
                for _ in 0..count {
                    let _flags = r.byte()?;
                    columns.push(r.cstr()?.to_owned());
                    let _type = r.u32()?;
                    let _modifier = r.u32()?;
                }
                if id == self.table {
                    self.columns = Some(columns);
                } else {
                    tracing::debug!(relation = name, "a relation of another table");
                }
                Ok(Change::Other)
            }
            b'I' => {
                let id = r.u32()?;
                // The publication holds the outbox alone: an insert of
                // anything else means the relay reads the wrong stream.
                if id != self.table {
                    return Err(error(format!(
                        "an insert into relation {id}, not the outbox"
                    )));
                }
                let Some(columns) = &self.columns else {
                    return Err(error("an insert before its table's Relation message"));
                };
                if r.byte()? != b'N' {
                    return Err(error("an insert without its new tuple"));
                }
                let count = usize::from(r.u16()?);
                let mut values = HashMap::with_capacity(count);
                for name in columns.iter().take(count) {
                    let value = match r.byte()? {
                        b'n' | b'u' => None,
                        b't' => {
                            let len = r.u32()? as usize;
                            Some(
                                std::str::from_utf8(r.take(len)?)
                                    .map_err(|e| error(e.to_string()))?,
                            )
                        }
                        other => return Err(error(format!("a value of kind {:?}", other as char))),
                    };
                    values.insert(name.as_str(), value);
                }
                // Written with published_at NULL (before the default, or
                // on purpose): the polling relay's row.
                if values.get("published_at").copied().flatten() != Some("infinity") {
                    return Ok(Change::Other);
                }
                Ok(Change::Row(Box::new(row(&values)?)))
            }
            _ => Ok(Change::Other),
        }
    }
}

type Values<'a> = HashMap<&'a str, Option<&'a str>>;

fn row(values: &Values<'_>) -> Result<OutboxRow, DecodeError> {
    let text = |name: &str| -> Result<&str, DecodeError> {
        values
            .get(name)
            .copied()
            .flatten()
            .ok_or_else(|| error(format!("no value for column {name}")))
    };
    let parsed = |name: &str| -> Result<Option<&str>, DecodeError> {
        Ok(values.get(name).copied().flatten())
    };
    let number = |name: &str| -> Result<i64, DecodeError> {
        text(name)?
            .parse()
            .map_err(|e| error(format!("column {name}: {e}")))
    };
    let json = |value: &str| -> Result<serde_json::Value, DecodeError> {
        serde_json::from_str(value).map_err(|e| error(e.to_string()))
    };
    Ok(OutboxRow {
        id: number("id")?,
        transaction_id: Uuid::parse_str(text("transaction_id")?)
            .map_err(|e| error(format!("column transaction_id: {e}")))?,
        aggregate_type: text("aggregate_type")?.to_owned(),
        aggregate_id: text("aggregate_id")?.to_owned(),
        event_type: text("event_type")?.to_owned(),
        payload: text("payload")?.to_owned(),
        headers: json(text("headers")?)?,
        created_at: timestamp(text("created_at")?)?,
        attempts: number("attempts")? as i32,
        seq: parsed("seq")?
            .map(|s| s.parse().map_err(|e| error(format!("column seq: {e}"))))
            .transpose()?,
        previous: parsed("previous")?.map(json).transpose()?,
    })
}

/// A `timestamptz` in ISO style, in UTC: `2026-12-06 23:03:53.123456+00`.
fn timestamp(value: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S%.f%#z")
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| error(format!("timestamp {value:?}: {e}")))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(error("a message cut short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("two bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| error("a string without its end"))?;
        let s = std::str::from_utf8(&self.0[..end]).map_err(|e| error(e.to_string()))?;
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
mod tests;
