//! Dead letters: list them without consuming them, and replay them to the
//! main queue (where the dedup table makes a replay safe).

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use tokio_util::sync::CancellationToken;

use crate::message::{self, BrokerCallError, header, header_str};
use outbox_common::amqp::headers::{ATTEMPT_HEADER, ERROR_HEADER, REPLAYED_AFTER_ATTEMPTS_HEADER};
use outbox_common::amqp::{AmqpConfig, BrokerError, Doing, QueueNames, StartError};

/// Why listing or replaying dead letters failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// No broker could be connected to, or `cancel` fired while connecting.
    #[error(transparent)]
    Connect(#[from] StartError),
    /// The broker failed a call: opening a channel, reading the queue,
    /// acking a letter.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A letter's copy was not published and confirmed.
    #[error(transparent)]
    Publish(#[from] BrokerCallError),
}

/// One dead letter, as a `dlq list` command would print it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Its AMQP `message_id` (empty if the publisher set none).
    pub message_id: String,
    /// Its AMQP `type` (empty if the publisher set none).
    pub event_type: String,
    /// Why it was dead-lettered: the refusal or parse error of its last
    /// attempt (cut to 1024 characters).
    pub error: String,
    /// Failed attempts before it was dead-lettered.
    pub attempts: u32,
    /// When it was first published (its AMQP `timestamp`), if known.
    pub published_at: Option<DateTime<Utc>>,
}

/// Reads up to `limit` dead letters and leaves them in the queue (they are
/// fetched unacked and returned when the channel closes). Tries each broker
/// once.
pub async fn list(
    amqp: &AmqpConfig,
    queues: &QueueNames,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    list_until(amqp, queues, limit, &CancellationToken::new()).await
}

/// [`list`], stopping early when `cancel` fires (`dlq list` on SIGTERM).
pub async fn list_until(
    amqp: &AmqpConfig,
    queues: &QueueNames,
    limit: usize,
    cancel: &CancellationToken,
) -> Result<Vec<DeadLetter>, DlqError> {
    let connection = outbox_common::amqp::connect_once(amqp, "dlq list", cancel).await?;
    let channel = connection
        .create_channel()
        .await
        .doing(|| "opening a channel".into())?;
    let mut letters = Vec::new();
    while letters.len() < limit && !cancel.is_cancelled() {
        let Some(got) = next_letter(&channel, queues).await? else {
            break;
        };
        let d = &got.delivery;
        let headers = d.properties.headers().as_ref();
        letters.push(DeadLetter {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            event_type: d
                .properties
                .kind()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            error: header_str(headers, ERROR_HEADER).unwrap_or_default(),
            attempts: message::attempt(d),
            published_at: d
                .properties
                .timestamp()
                .and_then(|t| DateTime::from_timestamp(t as i64, 0)),
        });
    }
    // Closing the channel returns every unacked message to the DLQ.
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    Ok(letters)
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Letters moved back to the main queue.
    pub moved: usize,
    /// Letters left in the DLQ because they are older than the dedup window
    /// (or carry no timestamp to tell).
    pub too_old: usize,
}

/// Moves up to `limit` dead letters back to the main queue with a fresh
/// attempt count; each is acked off the DLQ only after the broker confirmed
/// the copy. With a `window` (the dedup retention), a letter first published
/// longer ago than that is left where it is: its dedup row may have been
/// pruned, so replaying it could apply its effect twice. Tries each broker
/// once.
pub async fn replay(
    amqp: &AmqpConfig,
    queues: &QueueNames,
    limit: usize,
    window: Option<std::time::Duration>,
) -> Result<Replayed, DlqError> {
    replay_until(amqp, queues, limit, window, &CancellationToken::new()).await
}

