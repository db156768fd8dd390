//! RabbitMQ connections and the topology shared by the relay and consumers:
//! one topic exchange, and per subscription a durable queue bound to its
//! event types, its delay queues (retries) and its dead-letter queue.
//!
//! - [`AmqpConfig`]: the settings;
//! - `connect`: connecting once, at a role's start, and for reconnects;
//! - `url`: a node's `AMQP_URL` with RabbitMQ's TLS query parameters;
//! - `tls`: the TLS client of an `amqps://` URL;
//! - `headers`: the names of the message headers the relay and consumers share.

mod config;
mod connect;
pub mod headers;
mod tls;
mod url;

pub use config::{AmqpConfig, QueueType};
pub use connect::{ConnectError, StartError, check_at_start, connect, connect_once, ping};

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

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

/// A broker operation that failed: what was being done, and lapin's error.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct BrokerError {
    /// What was being done (`declaring queue billing_service`, say).
    pub what: String,
    /// The broker's or the connection's error.
    #[source]
    pub source: lapin::Error,
}

impl BrokerError {
    /// A failure of `what`.
    pub fn new(what: impl Into<String>, source: lapin::Error) -> Self {
        Self {
            what: what.into(),
            source,
        }
    }
}

/// Wraps a lapin result with what was being done.
pub trait Doing<T> {
    /// `Err(BrokerError { what, .. })` for an error.
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, BrokerError>;
}

impl<T> Doing<T> for Result<T, lapin::Error> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, BrokerError> {
        self.map_err(|source| BrokerError::new(what(), source))
    }
}

/// The queues of one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The queue bound to the exchange, which the consumer reads.
    pub main: String,
    /// One per retry, first to last, with its delay.
    pub retries: Vec<(String, Duration)>,
    /// The dead-letter queue.
    pub dlq: String,
}

impl QueueNames {
    /// The names of `consumer`'s queues under `config`'s prefix.
    pub fn new(config: &AmqpConfig, consumer: &str) -> Self {
        let main = format!("{}{consumer}", config.queue_prefix());
        let retries = config
            .retry_delays()
            .iter()
            .copied()
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
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .doing(|| "opening a publish channel".into())?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .doing(|| "enabling publisher confirms".into())?;
    Ok(channel)
}

/// Declares the exchange and every subscription's queues; idempotent.
pub async fn declare_topology(
    channel: &Channel,
    config: &AmqpConfig,
    subscriptions: &[Subscription],
) -> Result<(), BrokerError> {
    declare_exchange(channel, config).await?;
    for subscription in subscriptions {
        declare_consumer_queues(channel, config, subscription).await?;
    }
    Ok(())
}

/// Declares the durable topic exchange; idempotent.
pub async fn declare_exchange(channel: &Channel, config: &AmqpConfig) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            config.exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .doing(|| format!("declaring exchange {}", config.exchange()))
}

/// Deletes every subscription's queues (main, delay and dead-letter
/// queues, with their messages) and then the exchange: the undoing of
/// [`declare_topology`], for a test or a demo that declared a topology of
/// its own under a unique exchange and queue prefix. RabbitMQ deletes a
/// queue or an exchange that is not there without complaint.
pub async fn delete_topology(
    channel: &Channel,
    config: &AmqpConfig,
    subscriptions: &[Subscription],
) -> Result<(), BrokerError> {
    for subscription in subscriptions {
        let names = QueueNames::new(config, subscription.consumer);
        let retries = names.retries.into_iter().map(|(queue, _)| queue);
        for queue in [names.main, names.dlq].into_iter().chain(retries) {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .doing(|| format!("deleting queue {queue}"))?;
        }
    }
    channel
        .exchange_delete(config.exchange().into(), ExchangeDeleteOptions::default())
        .await
        .doing(|| format!("deleting exchange {}", config.exchange()))
}

/// The main queue (bound to the exchange), the delay queues that dead-letter
/// back into it after their TTL, and the dead-letter queue.
pub async fn declare_consumer_queues(
    channel: &Channel,
    config: &AmqpConfig,
    subscription: &Subscription,
) -> Result<QueueNames, BrokerError> {
    let names = QueueNames::new(config, subscription.consumer);
    let mut main = queue_args(config.queue_type());
    if config.queue_type() == QueueType::Quorum {
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
                config.exchange().into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .doing(|| format!("binding {} to {} for {key}", names.main, config.exchange()))?;
    }
    for (retry, delay) in &names.retries {
        let mut args = queue_args(config.queue_type());
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        dead_letter_to(&mut args, &names.main);
        declare_queue(channel, retry, args).await?;
    }
    declare_queue(channel, &names.dlq, queue_args(config.queue_type())).await?;
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

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .doing(|| format!("declaring queue {name}"))?;
    Ok(())
}
