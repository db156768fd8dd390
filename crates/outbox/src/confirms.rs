//! Confirm settlement: what the broker said of each publish of a batch,
//! turned into which rows are published and which must be tried again. A
//! pure function over the confirms, so every case is a unit test.
//!
//! lapin hands a returned (unroutable) message to whichever confirm the
//! broker's next ack completes, and one ack may complete many publishes
//! (`multiple`), of any batch on the channel. An `Ack` therefore does not
//! yet say that its own message was routed: each return is matched to its
//! row by `message_id` (the row's `transaction_id`), whichever confirm
//! carried it.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

/// Why a publish did not reach a queue. Stored as the row's `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishFailure {
    /// The publish could not be written to the channel.
    #[error("publish failed: {0}")]
    Publish(String),
    /// No confirm came in time.
    #[error("no confirm from the broker in time")]
    ConfirmTimeout,
    /// The broker nacked it.
    #[error("nacked by the broker")]
    Nacked,
    /// The channel gave no confirm at all.
    #[error("channel is not in confirm mode")]
    NotConfirmMode,
    /// Waiting for the confirm failed (the channel closed).
    #[error("confirm failed: {0}")]
    Confirm(String),
    /// The broker returned it: no queue is bound for its routing key.
    #[error("returned by the broker: {code} {text}")]
    Returned {
        /// The reply code (312: NO_ROUTE).
        code: u16,
        /// The reply text.
        text: String,
    },
    /// A sink other than RabbitMQ refused the row ([`crate::Dispatcher`]).
    #[error("{0}")]
    Sink(String),
}

impl PublishFailure {
    /// Whether the broker, not the row, failed: no publish written in time,
    /// no confirm, a channel gone (a blocked connection under a memory
    /// alarm, a lost node). Such a row is left due as it was, without using
    /// up an attempt; a nack or a return is the row's own failure.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::Publish(_) | Self::ConfirmTimeout | Self::Confirm(_) | Self::NotConfirmMode
        )
    }
}

/// A row that must be tried again, found by its `transaction_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// The row's event id.
    pub transaction_id: Uuid,
    /// Why it failed.
    pub error: PublishFailure,
}

/// A returned message: its `message_id` (the owning row's `transaction_id`,
/// if it had one) and the broker's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Returned {
    /// The returned message's id.
    pub message_id: Option<Uuid>,
    /// The reply code.
    pub code: u16,
    /// The reply text.
    pub text: String,
}

/// One publish's confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmed {
    /// The published row's id.
    pub row_id: i64,
    /// Its event id.
    pub transaction_id: Uuid,
    /// Acked, or why not. An ack does not yet say the message was routed:
    /// its return may ride on another publish's confirm.
    pub outcome: Result<(), PublishFailure>,
    /// A returned message this confirm carried, perhaps another publish's.
    pub returned: Option<Returned>,
}

/// What a batch's confirms mean for its rows and for other batches' rows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Ids of the rows confirmed as routed and stored.
    pub published: Vec<i64>,
    /// Rows of this batch to try again: nacked or returned.
    pub failed: Vec<Failed>,
    /// Rows of this batch the broker did not confirm (see
    /// [`PublishFailure::is_outage`]): left due as they are.
    pub unconfirmed: Vec<Uuid>,
    /// Rows of OTHER batches whose returns rode on this batch's confirms
    /// (on a channel two batches shared, or late, after their batch gave up
    /// on its confirms): they must be made due again, in case their own
    /// batch marked them published.
    pub returned_elsewhere: Vec<Failed>,
}

