//! What is kept of a held delivery, and the message it becomes again.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use uuid::Uuid;

/// What of a delivery is kept while it is held, to publish it again.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Its headers' text and integer values.
    pub headers: serde_json::Value,
}

impl Raw {
    pub fn of(delivery: &Delivery) -> Self {
        let headers = delivery.properties.headers().as_ref().map(|h| {
            h.inner()
                .iter()
                .filter_map(|(name, value)| {
                    let value = match value {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
                        AMQPValue::ShortString(s) => s.as_str().into(),
                        AMQPValue::LongLongInt(n) => (*n).into(),
                        AMQPValue::LongInt(n) => (*n).into(),
                        AMQPValue::LongUInt(n) => (*n).into(),
                        _ => return None,
                    };
                    Some((name.as_str().to_owned(), value))
                })
                .collect::<serde_json::Map<_, _>>()
        });
        Self {
            routing_key: delivery.routing_key.as_str().to_owned(),
            body: delivery.data.clone(),
            headers: headers.map_or(serde_json::json!({}), serde_json::Value::Object),
        }
    }
}

/// A held event ready to be published again.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct HeldRow {
    pub transaction_id: Uuid,
    pub event_type: String,
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
}

impl HeldRow {
    /// The properties it is published again with: those the relay gave it.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(map) = self.headers.as_object() {
            for (name, value) in map {
                let value = match value {
                    serde_json::Value::String(s) => AMQPValue::LongString(s.as_str().into()),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(n) => AMQPValue::LongLongInt(n),
                        None => continue,
                    },
                    _ => continue,
                };
                headers.insert(name.as_str().into(), value);
            }
        }
        BasicProperties::default()
            .with_message_id(self.transaction_id.to_string().into())
            .with_type(self.event_type.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers)
    }
}
