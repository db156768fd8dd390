//! An event's place in its aggregate's history, as the relay of a
//! sequenced outbox publishes it (`x-aggregate-type`, `x-aggregate-id`,
//! `x-sequence`, `x-previous`), and the predecessor a consumer waits for.
//!
//! `x-previous` names, for each event type, the latest earlier event of
//! that type in the aggregate. A consumer waits for the greatest of those
//! whose type its queue is bound to (its subscription's routing keys,
//! matched as RabbitMQ matches a topic binding): the events of types it
//! does not take never make it wait.

use std::collections::HashMap;

use lapin::types::{AMQPValue, FieldTable};
use outbox_common::amqp::headers::{
    AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER, PREVIOUS_HEADER, SEQUENCE_HEADER,
};

use crate::message::{header, header_str};

/// Where an event stands in its aggregate's history, for one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// The kind of aggregate.
    pub aggregate_type: String,
    /// Which one.
    pub aggregate_id: String,
    /// The event's place: 1, 2, 3...
    pub seq: i64,
    /// The place of the latest earlier event this consumer takes (0 when
    /// none): the event waits until the consumer has applied it.
    pub predecessor: i64,
}

impl Sequence {
    /// The event's place, from a delivery's headers, for a consumer bound
    /// to `routing_keys`; `None` for a message without it (an unsequenced
    /// outbox, or a row written before its table was sequenced).
    pub fn read(headers: Option<&FieldTable>, routing_keys: &[&str]) -> Option<Self> {
        let seq = match header(headers, SEQUENCE_HEADER)? {
            AMQPValue::LongLongInt(n) => *n,
            AMQPValue::LongInt(n) => i64::from(*n),
            AMQPValue::LongUInt(n) => i64::from(*n),
            _ => return None,
        };
        let previous: HashMap<String, i64> =
            serde_json::from_str(&header_str(headers, PREVIOUS_HEADER)?).ok()?;
        let predecessor = previous
            .iter()
            .filter(|(event_type, _)| routing_keys.iter().any(|k| topic_matches(k, event_type)))
            .map(|(_, &seq)| seq)
            .max()
            .unwrap_or(0);
        Some(Self {
            aggregate_type: header_str(headers, AGGREGATE_TYPE_HEADER)?,
            aggregate_id: header_str(headers, AGGREGATE_ID_HEADER)?,
            seq,
            predecessor,
        })
    }
}

/// Whether a topic binding `pattern` takes routing key `key`: words split
/// on `.`, `*` is exactly one word, `#` is zero or more.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.first(), key.first()) {
            (None, None) => true,
            (Some(&"#"), _) => {
                go(&pattern[1..], key) || (!key.is_empty() && go(pattern, &key[1..]))
            }
            (Some(&"*"), Some(_)) => go(&pattern[1..], &key[1..]),
            (Some(p), Some(k)) if p == k => go(&pattern[1..], &key[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    fn headers(seq: i64, previous: &str) -> FieldTable {
        let mut h = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        h.insert(ShortString::from(AGGREGATE_TYPE_HEADER), text("cart"));
        h.insert(ShortString::from(AGGREGATE_ID_HEADER), text("c-1"));
        h.insert(
            ShortString::from(SEQUENCE_HEADER),
            AMQPValue::LongLongInt(seq),
        );
        h.insert(ShortString::from(PREVIOUS_HEADER), text(previous));
        h
    }

    #[test]
    fn the_predecessor_is_the_latest_earlier_event_of_a_bound_type() {
        let h = headers(
            4,
            r#"{"cart.opened": 1, "cart.shipped": 3, "cart.paid": 2}"#,
        );
        let bound = Sequence::read(Some(&h), &["cart.opened", "cart.paid"]).unwrap();
        assert_eq!((bound.seq, bound.predecessor), (4, 2));
        let all = Sequence::read(Some(&h), &["cart.#"]).unwrap();
        assert_eq!(all.predecessor, 3);
        let first = Sequence::read(Some(&headers(1, "{}")), &["cart.#"]).unwrap();
        assert_eq!(first.predecessor, 0);
    }

    #[test]
    fn a_message_without_a_place_has_no_sequence() {
        assert_eq!(Sequence::read(None, &["#"]), None);
        assert_eq!(Sequence::read(Some(&FieldTable::default()), &["#"]), None);
    }

    #[test]
    fn topic_patterns_match_as_rabbitmq_does() {
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.c"));
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("#", "x.y"));
        assert!(topic_matches("*.b.#", "a.b"));
        assert!(!topic_matches("*.b", "b"));
    }
}
