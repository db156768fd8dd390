//! The two consumers' side effects, written set-based: one statement applies
//! a whole batch of events, together with its dedup rows.

use super::Handler;
use crate::amqp::{BILLING, EMAIL};
use crate::orders::OrderEvent;

/// Charges the order amount to the user's ledger and confirms the order: the
/// place where a duplicate processed twice would visibly double-charge.
#[derive(Debug, Default, Clone)]
pub struct Billing;

impl Handler for Billing {
    fn name(&self) -> &'static str {
        BILLING
    }

    /// The ledger's foreign key refuses a charge for an order that does not
    /// exist, which fails the statement. The orders are found by
    /// `id = ANY(ARRAY(...))`, a key lookup even in a plan cached while the
    /// table was small.
    fn effect(&self) -> &'static str {
        "charged AS ( \
             INSERT INTO ledger (order_id, user_id, amount, transaction_id) \
             SELECT order_id, user_id, amount, transaction_id FROM events), \
         confirmed AS ( \
             UPDATE orders SET status = 'CONFIRMED', updated_at = now() \
             WHERE id = ANY(ARRAY(SELECT order_id FROM events)))"
    }
}

/// Records the e-mail it "sends" (simulated SMTP). `failure_rate` makes a
/// share of sends fail, to watch retries and dead letters in a demo.
#[derive(Debug, Default, Clone)]
pub struct Email {
    pub failure_rate: f64,
}

impl Handler for Email {
    fn name(&self) -> &'static str {
        EMAIL
    }

    fn effect(&self) -> &'static str {
        "sent AS ( \
             INSERT INTO notifications (order_id, user_id, body, transaction_id) \
             SELECT order_id, user_id, \
                    format('Hello %s, we received your order %s for product %s (%s minor units).', \
                           user_id, order_id, product_id, amount), \
                    transaction_id \
             FROM events)"
    }

    fn check(&self, events: &[&OrderEvent]) -> anyhow::Result<()> {
        if self.failure_rate > 0.0 {
            // Failures are drawn one message at a time, so each message fails
            // with exactly `failure_rate`: a batch goes back one by one.
            anyhow::ensure!(
                events.len() == 1,
                "simulated failures are drawn one message at a time"
            );
            if rand::random::<f64>() < self.failure_rate {
                anyhow::bail!("simulated SMTP failure");
            }
        }
        Ok(())
    }
}