/// [`replay`], stopping when `cancel` fires (`dlq replay` on SIGTERM), also
/// in the middle of a step the broker holds up (a publish blocked by a
/// memory or disk alarm). A letter is acked off the DLQ only once its copy
/// is confirmed, so a stop loses none; a letter whose copy was sent but
/// whose confirm or ack was cut short stays in the DLQ, and a later replay
/// sends it again: the consumers' dedup absorbs the second copy.
pub async fn replay_until(
    amqp: &AmqpConfig,
    queues: &QueueNames,
    limit: usize,
    window: Option<std::time::Duration>,
    cancel: &CancellationToken,
) -> Result<Replayed, DlqError> {
    let connection = outbox_common::amqp::connect_once(amqp, "dlq replay", cancel).await?;
    let mut replayed = Replayed::default();
    let steps = replay_on(&connection, queues, limit, window, &mut replayed);
    let Some(done) = until(cancel, steps).await else {
        // Cancelled: the connection is dropped, not closed (a blocked
        // broker would not read the close), and the broker returns the
        // unacked letters to the DLQ when it sees it gone.
        return Ok(replayed);
    };
    done?;
    let _ = connection.close(200, "replayed".into()).await;
    Ok(replayed)
}

/// The replay's steps on `connection`, counted into `replayed` as they go
/// (so a cancelled replay still tells what it did).
async fn replay_on(
    connection: &lapin::Connection,
    queues: &QueueNames,
    limit: usize,
    window: Option<std::time::Duration>,
    replayed: &mut Replayed,
) -> Result<(), DlqError> {
    let channel = connection
        .create_channel()
        .await
        .doing(|| "opening a channel".into())?;
    let publish = connection
        .create_channel()
        .await
        .doing(|| "opening a publish channel".into())?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .doing(|| "selecting confirms".into())?;
    while replayed.moved < limit {
        let Some(got) = next_letter(&channel, queues).await? else {
            break;
        };
        let d = got.delivery;
        if let Some(window) = window
            && !younger_than(&d, window)
        {
            // Left unacked: it goes back to the DLQ when the channel closes.
            replayed.too_old += 1;
            continue;
        }
        let mut headers = d.properties.headers().clone().unwrap_or_default();
        let previous = header(Some(&headers), ATTEMPT_HEADER).cloned();
        headers.insert(ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(0));
        if let Some(previous) = previous {
            headers.insert(REPLAYED_AFTER_ATTEMPTS_HEADER.into(), previous);
        }
        let properties = d.properties.clone().with_headers(headers);
        message::publish_confirmed(&publish, "", &queues.main, &d.data, properties).await?;
        d.ack(BasicAckOptions::default())
            .await
            .doing(|| format!("acking a letter off {}", queues.dlq))?;
        replayed.moved += 1;
    }
    let _ = channel.close(200, "replayed".into()).await;
    let _ = publish.close(200, "replayed".into()).await;
    Ok(())
}

/// `work`, unless `cancel` fires first (then `None`).
async fn until<T>(cancel: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        _ = cancel.cancelled() => None,
    }
}

/// Whether the letter was first published less than `window` ago (its AMQP
/// `timestamp`, set at the first publish and kept by every forward).
fn younger_than(d: &lapin::message::Delivery, window: std::time::Duration) -> bool {
    let Some(published) = d.properties.timestamp() else {
        return false;
    };
    let age = Utc::now().timestamp() - *published as i64;
    age >= 0 && (age as u64) < window.as_secs()
}

/// Publishes `body` straight to `queue` (default exchange), persistent, and
/// waits for the broker's confirm. For tools and tests that feed a queue.
pub async fn publish(
    channel: &lapin::Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> Result<(), BrokerCallError> {
    if !channel.status().confirm() {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .doing(|| "selecting confirms".into())?;
    }
    message::publish_confirmed(channel, "", queue, body, properties).await
}

/// The next letter of the DLQ, unacked (it stays until acked or nacked),
/// or `None` once it is empty.
async fn next_letter(
    channel: &lapin::Channel,
    queues: &QueueNames,
) -> Result<Option<lapin::message::BasicGetMessage>, BrokerError> {
    channel
        .basic_get(
            queues.dlq.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .doing(|| format!("reading {}", queues.dlq))
}
