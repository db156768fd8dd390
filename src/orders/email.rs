//! The e-mail consumer: one notification per event, "order received" for
//! `order.created` and "payment confirmed" for `order.confirmed`, written in
//! the inbox's dedup transaction.

use sqlx::PgConnection;

use super::events::{AGGREGATE, EMAIL_SUBSCRIPTION, ORDER_CONFIRMED, ORDER_CREATED, OrderEvent};
use super::mailer::{MAILS, MailRow};
use inbox::{Event, Handler, HandlerError};
use outbox::NewOutboxEvent;
use outbox_common::amqp::Subscription;

/// Records the e-mail of each order event and, when the mailer is on,
/// writes it to the mails' outbox in the same transaction. `failure_rate`
/// makes a share of events fail, to watch retries and dead letters in a demo;
/// `poison_product` makes some fail every time.
#[derive(Debug, Default, Clone)]
pub struct Email {
    pub failure_rate: f64,
    /// The `order.created` of an order for this product is always refused:
    /// a poison event, dead-lettered after its retries, with the order's
    /// later events behind it (accepted, so they show whether the order's
    /// history is held behind it).
    pub poison_product: Option<String>,
    /// With the mailer on: mails go to `<userId>@<this domain>`.
    pub recipient_domain: Option<String>,
    /// Applies one order's events in sequence (`EMAIL_IN_SEQUENCE`, on by
    /// default): "Payment confirmed" is never written, nor mailed, before
    /// "Order received".
    pub in_sequence: bool,
}

/// One e-mail: its subject and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub subject: String,
    pub body: String,
}

impl Mail {
    /// The mail for an event of `event_type`; `None` for a type this
    /// consumer does not know.
    pub fn for_event(event_type: &str, e: &OrderEvent) -> Option<Self> {
        let (order, user) = (e.order_id, &e.user_id);
        match event_type {
            ORDER_CREATED => Some(Self {
                subject: format!("Order {order} received"),
                body: format!(
                    "Hello {user}, we received your order {order} for product {} ({} minor units).",
                    e.product_id, e.amount
                ),
            }),
            ORDER_CONFIRMED => Some(Self {
                subject: format!("Payment confirmed for order {order}"),
                body: format!(
                    "Hello {user}, your payment of {} minor units for order {order} (product {}) is confirmed.",
                    e.amount, e.product_id
                ),
            }),
            _ => None,
        }
    }
}

impl Handler for Email {
    type Event = OrderEvent;

    fn subscription(&self) -> Subscription {
        EMAIL_SUBSCRIPTION
    }

    fn conversation_id(&self, event: &OrderEvent) -> Option<String> {
        Some(event.order_id.to_string())
    }

    fn in_sequence(&self) -> bool {
        self.in_sequence
    }

    async fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<OrderEvent>],
    ) -> Result<(), HandlerError> {
        self.simulate_failure(events.len())?;
        self.refuse_poison(events)?;
        let mut mails = Vec::with_capacity(events.len());
        for event in events {
            let mail = Mail::for_event(&event.event_type, &event.body).ok_or_else(|| {
                HandlerError::refused(format!("no e-mail for event type {:?}", event.event_type))
            })?;
            mails.push(mail);
        }
        sqlx::query(
            "INSERT INTO notifications (order_id, user_id, event_type, subject, body, transaction_id) \
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::uuid[])",
        )
        .bind(events.iter().map(|e| e.body.order_id).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.body.user_id.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())
        .bind(mails.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>())
        .bind(mails.iter().map(|m| m.body.as_str()).collect::<Vec<_>>())
        .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        if let Some(domain) = &self.recipient_domain {
            let rows: Vec<NewOutboxEvent> = events
                .iter()
                .zip(mails)
                .map(|(event, mail)| mail_row(event, mail, domain))
                .collect();
            MAILS.insert_many(tx, &rows).await?;
        }
        Ok(())
    }
}

/// The mails' outbox row of `event`: its id becomes the `Message-ID`, and
/// the consumer span's context makes the SMTP send part of the event's trace.
fn mail_row(event: &Event<OrderEvent>, mail: Mail, domain: &str) -> NewOutboxEvent {
    let row = MailRow {
        to: format!("{}@{domain}", event.body.user_id),
        subject: mail.subject,
        body: mail.body,
    };
    NewOutboxEvent {
        transaction_id: event.id,
        aggregate_type: AGGREGATE,
        aggregate_id: event.body.order_id.to_string(),
        event_type: if event.event_type == ORDER_CONFIRMED {
            ORDER_CONFIRMED
        } else {
            ORDER_CREATED
        },
        payload: serde_json::to_value(row).expect("a mail serialises"),
        headers: event.trace_headers.clone(),
    }
}

impl Email {
    /// With a failure rate, failures are drawn one event at a time, so each
    /// event fails with exactly `failure_rate`: a batch is refused first and
    /// the inbox applies it again one by one.
    fn simulate_failure(&self, events: usize) -> Result<(), HandlerError> {
        if self.failure_rate <= 0.0 {
            return Ok(());
        }
        if events > 1 {
            return Err(HandlerError::refused(
                "simulated failures are drawn one event at a time",
            ));
        }
        if rand::random::<f64>() < self.failure_rate {
            return Err(HandlerError::refused("simulated SMTP failure"));
        }
        Ok(())
    }

    /// Refuses events holding a poison event; in a batch the inbox then
    /// applies them one by one, so only the poison event itself is refused
    /// again (and retried, then dead-lettered).
    fn refuse_poison(&self, events: &[Event<OrderEvent>]) -> Result<(), HandlerError> {
        let Some(product) = &self.poison_product else {
            return Ok(());
        };
        let poisoned =
            |e: &Event<OrderEvent>| e.event_type == ORDER_CREATED && e.body.product_id == *product;
        match events.iter().find(|e| poisoned(e)) {
            Some(e) => Err(HandlerError::refused(format!(
                "poison event: order.created of product {product} (order {})",
                e.body.order_id
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, product: &str) -> Event<OrderEvent> {
        let body = OrderEvent {
            transaction_id: uuid::Uuid::new_v4(),
            order_id: uuid::Uuid::new_v4(),
            product_id: product.into(),
            user_id: "user_1".into(),
            amount: 500,
            timestamp: chrono::Utc::now(),
        };
        Event {
            id: body.transaction_id,
            event_type: event_type.into(),
            body,
            attempt: 0,
            trace_headers: serde_json::Value::Null,
            sequence: None,
        }
    }

    #[test]
    fn only_the_poison_products_order_created_is_refused() {
        let email = Email {
            poison_product: Some("poison".into()),
            ..Email::default()
        };
        let poison = event(ORDER_CREATED, "poison");
        assert!(email.refuse_poison(std::slice::from_ref(&poison)).is_err());
        // A batch holding it is refused whole (then applied one by one).
        let batch = [event(ORDER_CREATED, "p1"), poison];
        assert!(email.refuse_poison(&batch).is_err());
        // Its order's later events, and other products' events, go through.
        assert!(
            email
                .refuse_poison(&[event(ORDER_CONFIRMED, "poison")])
                .is_ok()
        );
        assert!(email.refuse_poison(&[event(ORDER_CREATED, "p1")]).is_ok());
        assert!(Email::default().refuse_poison(&batch).is_ok());
    }
}
