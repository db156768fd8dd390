//! What each role's probes check: the startup knows the service's outbox
//! tables and metrics, the probe module only what it is given.

use std::sync::Arc;
use std::time::Duration;

use outbox_common::amqp::AmqpConfig;

use super::Roles;
use crate::config::HttpConfig;
use crate::orders::EVENTS;
use crate::orders::mailer::MAILS;
use crate::probe::{ProbeState, Probes};

impl Roles {
    /// The probes' state of this process, checking `probes`.
    pub fn probe_state(&self, probes: Probes) -> ProbeState {
        ProbeState {
            pool: self.pool.clone(),
            metrics: self.metrics.clone(),
            status: self.status.clone(),
            probes: Arc::new(probes),
        }
    }

    /// The api's: Postgres, the events' outbox lag, RabbitMQ when `amqp`
    /// is given (in `run`, which relays), every consumer of the process
    /// subscribed; `/metrics` reads both outboxes (in `run`, the api serves
    /// the metrics of every role of the process).
    pub fn api_probes(&self, http: &HttpConfig, amqp: Option<AmqpConfig>) -> Probes {
        Probes {
            amqp,
            lag: Some((EVENTS.clone(), max_lag(http))),
            gauges: vec![
                (EVENTS.clone(), self.metrics.outbox.clone()),
                (MAILS.clone(), self.metrics.mail_outbox.clone()),
            ],
            wal: false,
        }
    }

    /// The relay's: Postgres, RabbitMQ, and its lag (with `wal`, the WAL
    /// relay's too).
    pub fn relay_probes(&self, amqp: &AmqpConfig, http: &HttpConfig, wal: bool) -> Probes {
        Probes {
            amqp: Some(amqp.clone()),
            lag: Some((EVENTS.clone(), max_lag(http))),
            gauges: vec![(EVENTS.clone(), self.metrics.outbox.clone())],
            wal,
        }
    }

    /// A consumer's: Postgres, RabbitMQ, its subscription; `/metrics` reads
    /// the mails' outbox when it runs the mailer.
    pub fn consumer_probes(&self, amqp: &AmqpConfig, mailer: bool) -> Probes {
        let mails = (MAILS.clone(), self.metrics.mail_outbox.clone());
        Probes {
            amqp: Some(amqp.clone()),
            lag: None,
            gauges: mailer.then_some(mails).into_iter().collect(),
            wal: false,
        }
    }
}

fn max_lag(http: &HttpConfig) -> Duration {
    Duration::from_millis(http.max_outbox_lag_ms)
}
