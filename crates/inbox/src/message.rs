//! Reading a delivery (id, event type, body, attempt count, trace context)
//! and forwarding it to a delay queue or the dead-letter queue.

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::de::DeserializeOwned;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use outbox_common::amqp::headers::{
    ATTEMPT_HEADER, ERROR_HEADER, ORIGIN_HEADER, PUBLISHED_AT_HEADER,
};
use outbox_common::amqp::{BrokerError, Doing};
use outbox_common::propagation;

/// The longest any single broker call (ack, publish, confirm) may take. On a
/// dead connection lapin can leave a command unanswered; past this the call
/// counts as failed and the message is left for redelivery.
pub const AMQP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a broker call on a message (an ack, a publish, its confirm) failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerCallError {
    /// The broker or the connection failed the call.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The ack got no answer within [`AMQP_TIMEOUT`].
    #[error("ack timed out")]
    AckTimedOut(#[source] tokio::time::error::Elapsed),
    /// The publish and its confirm took longer than [`AMQP_TIMEOUT`].
    #[error("no confirm from {routing_key} in time")]
    ConfirmTimedOut {
        /// Where the message was published to.
        routing_key: String,
        /// The timeout.
        #[source]
        source: tokio::time::error::Elapsed,
    },
    /// The broker could not route the message anywhere (it was published
    /// mandatory) and returned it.
    #[error("{routing_key} returned the message: {reply_code} {reply_text}")]
    Returned {
        /// Where the message was published to.
        routing_key: String,
        /// The broker's reply code (`312 NO_ROUTE`, say).
        reply_code: u16,
        /// The broker's reply text.
        reply_text: String,
    },
    /// The broker did not take the message (a nack).
    #[error("{routing_key} did not confirm the message: {confirmation}")]
    NotConfirmed {
        /// Where the message was published to.
        routing_key: String,
        /// The broker's answer, as lapin prints it.
        confirmation: String,
    },
}

/// Acks a delivery, bounded by [`AMQP_TIMEOUT`].
pub async fn ack(delivery: &Delivery) -> Result<(), BrokerCallError> {
    tokio::time::timeout(
        AMQP_TIMEOUT,
        delivery.ack(lapin::options::BasicAckOptions::default()),
    )
    .await
    .map_err(BrokerCallError::AckTimedOut)?
    .doing(|| "acking".into())?;
    Ok(())
}

/// A delivery that parsed: everything of an [`super::Event`] but its trace
/// context, which comes from the span opened for it.
#[derive(Debug, Clone)]
pub struct Parsed<E> {
    /// The dedup key: `message_id`, or the body's `transactionId`.
    pub id: Uuid,
    /// The AMQP `type`, or the routing key where the publisher set none.
    pub event_type: String,
    /// The body, deserialized.
    pub body: E,
    /// Failed attempts before this delivery (0 on the first).
    pub attempt: u32,
}

/// Why a delivery could not be read: such a delivery goes straight to the
/// dead-letter queue, since no retry can change its bytes.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The body is not JSON of the handler's event type.
    #[error("body does not match the event type: {0}")]
    Body(#[from] serde_json::Error),
    /// The `message_id` property is set but is not a UUID.
    #[error("message_id {0:?} is not a UUID")]
    MessageId(String),
    /// Neither a `message_id` nor a `transactionId` in the body gives the
    /// dedup key.
    #[error("no message_id, and no transactionId in the body")]
    NoId,
}

/// The body's own id, for publishers that set no `message_id`.
#[derive(serde::Deserialize)]
struct BodyId {
    #[serde(rename = "transactionId")]
    transaction_id: Option<Uuid>,
}

/// Parses a delivery: the id from `message_id`, falling back to the body's
/// `transactionId`; the type from `type`, falling back to the routing key.
pub fn parse<E: DeserializeOwned>(delivery: &Delivery) -> Result<Parsed<E>, ParseError> {
    let body: E = serde_json::from_slice(&delivery.data)?;
    let id = match delivery.properties.message_id() {
        Some(id) => Uuid::parse_str(id.as_str())
            .map_err(|_| ParseError::MessageId(id.as_str().to_owned()))?,
        None => serde_json::from_slice::<BodyId>(&delivery.data)?
            .transaction_id
            .ok_or(ParseError::NoId)?,
    };
    let event_type = delivery
        .properties
        .kind()
        .as_ref()
        .map(|t| t.as_str().to_owned())
        .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
    Ok(Parsed {
        id,
        event_type,
        body,
        attempt: attempt(delivery),
    })
}

/// The attempt count in the headers (0 when absent).
pub fn attempt(delivery: &Delivery) -> u32 {
    header(delivery.properties.headers().as_ref(), ATTEMPT_HEADER)
        .and_then(|v| match v {
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

/// The header `name`, if the message has it.
pub fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(&ShortString::from(name))
}

/// A header as text, if it is a string.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match header(headers, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Republishes `delivery` to `queue` (through the default exchange) with its
/// properties and trace headers, plus the attempt count and last error, and
/// waits for the broker's confirm. The caller acks the original only after.
pub async fn forward(
    channel: &Channel,
    delivery: &Delivery,
    queue: &str,
    attempt: u32,
    error: &str,
) -> Result<(), BrokerCallError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(attempt.into()),
    );
    let error: String = error.chars().take(1024).collect();
    headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(error.into()));
    if header(Some(&headers), ORIGIN_HEADER).is_none() {
        headers.insert(
            ORIGIN_HEADER.into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
    }
    let properties = delivery.properties.clone().with_headers(headers);
    publish_confirmed(channel, "", queue, &delivery.data, properties).await
}

/// Publishes one message, mandatory, and fails unless the broker confirms it
/// as routed and stored.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerCallError> {
    let confirm = tokio::time::timeout(AMQP_TIMEOUT, async {
        publish(channel, exchange, routing_key, body, properties)
            .await?
            .await
            .doing(|| format!("waiting for the confirm from {routing_key}"))
    })
    .await
    .map_err(|source| BrokerCallError::ConfirmTimedOut {
        routing_key: routing_key.to_owned(),
        source,
    })??;
    confirmed(routing_key, confirm)
}

