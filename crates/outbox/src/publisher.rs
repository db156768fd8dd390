//! The publisher: confirm-mode channels ("lanes") on a connection of its
//! own, and one row's publish and confirm (`mandatory`, persistent, with its
//! PRODUCER span and trace context). Each batch in flight publishes on a
//! lane of its own, so the broker's returns, which ride on the channel's
//! next ack, reach the batch that sent the message; a batch that leaves
//! publishes unconfirmed retires the publisher ([`Publisher::retire`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use outbox_common::amqp::headers::{
    AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER, PREVIOUS_HEADER, PUBLISHED_AT_HEADER,
    SEQUENCE_HEADER, WRITTEN_AT_HEADER,
};
use outbox_common::amqp::{self, AmqpConfig, Subscription};
use outbox_common::propagation;

use crate::PublisherError;
use crate::confirms::{Confirmed, PublishFailure, Returned};
use crate::rows::OutboxRow;

/// How long a publish may wait for its confirm before it counts as failed.
/// Shorter than the shutdown deadline; a row past it is left due (an outage).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a publish may wait to be written (a blocked connection, under a
/// broker alarm, holds it): past this it counts as failed and stays due.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Confirm-mode channels (lanes) on a connection of their own, with the
/// topology declared. Clones share them; each clone publishes on one lane
/// ([`Publisher::on_lane`]), the first unless told otherwise.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    lanes: Arc<[Channel]>,
    lane: usize,
    /// The messages' `app_id`.
    app_id: Arc<str>,
    /// Set by [`Publisher::retire`]: no batch may start on it any more.
    retired: Arc<AtomicBool>,
}

impl Publisher {
    /// Connects (waiting for RabbitMQ), opens `lanes` channels with
    /// confirms enabled and declares the exchange and `subscriptions`, so no
    /// event is published before the queues that take it exist.
    pub async fn open_lanes(
        amqp: &AmqpConfig,
        subscriptions: &[Subscription],
        lanes: usize,
        cancel: &CancellationToken,
    ) -> Result<Self, PublisherError> {
        let connection = amqp::connect(amqp, "relay", cancel).await?;
        let mut channels = Vec::with_capacity(lanes.max(1));
        for _ in 0..lanes.max(1) {
            channels.push(amqp::confirm_channel(&connection).await?);
        }
        amqp::declare_topology(&channels[0], amqp, subscriptions).await?;
        Ok(Self {
            connection: Arc::new(connection),
            lanes: channels.into(),
            lane: 0,
            app_id: amqp.app_id().into(),
            retired: Arc::new(AtomicBool::new(false)),
        })
    }

    /// How many lanes it has: at most that many batches can be in flight.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// This publisher, publishing on lane `lane` (modulo the lanes).
    pub fn on_lane(&self, lane: usize) -> Self {
        Self {
            lane: lane % self.lanes.len(),
            ..self.clone()
        }
    }

