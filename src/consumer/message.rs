//! Reading a delivery (id, envelope, attempt count, trace context) and
//! forwarding it to a delay queue or the dead-letter queue.

use anyhow::Context;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::orders::OrderEvent;
use crate::telemetry::propagation;

/// The longest any single broker call (ack, publish, confirm) may take. On a
/// dead connection lapin can leave a command unanswered; past this the call
/// counts as failed and the message is left for redelivery.
pub const AMQP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Acks a delivery, bounded by [`AMQP_TIMEOUT`].
pub async fn ack(delivery: &Delivery) -> anyhow::Result<()> {
    tokio::time::timeout(
        AMQP_TIMEOUT,
        delivery.ack(lapin::options::BasicAckOptions::default()),
    )
    .await
    .context("ack timed out")?
    .context("acking")?;
    Ok(())
}

/// Header: how many times this message has been handled and failed.
pub const ATTEMPT_HEADER: &str = "x-attempt";
/// Header: why the last attempt failed.
pub const ERROR_HEADER: &str = "x-last-error";
/// Header: the queue the message was consumed from before a retry or DLQ move.
pub const ORIGIN_HEADER: &str = "x-original-queue";
/// Header: when the relay published it (ms since the epoch).
pub const PUBLISHED_AT_HEADER: &str = "x-published-at-ms";

/// A delivery that parsed.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub transaction_id: Uuid,
    pub event: OrderEvent,
    /// Failed attempts so far (0 on first delivery).
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("body is not an order event: {0}")]
    Body(#[from] serde_json::Error),
    #[error("message_id {0:?} is not a UUID")]
    MessageId(String),
}

impl Incoming {
    /// The id comes from `message_id`, falling back to the envelope's
    /// `transactionId` for publishers that do not set it.
    pub fn parse(delivery: &Delivery) -> Result<Self, ParseError> {
        let event: OrderEvent = serde_json::from_slice(&delivery.data)?;
        let transaction_id = match delivery.properties.message_id() {
            Some(id) => Uuid::parse_str(id.as_str())
                .map_err(|_| ParseError::MessageId(id.as_str().to_owned()))?,
            None => event.transaction_id,
        };
        Ok(Self {
            transaction_id,
            event,
            attempt: attempt(delivery),
        })
    }
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
) -> anyhow::Result<()> {
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
) -> anyhow::Result<()> {
    let publish = channel.basic_publish(
        exchange.into(),
        routing_key.into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        properties.with_delivery_mode(2),
    );
    let confirm = tokio::time::timeout(AMQP_TIMEOUT, async {
        publish
            .await
            .with_context(|| format!("publishing to {routing_key}"))?
            .await
            .with_context(|| format!("waiting for the confirm from {routing_key}"))
    })
    .await
    .with_context(|| format!("no confirm from {routing_key} in time"))??;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => anyhow::bail!(
            "{routing_key} returned the message: {} {}",
            returned.reply_code,
            returned.reply_text
        ),
        other => anyhow::bail!("{routing_key} did not confirm the message: {other:?}"),
    }
}

/// The CONSUMER span `<queue> process`, a child of the publisher's context.
pub fn process_span(
    queue: &str,
    delivery: &Delivery,
    incoming: &Result<Incoming, ParseError>,
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
        messaging.consumer.attempt = incoming.as_ref().map(|i| i.attempt).unwrap_or(0),
        messaging.queue_wait_ms = queue_wait_ms,
        order.id = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    if let Ok(incoming) = incoming {
        span.record("order.id", tracing::field::display(incoming.event.order_id));
    }
    let _ = span.set_parent(propagation::extract_amqp(headers));
    span
}
