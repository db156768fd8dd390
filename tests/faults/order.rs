//! The ordering checker (issue 23): for every order, the sequence numbers
//! of its events, in the order the e-mail consumer applied them (its
//! `notifications` rows in id order) and in the order their mails reached
//! the SMTP server (the mailbox's lines, first arrival of each
//! `Message-ID`), must be 1, 2, 3, ... : strictly increasing, with no gap.
//! The e-mail consumer is bound to every event type an order has in this
//! service (`order.created`, seq 1, and `order.confirmed`, seq 2), so no
//! sequence number may be skipped and each order's must start at 1.
//!
//! An event's sequence number is its outbox row's `seq`. Rows without one
//! (written before that column existed, or before the migration that adds
//! it) cannot be checked: they are counted apart ("not checked"), with what
//! their event types alone show (`order.created` before `order.confirmed`),
//! and fail the scenario only under [`REQUIRE_SEQ`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use order_service::orders::mailer::message_id;
use order_service::orders::{ORDER_CONFIRMED, ORDER_CREATED};
use sqlx::PgPool;
use uuid::Uuid;

use crate::smtp::read_mailbox;

/// Whether an event without a sequence number fails the scenario: the
/// events' outbox numbers every event (`seq`), so one without is a fault.
pub const REQUIRE_SEQ: bool = true;

/// How many violations a failure message quotes.
const EXAMPLES: usize = 5;

/// One event of an order, as a consumer applied it or as its mail arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub order: String,
    pub event_type: String,
    /// Its outbox row's `seq`; `None` for a row without one.
    pub seq: Option<i64>,
}

/// Where an order's sequence first went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// `then` came after `first` though it is not above it: a swapped pair,
    /// or an event applied twice.
    OutOfOrder { first: i64, then: i64 },
    /// `seq` came right after `after` (0: first), and those between never
    /// came.
    Gap { after: i64, seq: i64 },
}

/// The first place where `seqs` is not 1, 2, 3, ... ; `None` if it is (or
/// is a prefix of it: a missing tail is the loss checks' business).
pub fn first_violation(seqs: &[i64]) -> Option<Violation> {
    let mut after = 0;
    for (i, &seq) in seqs.iter().enumerate() {
        if seq <= after {
            return Some(Violation::OutOfOrder {
                first: after,
                then: seq,
            });
        }
        if seq > after + 1 {
            // A skipped one that comes later makes it a swap, not a gap.
            let skipped = seqs[i + 1..].iter().find(|&&s| s > after && s < seq);
            return Some(match skipped {
                Some(&then) => Violation::OutOfOrder { first: seq, then },
                None => Violation::Gap { after, seq },
            });
        }
        after = seq;
    }
    None
}

/// What the checker found over every order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderCheck {
    /// Orders whose every event has a sequence number, checked by it.
    pub checked: usize,
    /// Of those, orders whose sequence is out of order or has a gap.
    pub violations: usize,
    /// Of those, how many were out of order and how many had a gap.
    pub out_of_order: usize,
    pub gaps: usize,
    /// The first few violations, for a failure message.
    pub examples: Vec<String>,
    /// Events without a sequence number, and the orders they belong to
    /// (not checked).
    pub without_seq: usize,
    pub unchecked: usize,
    /// Of the unchecked orders, those whose events went out of order by
    /// their types alone (`order.confirmed` before `order.created`):
    /// information, not a verdict.
    pub by_type: usize,
}

impl OrderCheck {
    /// No violation (and, under [`REQUIRE_SEQ`], nothing unchecked).
    pub fn passed(&self) -> bool {
        self.violations == 0 && !(REQUIRE_SEQ && self.without_seq > 0)
    }

    /// For the summary line: `"{what} violations: 0"`, or what could not be
    /// checked.
    pub fn summary(&self, what: &str, events: &str) -> String {
        let mut line = format!(
            "{what} violations: {} ({} orders checked",
            self.violations, self.checked
        );
        if self.violations > 0 {
            line.push_str(&format!(
                "; {} out of order, {} with a gap",
                self.out_of_order, self.gaps
            ));
        }
        line.push(')');
        if self.without_seq > 0 {
            line.push_str(&format!(
                "; {what}: not checked, {} {events} without seq in {} orders \
                 (by event type: {} orders out of order)",
                self.without_seq, self.unchecked, self.by_type
            ));
        }
        line
    }
}

