//! Starting the roles. `order-service run` starts all of them in one process;
//! the single-role subcommands and the tests start the ones they need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::config::{AmqpConfig, ConsumerConfig, HttpConfig, RelayConfig};
use crate::consumer::Consumer;
use crate::consumer::handlers::{Billing, Email};
use crate::metrics::Metrics;
use crate::outbox::Wake;
use crate::outbox::relay::Relay;

/// Which consumer a `consume` role runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerKind {
    Email,
    Billing,
}

/// The roles of one process, sharing a pool, metrics and the relay wake-up.
pub struct Roles {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub wake: Wake,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
}

impl Roles {
    pub fn new(pool: PgPool, cancel: CancellationToken) -> Self {
        Self {
            pool,
            metrics: Arc::default(),
            wake: Wake::default(),
            tracker: TaskTracker::new(),
            cancel,
        }
    }

    /// Binds the HTTP listener and serves on the tracker; returns the bound
    /// address (port 0 picks a free one).
    pub async fn start_api(
        &self,
        http: &HttpConfig,
        amqp: Option<AmqpConfig>,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(http.http_addr)
            .await
            .with_context(|| format!("binding {}", http.http_addr))?;
        let addr = listener.local_addr()?;
        let mut state = AppState::new(self.pool.clone(), http, self.wake.clone());
        state.metrics = self.metrics.clone();
        state.amqp = amqp;
        let app = api::router(state);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            if let Err(error) = api::serve(listener, app, cancel.clone()).await {
                tracing::error!(%error, "HTTP server failed");
                cancel.cancel();
            }
        });
        tracing::info!(%addr, "HTTP API listening");
        Ok(addr)
    }

    /// Sends a Postgres NOTIFY for each burst of orders, for a relay in
    /// another process.
    pub fn start_notify_forwarder(&self) {
        self.tracker.spawn(crate::outbox::forward_wakes_as_notify(
            self.pool.clone(),
            self.wake.clone(),
            self.cancel.clone(),
        ));
    }

    pub fn relay(&self, amqp: &AmqpConfig, config: &RelayConfig, listen: bool) -> Relay {
        Relay {
            pool: self.pool.clone(),
            amqp: amqp.clone(),
            config: config.clone(),
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            listen,
        }
    }

    pub fn start_relay(&self, amqp: &AmqpConfig, config: &RelayConfig, listen: bool) {
        let relay = self.relay(amqp, config, listen);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move { relay.run(cancel).await });
    }

    pub fn start_consumer(&self, kind: ConsumerKind, amqp: &AmqpConfig, config: &ConsumerConfig) {
        let cancel = self.cancel.clone();
        let (pool, metrics) = (self.pool.clone(), &self.metrics);
        match kind {
            ConsumerKind::Email => {
                let handler = Email {
                    failure_rate: config.email_failure_rate,
                };
                let consumer = Arc::new(Consumer::new(
                    handler,
                    pool,
                    amqp.clone(),
                    config.clone(),
                    metrics,
                ));
                self.tracker.spawn(consumer.run(cancel));
            }
            ConsumerKind::Billing => {
                let consumer = Arc::new(Consumer::new(
                    Billing,
                    pool,
                    amqp.clone(),
                    config.clone(),
                    metrics,
                ));
                self.tracker.spawn(consumer.run(cancel));
            }
        }
    }

    /// Waits for the cancel token, then for every role to finish its work in
    /// hand, at most `deadline`. Errors if the deadline passed.
    pub async fn wait(self, deadline: Duration) -> anyhow::Result<()> {
        self.cancel.cancelled().await;
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .map_err(|_| anyhow::anyhow!("roles did not stop within {deadline:?}"))?;
        self.pool.close().await;
        Ok(())
    }
}
