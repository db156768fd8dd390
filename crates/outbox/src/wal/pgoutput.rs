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
                    return Err(error(format!("an insert into relation {id}, not the outbox")));
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
                            Some(std::str::from_utf8(r.take(len)?).map_err(|e| error(e.to_string()))?)
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
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
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
mod tests {
    use super::*;

    fn relation(id: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(b"public\0");
        m.extend(name.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as u16).to_be_bytes());
        for c in columns {
            m.push(0);
            m.extend(c.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend(u32::MAX.to_be_bytes());
        }
        m
    }

    fn insert(id: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(id.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(v) => {
                    m.push(b't');
                    m.extend((v.len() as u32).to_be_bytes());
                    m.extend(v.as_bytes());
                }
            }
        }
        m
    }

    const COLUMNS: [&str; 15] = [
        "id",
        "transaction_id",
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        "headers",
        "created_at",
        "published_at",
        "attempts",
        "next_attempt_at",
        "last_error",
        "seq",
        "previous",
        "added_later",
    ];

    #[test]
    fn an_insert_into_the_outbox_is_the_row_the_claim_would_read() {
        let mut decoder = Decoder::new(7);
        assert!(matches!(
            decoder.decode(&relation(7, "outbox", &COLUMNS)).unwrap(),
            Change::Other
        ));
        let values = [
            Some("42"),
            Some("0193a0b4-7c1e-7d3a-9f00-0123456789ab"),
            Some("order"),
            Some("o-1"),
            Some("order.created"),
            Some(r#"{"orderId": "o-1"}"#),
            Some(r#"{"traceparent": "00-ab-cd-01"}"#),
            Some("2026-12-06 23:03:53.123456+00"),
            Some("infinity"),
            Some("0"),
            Some("2026-12-06 23:03:53.123456+00"),
            None,
            Some("3"),
            Some(r#"{"order.created": 2}"#),
            None,
        ];
        let Change::Row(row) = decoder.decode(&insert(7, &values)).unwrap() else {
            panic!("not a row");
        };
        assert_eq!(row.id, 42);
        assert_eq!(row.transaction_id.to_string(), "0193a0b4-7c1e-7d3a-9f00-0123456789ab");
        assert_eq!(row.event_type, "order.created");
        assert_eq!(row.payload, r#"{"orderId": "o-1"}"#);
        assert_eq!(row.headers["traceparent"], "00-ab-cd-01");
        assert_eq!(row.created_at.timestamp_micros(), 1_796_598_233_123_456);
        assert_eq!(row.seq, Some(3));
        assert_eq!(row.previous.unwrap()["order.created"], 2);
    }

    #[test]
    fn a_polling_row_and_other_messages_are_passed_over_and_another_table_is_an_error() {
        let mut decoder = Decoder::new(7);
        decoder.decode(&relation(7, "outbox", &["id", "published_at"])).unwrap();
        assert!(matches!(
            decoder.decode(&insert(7, &[Some("1"), None])).unwrap(),
            Change::Other
        ));
        decoder.decode(&relation(8, "orders", &["id"])).unwrap();
        assert!(decoder.decode(&insert(8, &[Some("1")])).is_err());
        assert!(matches!(decoder.decode(b"Yxyz").unwrap(), Change::Other));
    }

    #[test]
    fn a_cut_message_or_a_binary_value_is_an_error() {
        let mut decoder = Decoder::new(7);
        decoder.decode(&relation(7, "outbox", &COLUMNS)).unwrap();
        let mut cut = insert(7, &[Some("42")]);
        cut.truncate(cut.len() - 1);
        assert!(decoder.decode(&cut).is_err());
        let mut binary = insert(7, &[Some("42")]);
        binary[8] = b'b';
        assert!(decoder.decode(&binary).is_err());
    }

    #[test]
    fn timestamps_read_with_and_without_fractions() {
        assert_eq!(
            timestamp("2026-12-06 23:03:53+00").unwrap().timestamp(),
            1_796_598_233
        );
        assert!(timestamp("06/12/2026 23:03").is_err());
    }
}