/// The rank of an event type in an order's history, for events without a
/// sequence number: what the types alone say about their order.
fn type_rank(event_type: &str) -> i64 {
    match event_type {
        ORDER_CREATED => 1,
        ORDER_CONFIRMED => 2,
        _ => i64::MAX,
    }
}

/// Checks every order's steps, taken in the order given (apply or arrival
/// order).
pub fn check(steps: &[Step]) -> OrderCheck {
    let mut by_order: BTreeMap<&str, Vec<&Step>> = BTreeMap::new();
    for step in steps {
        by_order.entry(&step.order).or_default().push(step);
    }
    let mut found = OrderCheck::default();
    for (order, steps) in by_order {
        let seqs: Option<Vec<i64>> = steps.iter().map(|s| s.seq).collect();
        let Some(seqs) = seqs else {
            found.unchecked += 1;
            found.without_seq += steps.iter().filter(|s| s.seq.is_none()).count();
            let ranks: Vec<i64> = steps.iter().map(|s| type_rank(&s.event_type)).collect();
            if ranks.windows(2).any(|w| w[1] <= w[0]) {
                found.by_type += 1;
            }
            continue;
        };
        found.checked += 1;
        let Some(violation) = first_violation(&seqs) else {
            continue;
        };
        found.violations += 1;
        match violation {
            Violation::OutOfOrder { .. } => found.out_of_order += 1,
            Violation::Gap { .. } => found.gaps += 1,
        }
        if found.examples.len() < EXAMPLES {
            found
                .examples
                .push(format!("order {order}: {violation:?} in {seqs:?}"));
        }
    }
    found
}

/// The e-mail consumer's applied events, in apply order: its
/// `notifications` rows by id (a bigserial taken at insert; one order's
/// applies are serialised), each with its event's outbox `seq`. Read
/// through `to_jsonb`, so the query runs whether or not the column exists
/// yet (NULL when it does not).
pub async fn applied(pool: &PgPool) -> sqlx::Result<Vec<Step>> {
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT n.order_id::text, n.event_type, (to_jsonb(x) ->> 'seq')::bigint \
         FROM notifications n LEFT JOIN outbox x ON x.transaction_id = n.transaction_id \
         ORDER BY n.id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(order, event_type, seq)| Step {
            order,
            event_type,
            seq,
        })
        .collect())
}