/// Settles a batch once every confirm is in. `batch` maps each row's
/// `transaction_id` to its id. A row is published only if it was acked and
/// no return names it; a return without a `message_id` fails the row whose
/// confirm carried it, so that row is at least not marked published.
pub fn settle(batch: &HashMap<Uuid, i64>, confirms: Vec<Confirmed>) -> Settlement {
    let mut settlement = Settlement::default();
    let mut failed: HashMap<Uuid, PublishFailure> = HashMap::new();
    let mut acked: Vec<(Uuid, i64)> = Vec::new();
    let mut returns = Vec::new();
    for confirmed in confirms {
        match confirmed.outcome {
            Ok(()) => acked.push((confirmed.transaction_id, confirmed.row_id)),
            Err(error) => {
                failed.entry(confirmed.transaction_id).or_insert(error);
            }
        }
        if let Some(returned) = confirmed.returned {
            let owner = returned.message_id.unwrap_or(confirmed.transaction_id);
            returns.push((owner, returned));
        }
    }
    let mut returned_here = HashSet::new();
    for (owner, returned) in returns {
        let error = PublishFailure::Returned {
            code: returned.code,
            text: returned.text,
        };
        if batch.contains_key(&owner) {
            returned_here.insert(owner);
            failed.entry(owner).or_insert(error);
        } else {
            settlement.returned_elsewhere.push(Failed {
                transaction_id: owner,
                error,
            });
        }
    }
    settlement.published = acked
        .into_iter()
        .filter(|(transaction_id, _)| {
            !returned_here.contains(transaction_id) && !failed.contains_key(transaction_id)
        })
        .map(|(_, row_id)| row_id)
        .collect();
    for (transaction_id, error) in failed {
        if error.is_outage() {
            settlement.unconfirmed.push(transaction_id);
        } else {
            settlement.failed.push(Failed {
                transaction_id,
                error,
            });
        }
    }
    settlement.unconfirmed.sort();
    settlement.failed.sort_by_key(|f| f.transaction_id);
    settlement
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> (Uuid, i64) {
        (Uuid::from_u128(n), n as i64)
    }

    fn batch(rows: &[(Uuid, i64)]) -> HashMap<Uuid, i64> {
        rows.iter().copied().collect()
    }

    fn ack((transaction_id, row_id): (Uuid, i64)) -> Confirmed {
        Confirmed {
            row_id,
            transaction_id,
            outcome: Ok(()),
            returned: None,
        }
    }

    fn returned(owner: Option<Uuid>) -> Option<Returned> {
        Some(Returned {
            message_id: owner,
            code: 312,
            text: "NO_ROUTE".into(),
        })
    }

    #[test]
    fn every_acked_row_is_published() {
        let rows = [ids(1), ids(2)];
        let s = settle(&batch(&rows), rows.iter().copied().map(ack).collect());
        assert_eq!(s.published, vec![1, 2]);
        assert!(s.failed.is_empty() && s.returned_elsewhere.is_empty());
    }

    #[test]
    fn a_nacked_row_fails_and_the_others_are_published() {
        let rows = [ids(1), ids(2)];
        let mut nacked = ack(rows[1]);
        nacked.outcome = Err(PublishFailure::Nacked);
        let s = settle(&batch(&rows), vec![ack(rows[0]), nacked]);
        assert_eq!(s.published, vec![1]);
        assert_eq!(s.failed[0].transaction_id, rows[1].0);
        assert_eq!(s.failed[0].error, PublishFailure::Nacked);
    }

    #[test]
    fn a_return_carried_by_another_rows_ack_fails_its_own_row() {
        // Row 2's message was unroutable; its return rode on row 1's ack,
        // and row 2 got a plain ack.
        let rows = [ids(1), ids(2)];
        let mut carrier = ack(rows[0]);
        carrier.returned = returned(Some(rows[1].0));
        let s = settle(&batch(&rows), vec![carrier, ack(rows[1])]);
        assert_eq!(s.published, vec![1]);
        assert_eq!(s.failed.len(), 1);
        assert_eq!(s.failed[0].transaction_id, rows[1].0);
        assert!(matches!(
            s.failed[0].error,
            PublishFailure::Returned { code: 312, .. }
        ));
    }

    #[test]
    fn a_return_arriving_on_another_batchs_ack_reopens_that_row() {
        // This batch holds rows 1 and 2; the return belongs to row 9 of
        // another batch, which may have marked it published already.
        let rows = [ids(1), ids(2)];
        let mut carrier = ack(rows[0]);
        carrier.returned = returned(Some(Uuid::from_u128(9)));
        let s = settle(&batch(&rows), vec![carrier, ack(rows[1])]);
        assert_eq!(s.published, vec![1, 2]);
        assert!(s.failed.is_empty());
        assert_eq!(s.returned_elsewhere.len(), 1);
        assert_eq!(s.returned_elsewhere[0].transaction_id, Uuid::from_u128(9));
    }

    #[test]
    fn a_return_without_a_message_id_fails_the_row_that_carried_it() {
        let rows = [ids(1), ids(2)];
        let mut carrier = ack(rows[1]);
        carrier.returned = returned(None);
        let s = settle(&batch(&rows), vec![ack(rows[0]), carrier]);
        assert_eq!(s.published, vec![1]);
        assert_eq!(s.failed[0].transaction_id, rows[1].0);
    }

    #[test]
    fn an_unconfirmed_row_is_left_as_it_was_not_failed() {
        let rows = [ids(1), ids(2)];
        let mut lost = ack(rows[1]);
        lost.outcome = Err(PublishFailure::ConfirmTimeout);
        let s = settle(&batch(&rows), vec![ack(rows[0]), lost]);
        assert_eq!(s.published, vec![1]);
        assert!(s.failed.is_empty(), "no attempt is used up");
        assert_eq!(s.unconfirmed, vec![rows[1].0]);
    }

    #[test]
    fn a_row_nacked_and_returned_fails_once() {
        let rows = [ids(1)];
        let mut both = ack(rows[0]);
        both.outcome = Err(PublishFailure::Nacked);
        both.returned = returned(Some(rows[0].0));
        let s = settle(&batch(&rows), vec![both]);
        assert!(s.published.is_empty());
        assert_eq!(s.failed.len(), 1);
    }
}