    /// False once a channel or the connection has failed, or the publisher
    /// was retired; open a new one then.
    pub fn is_usable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
            && self.connection.status().connected()
            && self.lanes.iter().all(|c| c.status().connected())
    }

    /// Takes the publisher (every clone) out of use, for a batch that ended
    /// with publishes the broker never confirmed: their acks and returns may
    /// still come, on that lane, and must not reach a later batch there.
    /// The relay opens a new connection before its next batch.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Closes the channels and the connection (for every clone).
    pub async fn close(self) {
        if self.connection.status().connected() {
            let close = async {
                for channel in self.lanes.iter() {
                    let _ = channel.close(200, "relay stopping".into()).await;
                }
                let _ = self.connection.close(200, "relay stopping".into()).await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        }
    }

    /// Publishes `row` to `exchange` under its PRODUCER span. Returns the
    /// confirm to wait for, or why the publish itself failed.
    pub async fn publish(
        &self,
        exchange: &str,
        row: &OutboxRow,
    ) -> Result<PendingConfirm, Confirmed> {
        let span = publish_span(exchange, row);
        let result = tokio::time::timeout(PUBLISH_TIMEOUT, self.send(exchange, row, &span))
            .instrument(span.clone())
            .await;
        match result {
            Ok(Ok(confirm)) => Ok(PendingConfirm {
                row_id: row.id,
                transaction_id: row.transaction_id,
                span,
                confirm,
            }),
            Ok(Err(error)) => Err(failed(row, PublishFailure::Publish(error.to_string()))),
            Err(_) => Err(failed(
                row,
                PublishFailure::Publish("timed out (is the connection blocked?)".into()),
            )),
        }
    }

    /// The result of a row not tried because the broker stopped taking
    /// publishes: left due, like an unconfirmed one.
    pub fn not_tried(row: &OutboxRow) -> Confirmed {
        failed(
            row,
            PublishFailure::Publish("not tried: the broker took no publish in time".into()),
        )
    }

    async fn send(
        &self,
        exchange: &str,
        row: &OutboxRow,
        span: &tracing::Span,
    ) -> lapin::Result<lapin::PublisherConfirm> {
        let mut headers = FieldTable::default();
        propagation::inject_amqp(&span.context(), &mut headers);
        headers.insert(
            PUBLISHED_AT_HEADER.into(),
            AMQPValue::LongString(Utc::now().timestamp_millis().to_string().into()),
        );
        headers.insert(
            WRITTEN_AT_HEADER.into(),
            AMQPValue::LongString(row.created_at.timestamp_millis().to_string().into()),
        );
        if let Some(seq) = row.seq {
            let previous = row.previous.as_ref().map(|p| p.to_string());
            let previous = previous.unwrap_or_else(|| "{}".to_owned());
            for (name, value) in [
                (AGGREGATE_TYPE_HEADER, long_string(&row.aggregate_type)),
                (AGGREGATE_ID_HEADER, long_string(&row.aggregate_id)),
                (SEQUENCE_HEADER, AMQPValue::LongLongInt(seq)),
                (PREVIOUS_HEADER, long_string(&previous)),
            ] {
                headers.insert(name.into(), value);
            }
        }
        let properties = BasicProperties::default()
            .with_message_id(row.transaction_id.to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(row.event_type.as_str().into())
            .with_timestamp(Utc::now().timestamp().max(0) as u64)
            .with_app_id(self.app_id.as_ref().into())
            .with_headers(headers);
        self.lanes[self.lane]
            .basic_publish(
                exchange.into(),
                row.event_type.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                row.payload.as_bytes(),
                properties,
            )
            .await
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn failed(row: &OutboxRow, error: PublishFailure) -> Confirmed {
    Confirmed {
        row_id: row.id,
        transaction_id: row.transaction_id,
        outcome: Err(error),
        returned: None,
    }
}

/// A publish awaiting its confirm.
pub struct PendingConfirm {
    row_id: i64,
    transaction_id: Uuid,
    span: tracing::Span,
    confirm: lapin::PublisherConfirm,
}

impl PendingConfirm {
    /// Waits for the confirm (bounded: on a dead connection a confirm may
    /// never resolve, and the batch holds its rows' locks until it ends),
    /// then gives `permit` back to the confirm window.
    pub async fn settle(self, permit: Option<OwnedSemaphorePermit>) -> Confirmed {
        let Self {
            row_id,
            transaction_id,
            span,
            confirm,
        } = self;
        let (outcome, returned) = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => (Err(PublishFailure::ConfirmTimeout), None),
            Ok(Ok(Confirmation::Ack(returned))) => (Ok(()), returned),
            Ok(Ok(Confirmation::Nack(returned))) => (Err(PublishFailure::Nacked), returned),
            Ok(Ok(Confirmation::NotRequested)) => (Err(PublishFailure::NotConfirmMode), None),
            Ok(Err(error)) => (Err(PublishFailure::Confirm(error.to_string())), None),
        };
        drop(permit);
        let returned = returned.map(|message| {
            let message_id = message
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| Uuid::parse_str(m.as_str()).ok());
            tracing::warn!(parent: &span, ?message_id, code = message.reply_code, text = %message.reply_text, "publish returned");
            Returned {
                message_id,
                code: message.reply_code,
                text: message.reply_text.to_string(),
            }
        });
        if let Err(error) = &outcome {
            span.record("otel.status_code", "ERROR");
            tracing::warn!(parent: &span, outbox.id = row_id, %error, "publish not confirmed");
        }
        Confirmed {
            row_id,
            transaction_id,
            outcome,
            returned,
        }
    }
}

/// The PRODUCER span of one publish, a child of the context stored with the
/// row by whoever wrote it (a request, or a consumer's span).
fn publish_span(exchange: &str, row: &OutboxRow) -> tracing::Span {
    let waited_ms = (Utc::now() - row.created_at).num_milliseconds();
    let span = tracing::info_span!(
        "outbox publish",
        otel.name = format!("{exchange} publish"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "publish",
        messaging.destination.name = %exchange,
        messaging.rabbitmq.destination.routing_key = %row.event_type,
        messaging.message.id = %row.transaction_id,
        outbox.id = row.id,
        outbox.attempts = row.attempts,
        outbox.wait_ms = waited_ms,
    );
    let _ = span.set_parent(propagation::context_from_json(&row.headers));
    span
}
