//! The order events, their envelope and the queues that take them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use outbox::NewOutboxEvent;
use outbox_common::amqp::Subscription;

/// The event type of a new order, also its routing key. Written by the API.
pub const ORDER_CREATED: &str = "order.created";
/// The event type of a charged order. Written by the billing handler in its
/// dedup transaction, with the charge.
pub const ORDER_CONFIRMED: &str = "order.confirmed";
/// The outbox's `aggregate_type` of every order event.
pub const AGGREGATE: &str = "order";

/// The consumer that sends order e-mails.
pub const EMAIL: &str = "email_notification_service";
/// The consumer that charges orders.
pub const BILLING: &str = "billing_service";

/// The e-mail consumer's queue takes both events.
pub const EMAIL_SUBSCRIPTION: Subscription = Subscription {
    consumer: EMAIL,
    routing_keys: &[ORDER_CREATED, ORDER_CONFIRMED],
};
/// The billing consumer's queue takes new orders.
pub const BILLING_SUBSCRIPTION: Subscription = Subscription {
    consumer: BILLING,
    routing_keys: &[ORDER_CREATED],
};
/// Every consumer of order events: the relay declares these queues before
/// it publishes.
pub const SUBSCRIPTIONS: [Subscription; 2] = [EMAIL_SUBSCRIPTION, BILLING_SUBSCRIPTION];

/// The message body: the original design's flat order event plus its id, so
/// consumers written for it (`JSON.parse(msg.content).orderId`) keep working.
/// `order.confirmed` carries these fields too, plus the charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    pub transaction_id: Uuid,
    pub order_id: Uuid,
    pub product_id: String,
    pub user_id: String,
    pub amount: i64,
    pub timestamp: DateTime<Utc>,
}

/// The body of `order.confirmed`: the order's envelope and its charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmed {
    #[serde(flatten)]
    pub order: OrderEvent,
    pub charge: Charge,
}

/// What billing charged for an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Charge {
    /// The ledger row's id.
    pub ledger_id: i64,
    pub amount: i64,
    pub charged_at: DateTime<Utc>,
}

impl OrderEvent {
    /// This event as an outbox row of type `event_type`, with `payload` as
    /// its body and `trace_headers` as the writer's trace context.
    fn outbox_row(
        &self,
        event_type: &'static str,
        payload: serde_json::Value,
        trace_headers: serde_json::Value,
    ) -> NewOutboxEvent {
        NewOutboxEvent {
            transaction_id: self.transaction_id,
            aggregate_type: AGGREGATE,
            aggregate_id: self.order_id.to_string(),
            event_type,
            payload,
            headers: trace_headers,
        }
    }

    /// The `order.created` outbox row of this event.
    pub fn created_row(&self, trace_headers: serde_json::Value) -> NewOutboxEvent {
        let payload = serde_json::to_value(self).expect("an event serialises");
        self.outbox_row(ORDER_CREATED, payload, trace_headers)
    }
}

impl OrderConfirmed {
    /// The confirmation of the order `created` announced, with `charge`. Its
    /// id is derived from `created_id` (the `order.created` event's id), so
    /// one `order.created` can only ever confirm its order once: a second
    /// row with the same id is refused by the outbox's unique key.
    pub fn new(created_id: Uuid, created: &OrderEvent, charge: Charge) -> Self {
        Self {
            order: OrderEvent {
                transaction_id: Uuid::new_v5(&created_id, ORDER_CONFIRMED.as_bytes()),
                timestamp: charge.charged_at,
                ..created.clone()
            },
            charge,
        }
    }

    /// Its outbox row.
    pub fn row(&self, trace_headers: serde_json::Value) -> NewOutboxEvent {
        let payload = serde_json::to_value(self).expect("an event serialises");
        self.order
            .outbox_row(ORDER_CONFIRMED, payload, trace_headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> OrderEvent {
        OrderEvent {
            transaction_id: Uuid::new_v4(),
            order_id: Uuid::new_v4(),
            product_id: "123".into(),
            user_id: "user_99".into(),
            amount: 500,
            timestamp: Utc::now(),
        }
    }

    #[test]
    fn a_confirmation_is_the_flat_envelope_plus_the_charge() {
        let created = created();
        let charge = Charge {
            ledger_id: 7,
            amount: 500,
            charged_at: Utc::now(),
        };
        let confirmed = OrderConfirmed::new(created.transaction_id, &created, charge);
        let body = serde_json::to_value(&confirmed).unwrap();
        assert_eq!(body["orderId"], created.order_id.to_string());
        assert_eq!(body["amount"], 500);
        assert_eq!(body["charge"]["ledgerId"], 7);
        // A consumer of the envelope alone reads it as an order event.
        let envelope: OrderEvent = serde_json::from_value(body).unwrap();
        assert_eq!(envelope.order_id, created.order_id);
        assert_ne!(envelope.transaction_id, created.transaction_id);
    }

    #[test]
    fn the_same_order_created_always_gives_the_same_confirmation_id() {
        let created = created();
        let charge = |id| Charge {
            ledger_id: id,
            amount: 500,
            charged_at: Utc::now(),
        };
        let a = OrderConfirmed::new(created.transaction_id, &created, charge(1));
        let b = OrderConfirmed::new(created.transaction_id, &created, charge(2));
        assert_eq!(a.order.transaction_id, b.order.transaction_id);
    }
}
