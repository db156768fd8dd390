//! The two consumers' side effects, written set-based: one statement applies
//! a whole batch of events.

use anyhow::Context;
use sqlx::PgConnection;
use uuid::Uuid;

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

    async fn handle(&self, conn: &mut PgConnection, events: &[&OrderEvent]) -> anyhow::Result<()> {
        let order_ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
        let user_ids: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
        let amounts: Vec<i64> = events.iter().map(|e| e.amount).collect();
        let transaction_ids: Vec<Uuid> = events.iter().map(|e| e.transaction_id).collect();
        let mut distinct = order_ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        // One statement: the ledger rows, and the orders confirmed. The
        // orders are found by `id = ANY(...)`, so even a plan cached while
        // the table was small looks them up by key instead of scanning it.
        let confirmed = sqlx::query_scalar::<_, i64>(
            "WITH charged AS ( \
                 INSERT INTO ledger (order_id, user_id, amount, transaction_id) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::uuid[])), \
             confirmed AS ( \
                 UPDATE orders SET status = 'CONFIRMED', updated_at = now() \
                 WHERE id = ANY($5::uuid[]) RETURNING id) \
             SELECT count(*) FROM confirmed",
        )
        .bind(&order_ids)
        .bind(&user_ids)
        .bind(&amounts)
        .bind(&transaction_ids)
        .bind(&distinct)
        .fetch_one(&mut *conn)
        .await
        .context("writing the ledger rows and confirming the orders")?;
        if confirmed != distinct.len() as i64 {
            match order_ids.as_slice() {
                [one] => anyhow::bail!("order {one} does not exist"),
                _ => anyhow::bail!(
                    "{} of {} orders do not exist",
                    distinct.len() as i64 - confirmed,
                    distinct.len()
                ),
            }
        }
        Ok(())
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

    async fn handle(&self, conn: &mut PgConnection, events: &[&OrderEvent]) -> anyhow::Result<()> {
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
        let bodies: Vec<String> = events
            .iter()
            .map(|e| {
                format!(
                    "Hello {}, we received your order {} for product {} ({} minor units).",
                    e.user_id, e.order_id, e.product_id, e.amount
                )
            })
            .collect();
        let order_ids: Vec<Uuid> = events.iter().map(|e| e.order_id).collect();
        let user_ids: Vec<&str> = events.iter().map(|e| e.user_id.as_str()).collect();
        let transaction_ids: Vec<Uuid> = events.iter().map(|e| e.transaction_id).collect();
        sqlx::query(
            "INSERT INTO notifications (order_id, user_id, body, transaction_id) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[])",
        )
        .bind(&order_ids)
        .bind(&user_ids)
        .bind(&bodies)
        .bind(&transaction_ids)
        .execute(conn)
        .await
        .context("recording the notifications")?;
        Ok(())
    }
}