/// Publishes one message, persistent and mandatory, and returns its confirm
/// to wait for: several can be in flight on one channel.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, BrokerError> {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties.with_delivery_mode(2),
        )
        .await
        .doing(|| format!("publishing to {routing_key}"))
}

/// Whether a confirm says the message was routed and stored.
pub fn confirmed(routing_key: &str, confirm: Confirmation) -> Result<(), BrokerCallError> {
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(BrokerCallError::Returned {
            routing_key: routing_key.to_owned(),
            reply_code: returned.reply_code,
            reply_text: returned.reply_text.to_string(),
        }),
        other => Err(BrokerCallError::NotConfirmed {
            routing_key: routing_key.to_owned(),
            confirmation: format!("{other:?}"),
        }),
    }
}

/// The CONSUMER span `<queue> process`, a child of the publisher's context.
/// `attempt` and `conversation_id` (an account's id, say) come from the
/// parsed message when it parsed.
pub fn process_span(
    queue: &str,
    delivery: &Delivery,
    attempt: u32,
    conversation_id: Option<String>,
) -> tracing::Span {
    let headers = delivery.properties.headers().as_ref();
    let queue_wait_ms = header_str(headers, PUBLISHED_AT_HEADER)
        .and_then(|v| v.parse::<i64>().ok())
        .map(|published| chrono::Utc::now().timestamp_millis() - published);
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "consumer process",
        otel.name = format!("{queue} process"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = %queue,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = %message_id,
        messaging.message.conversation_id = conversation_id,
        messaging.consumer.attempt = attempt,
        messaging.queue_wait_ms = queue_wait_ms,
        outcome = tracing::field::Empty,
    );
    let _ = span.set_parent(propagation::extract_amqp(headers));
    span
}