/// The mails that reached the SMTP server of `mailbox`, in arrival order
/// (the first arrival of each `Message-ID`: a mailer killed mid-send sends
/// again, under the same id), each with its event's order, type and `seq`;
/// and how many arrivals were such repeats. A `Message-ID` that names no
/// event is a step with an empty order.
pub async fn arrived(pool: &PgPool, mailbox: &Path) -> sqlx::Result<(Vec<Step>, usize)> {
    let events: Vec<(Uuid, String, String, Option<i64>)> = sqlx::query_as(
        "SELECT transaction_id, aggregate_id, event_type, (to_jsonb(x) ->> 'seq')::bigint \
         FROM outbox x",
    )
    .fetch_all(pool)
    .await?;
    let by_message_id: HashMap<String, (String, String, Option<i64>)> = events
        .into_iter()
        .map(|(id, order, event_type, seq)| (message_id(id), (order, event_type, seq)))
        .collect();
    let mut seen = HashSet::new();
    let mut steps = Vec::new();
    let mut repeats = 0;
    for mail in read_mailbox(mailbox) {
        if !seen.insert(mail.message_id.clone()) {
            repeats += 1;
            continue;
        }
        let (order, event_type, seq) = by_message_id
            .get(&mail.message_id)
            .cloned()
            .unwrap_or_default();
        steps.push(Step {
            order,
            event_type,
            seq,
        });
    }
    Ok((steps, repeats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(order: &str, event_type: &str, seq: Option<i64>) -> Step {
        Step {
            order: order.into(),
            event_type: event_type.into(),
            seq,
        }
    }

    #[test]
    fn a_sequence_must_be_one_two_three() {
        assert_eq!(first_violation(&[]), None);
        assert_eq!(first_violation(&[1, 2, 3]), None);
        assert_eq!(first_violation(&[1]), None);
        assert_eq!(
            first_violation(&[2, 1]),
            Some(Violation::OutOfOrder { first: 2, then: 1 })
        );
        assert_eq!(
            first_violation(&[1, 3, 2]),
            Some(Violation::OutOfOrder { first: 3, then: 2 })
        );
        assert_eq!(
            first_violation(&[1, 2, 2]),
            Some(Violation::OutOfOrder { first: 2, then: 2 })
        );
        assert_eq!(
            first_violation(&[1, 3]),
            Some(Violation::Gap { after: 1, seq: 3 })
        );
        assert_eq!(
            first_violation(&[2]),
            Some(Violation::Gap { after: 0, seq: 2 })
        );
    }

    #[test]
    fn a_swapped_pair_is_one_violation() {
        // Order b's events applied in the wrong order, among orders in order.
        let steps = [
            step("a", ORDER_CREATED, Some(1)),
            step("b", ORDER_CONFIRMED, Some(2)),
            step("a", ORDER_CONFIRMED, Some(2)),
            step("c", ORDER_CREATED, Some(1)),
            step("b", ORDER_CREATED, Some(1)),
            step("c", ORDER_CONFIRMED, Some(2)),
        ];
        let found = check(&steps);
        assert_eq!(
            (
                found.checked,
                found.violations,
                found.out_of_order,
                found.gaps
            ),
            (3, 1, 1, 0),
            "{found:?}"
        );
        assert!(!found.passed());
        assert_eq!(found.examples.len(), 1);
        assert!(found.examples[0].starts_with("order b:"), "{found:?}");
        assert!(
            found
                .summary("order", "events")
                .starts_with("order violations: 1 ")
        );
    }

    #[test]
    fn a_gap_is_one_violation() {
        // Order b's seq 2 was skipped: 1 then 3.
        let steps = [
            step("a", ORDER_CREATED, Some(1)),
            step("b", ORDER_CREATED, Some(1)),
            step("a", ORDER_CONFIRMED, Some(2)),
            step("b", "order.shipped", Some(3)),
        ];
        let found = check(&steps);
        assert_eq!(
            (
                found.checked,
                found.violations,
                found.gaps,
                found.out_of_order
            ),
            (2, 1, 1, 0),
            "{found:?}"
        );
        assert!(!found.passed());
    }

    #[test]
    fn orders_in_sequence_pass() {
        let steps = [
            step("a", ORDER_CREATED, Some(1)),
            step("b", ORDER_CREATED, Some(1)),
            step("b", ORDER_CONFIRMED, Some(2)),
            step("a", ORDER_CONFIRMED, Some(2)),
        ];
        let found = check(&steps);
        assert_eq!((found.checked, found.violations), (2, 0));
        assert!(found.passed());
        assert_eq!(
            found.summary("order", "events"),
            "order violations: 0 (2 orders checked)"
        );
    }

    #[test]
    fn events_without_seq_are_not_checked_but_reported() {
        // Before the outbox has `seq`: no verdict, but the types show b's
        // inversion.
        let steps = [
            step("a", ORDER_CREATED, None),
            step("b", ORDER_CONFIRMED, None),
            step("a", ORDER_CONFIRMED, None),
            step("b", ORDER_CREATED, None),
        ];
        let found = check(&steps);
        assert_eq!(
            (found.checked, found.violations, found.unchecked),
            (0, 0, 2)
        );
        assert_eq!((found.without_seq, found.by_type), (4, 1));
        assert_eq!(found.passed(), !REQUIRE_SEQ);
        assert!(
            found
                .summary("order", "events")
                .contains("order: not checked, 4 events without seq in 2 orders")
        );
    }
}
