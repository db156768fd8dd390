//! The billing consumer: charges each new order to its user's ledger, marks
//! the order `CONFIRMED` and writes its `order.confirmed` outbox row, all in
//! the inbox's dedup transaction: the place where a duplicate processed
//! twice would visibly double-charge, and where a consumer publishes
//! through the outbox (consume, transform, produce).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::events::{BILLING_SUBSCRIPTION, Charge, ORDER_CREATED, OrderConfirmed, OrderEvent};
use inbox::{Event, Handler, HandlerError};
use outbox_common::amqp::Subscription;

/// Charges orders. See the module doc.
#[derive(Debug, Default, Clone)]
pub struct Billing;

impl Handler for Billing {
    type Event = OrderEvent;

    fn subscription(&self) -> Subscription {
        BILLING_SUBSCRIPTION
    }

    fn conversation_id(&self, event: &OrderEvent) -> Option<String> {
        Some(event.order_id.to_string())
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<OrderEvent>],
    ) -> Result<(), HandlerError> {
        // An order.confirmed routed here by a stray binding would read as a
        // new order (its body has every field of one): refuse it.
        if let Some(other) = events.iter().find(|e| e.event_type != ORDER_CREATED) {
            return Err(HandlerError::refused(format!(
                "billing takes order.created, not {:?}",
                other.event_type
            )));
        }
        let charged_at = Utc::now();
        let ledger_ids: HashMap<Uuid, i64> = charge_and_confirm(tx, events, charged_at)
            .await?
            .into_iter()
            .collect();
        let confirmations: Vec<_> = events
            .iter()
            .map(|event| {
                let ledger_id = *ledger_ids.get(&event.id).ok_or_else(|| {
                    HandlerError::outage(format!("no ledger row for {}", event.id))
                })?;
                let charge = Charge {
                    ledger_id,
                    amount: event.body.amount,
                    charged_at,
                };
                Ok(OrderConfirmed::new(event.id, &event.body, charge)
                    .row(event.trace_headers.clone()))
            })
            .collect::<Result<_, HandlerError>>()?;
        super::EVENTS.insert_many(tx, &confirmations).await?;
        Ok(())
    }
}

/// The ledger rows and the orders' new status, in one statement; returns
/// each event's ledger row id. The ledger's foreign key refuses a charge for
/// an order that does not exist, which refuses the event. The orders are
/// found by `id = ANY(...)`, a key lookup even in a plan cached while the
/// table was small.
async fn charge_and_confirm(
    tx: &mut PgConnection,
    events: &[Event<OrderEvent>],
    charged_at: DateTime<Utc>,
) -> sqlx::Result<Vec<(Uuid, i64)>> {
    sqlx::query_as(
        "WITH charged AS ( \
             INSERT INTO ledger (order_id, user_id, amount, transaction_id, charged_at) \
             SELECT order_id, user_id, amount, transaction_id, $5 \
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::uuid[]) \
                  AS e(order_id, user_id, amount, transaction_id) \
             RETURNING transaction_id, id), \
         confirmed AS ( \
             UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE id = ANY($1)) \
         SELECT transaction_id, id FROM charged",
    )
    .bind(events.iter().map(|e| e.body.order_id).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.body.user_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(events.iter().map(|e| e.body.amount).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(charged_at)
    .fetch_all(tx)
    .await
}
