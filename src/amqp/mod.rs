//! RabbitMQ connections and the topology shared by the relay and consumers:
//! one topic exchange, and per subscription a durable queue bound to its
//! event types, its delay queues (retries) and its dead-letter queue.
//!
//! - `connect`: connecting once, at a role's start, and for reconnects;
//! - `url`: a node's `AMQP_URL` with RabbitMQ's TLS query parameters;
//! - `tls`: the TLS client of an `amqps://` URL;
//! - `headers`: the names of the message headers the relay and consumers share.

mod connect;
pub mod headers;
mod tls;
mod url;

pub use connect::{ConnectError, check_at_start, connect, connect_once, ping};

use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{AmqpConfig, QueueType};

/// A consumer's queue and the event types (routing keys) bound to it. The
/// domain lists its subscriptions; the relay declares them all before it
/// publishes, so no event is published before the queues that take it exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    /// The consumer's name: its dedup key and its queue's base name.
    pub consumer: &'static str,
    /// The routing keys its main queue is bound to.
    pub routing_keys: &'static [&'static str],
}

/// The queues of one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    pub main: String,
    /// One per retry, in order, with its delay.
    pub retries: Vec<(String, Duration)>,
    pub dlq: String,
}

impl QueueNames {
    pub fn new(config: &AmqpConfig, consumer: &str) -> Self {
        let main = format!("{}{consumer}", config.queue_prefix);
        let retries = config
            .retry_delays()
            .into_iter()
            .map(|delay| (format!("{main}.retry.{}ms", delay.as_millis()), delay))
            .collect();
        Self {
            dlq: format!("{main}.dlq"),
            main,
            retries,
        }
    }
}

/// Opens a channel with publisher confirms enabled.
pub async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .context("opening a publish channel")?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(channel)
}

/// Declares the exchange and every subscription's queues; idempotent.
pub async fn declare_topology(
    channel: &Channel,
    config: &AmqpConfig,
    subscriptions: &[Subscription],
) -> anyhow::Result<()> {
    declare_exchange(channel, config).await?;
    for subscription in subscriptions {
        declare_consumer_queues(channel, config, subscription).await?;
    }
    Ok(())
}

pub async fn declare_exchange(channel: &Channel, config: &AmqpConfig) -> anyhow::Result<()> {
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {}", config.exchange))
}

/// The main queue (bound to the exchange), the delay queues that dead-letter
/// back into it after their TTL, and the dead-letter queue.
pub async fn declare_consumer_queues(
    channel: &Channel,
    config: &AmqpConfig,
    subscription: &Subscription,
) -> anyhow::Result<QueueNames> {
    let names = QueueNames::new(config, subscription.consumer);
    let mut main = queue_args(config.queue_type);
    if config.queue_type == QueueType::Quorum {
        // RabbitMQ 4.x gives quorum queues a delivery limit of 20, past which
        // a message is dropped: a long outage requeues a message far more
        // often. Far above any outage; past it, the message is dead-lettered
        // at least once into the DLQ, never dropped.
        main.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1_000_000));
        dead_letter_to(&mut main, &names.dlq);
    }
    declare_queue(channel, &names.main, main).await?;
    for key in subscription.routing_keys {
        channel
            .queue_bind(
                names.main.as_str().into(),
                config.exchange.as_str().into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding {} to {} for {key}", names.main, config.exchange))?;
    }
    for (retry, delay) in &names.retries {
        let mut args = queue_args(config.queue_type);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        dead_letter_to(&mut args, &names.main);
        declare_queue(channel, retry, args).await?;
    }
    declare_queue(channel, &names.dlq, queue_args(config.queue_type)).await?;
    Ok(names)
}

/// The arguments every queue of `queue_type` is declared with. A quorum
/// queue dead-letters at least once (the broker keeps a message until its
/// target has confirmed it), which needs `reject-publish` overflow.
fn queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
    }
    args
}

/// Dead-letters into `queue` through the default exchange.
fn dead_letter_to(args: &mut FieldTable, queue: &str) {
    args.insert("x-dead-letter-exchange".into(), long_string(""));
    args.insert("x-dead-letter-routing-key".into(), long_string(queue));
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> anyhow::Result<()> {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .with_context(|| format!("declaring queue {name}"))?;
    Ok(())
}
