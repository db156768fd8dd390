//! The two consumers' side effects.

use anyhow::Context;
use sqlx::PgConnection;

use super::Handler;
use crate::amqp::{BILLING, EMAIL};
use crate::orders::{self, OrderEvent};

/// Charges the order amount to the user's ledger and confirms the order: the
/// place where a duplicate processed twice would visibly double-charge.
#[derive(Debug, Default, Clone)]
pub struct Billing;

impl Handler for Billing {
    fn name(&self) -> &'static str {
        BILLING
    }

    async fn handle(&self, conn: &mut PgConnection, event: &OrderEvent) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO ledger (order_id, user_id, amount, transaction_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(event.order_id)
        .bind(&event.user_id)
        .bind(event.amount)
        .bind(event.transaction_id)
        .execute(&mut *conn)
        .await
        .context("writing the ledger row")?;
        if !orders::confirm(conn, event.order_id)
            .await
            .context("confirming the order")?
        {
            anyhow::bail!("order {} does not exist", event.order_id);
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

    async fn handle(&self, conn: &mut PgConnection, event: &OrderEvent) -> anyhow::Result<()> {
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            anyhow::bail!("simulated SMTP failure");
        }
        let body = format!(
            "Hello {}, we received your order {} for product {} ({} minor units).",
            event.user_id, event.order_id, event.product_id, event.amount
        );
        sqlx::query(
            "INSERT INTO notifications (order_id, user_id, body, transaction_id) VALUES ($1, $2, $3, $4)",
        )
        .bind(event.order_id)
        .bind(&event.user_id)
        .bind(body)
        .bind(event.transaction_id)
        .execute(conn)
        .await
        .context("recording the notification")?;
        Ok(())
    }
}
