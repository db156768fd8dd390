//! RabbitMQ connections and the topology shared by the relay and consumers:
//! one topic exchange, and per subscription a durable queue bound to its
//! event types, its delay queues (retries) and its dead-letter queue.

use std::time::Duration;

use anyhow::Context;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::shutdown::retry_until_cancelled;

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

/// Connects, retrying with backoff until RabbitMQ answers or `cancel` fires.
pub async fn connect(
    config: &AmqpConfig,
    name: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<Connection> {
    retry_until_cancelled("RabbitMQ", cancel, || {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        Connection::connect(config.amqp_url.expose(), properties)
    })
    .await
    .with_context(|| format!("connecting to RabbitMQ at {}", config.amqp_url))
}

/// Opens and closes a connection: the readiness check.
pub async fn ping(config: &AmqpConfig) -> anyhow::Result<()> {
    let connection = Connection::connect(
        config.amqp_url.expose(),
        ConnectionProperties::default().with_connection_name("order-service readyz".into()),
    )
    .await
    .context("connecting to RabbitMQ")?;
    let _ = connection.close(200, "readiness check done".into()).await;
    Ok(())
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
    declare_queue(channel, &names.main, FieldTable::default()).await?;
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
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(names.main.as_str())),
        );
        declare_queue(channel, retry, args).await?;
    }
    declare_queue(channel, &names.dlq, FieldTable::default()).await?;
    Ok(names)
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
