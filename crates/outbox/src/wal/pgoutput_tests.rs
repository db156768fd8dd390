//! The decoder against messages built as Postgres sends them.

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
        Some("cart"),
        Some("c-1"),
        Some("cart.checked_out"),
        Some(r#"{"cartId": "c-1"}"#),
        Some(r#"{"traceparent": "00-ab-cd-01"}"#),
        Some("2026-12-06 23:03:53.123456+00"),
        Some("infinity"),
        Some("0"),
        Some("2026-12-06 23:03:53.123456+00"),
        None,
        Some("3"),
        Some(r#"{"cart.checked_out": 2}"#),
        None,
    ];
    let Change::Row(row) = decoder.decode(&insert(7, &values)).unwrap() else {
        panic!("not a row");
    };
    assert_eq!(row.id, 42);
    assert_eq!(
        row.transaction_id.to_string(),
        "0193a0b4-7c1e-7d3a-9f00-0123456789ab"
    );
    assert_eq!(row.event_type, "cart.checked_out");
    assert_eq!(row.payload, r#"{"cartId": "c-1"}"#);
    assert_eq!(row.headers["traceparent"], "00-ab-cd-01");
    assert_eq!(row.created_at.timestamp_micros(), 1_796_598_233_123_456);
    assert_eq!(row.seq, Some(3));
    assert_eq!(row.previous.unwrap()["cart.checked_out"], 2);
}

#[test]
fn a_polling_row_and_other_messages_are_passed_over_and_another_table_is_an_error() {
    let mut decoder = Decoder::new(7);
    decoder
        .decode(&relation(7, "outbox", &["id", "published_at"]))
        .unwrap();
    assert!(matches!(
        decoder.decode(&insert(7, &[Some("1"), None])).unwrap(),
        Change::Other
    ));
    decoder.decode(&relation(8, "carts", &["id"])).unwrap();
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
