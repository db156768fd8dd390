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

use crate::api::auth::Authenticator;
use crate::api::{self, AppState};
use crate::config::{
    AmqpConfig, ConsumerConfig, HttpConfig, MailConfig, RelayConfig, RetentionConfig, WalSource,
};
use crate::metrics::Metrics;
use crate::orders::EVENTS;
use crate::orders::billing::Billing;
use crate::orders::email::Email;
use crate::orders::mailer::{MAILS, MailConfigError, Smtp};
pub use crate::probe::Probes;
use crate::probe::Status;

mod probes;
use inbox::{Consumer, Handler};
use outbox::Dispatcher;
use outbox::wal::WalRelay;
use outbox::{Relay, Wake};
use outbox_common::prune::Prune;

/// Which consumer a `consume` role runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerKind {
    Email,
    Billing,
}

impl ConsumerKind {
    /// The consumer's name: its dedup key and queue base name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Email => crate::orders::EMAIL,
            Self::Billing => crate::orders::BILLING,
        }
    }
}

/// The roles of one process, sharing a pool, metrics and the relay wake-up.
pub struct Roles {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub wake: Wake,
    /// Wakes the mailer after a commit that wrote mails.
    pub mail_wake: Wake,
    pub tracker: TaskTracker,
    pub cancel: CancellationToken,
    /// The loops and subscriptions `/healthz` and `/readyz` report.
    pub status: Status,
}

impl Roles {
    pub fn new(pool: PgPool, cancel: CancellationToken) -> Self {
        Self {
            pool,
            metrics: Arc::default(),
            wake: Wake::default(),
            mail_wake: Wake::default(),
            tracker: TaskTracker::new(),
            cancel,
            status: Status::default(),
        }
    }

    /// Binds the HTTP listener and serves on the tracker, without
    /// authentication; returns the bound address (port 0 picks a free one).
    pub async fn start_api(
        &self,
        http: &HttpConfig,
        amqp: Option<AmqpConfig>,
    ) -> anyhow::Result<SocketAddr> {
        self.start_api_with_auth(http, amqp, Authenticator::off())
            .await
    }

    /// [`Self::start_api`], with the order routes checking bearer tokens
    /// when `auth` is on.
    pub async fn start_api_with_auth(
        &self,
        http: &HttpConfig,
        amqp: Option<AmqpConfig>,
        auth: Authenticator,
    ) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(http.http_addr)
            .await
            .with_context(|| format!("binding {}", http.http_addr))?;
        let addr = listener.local_addr()?;
        let probe = self.probe_state(self.api_probes(http, amqp));
        let mut state = AppState::new(self.pool.clone(), http, self.wake.clone(), probe);
        state.auth = auth;
        let app = api::router(state);
        let cancel = self.cancel.clone();
        let running = self.status.running("api");
        self.tracker.spawn(async move {
            let _running = running;
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
        self.tracker.spawn(outbox::forward_wakes_as_notify(
            self.pool.clone(),
            self.wake.clone(),
            self.cancel.clone(),
        ));
    }

    /// A relay over this process's pool, publishing the order events.
    pub fn relay(&self, amqp: &AmqpConfig, config: &RelayConfig) -> Relay {
        Relay::new(self.pool.clone(), EVENTS.clone(), amqp.clone())
            .with_config(config.clone())
            .with_metrics(self.metrics.relay.clone())
            .with_wake(self.wake.clone())
            .with_subscriptions(crate::orders::SUBSCRIPTIONS.to_vec())
    }

    /// Starts the relay; with `listen`, also the LISTEN task that wakes it
    /// on a `NOTIFY` from writers in other processes.
    pub fn start_relay(&self, amqp: &AmqpConfig, config: &RelayConfig, listen: bool) {
        let relay = self.relay(amqp, config);
        if listen {
            self.tracker.spawn(outbox_common::wake::listen(
                self.pool.clone(),
                self.wake.clone(),
                self.cancel.clone(),
            ));
        }
        let cancel = self.cancel.clone();
        let running = self.status.running("relay");
        self.tracker.spawn(async move {
            let _running = running;
            relay.run(cancel).await
        });
    }

    /// Starts the WAL relay on `source` (`RELAY_MODE=wal`), after its setup
    /// (the publication, the slot, the table's default: see
    /// `outbox::wal::setup`), which is a clear stop when it fails: a
    /// `wal_level` that is not `logical`, a user without the right to
    /// replicate. The polling relay runs beside it, for the rows the broker
    /// refuses and those written before the switch, on its poll alone: a
    /// wake-up per order would only find nothing due.
    pub async fn start_wal_relay(
        &self,
        amqp: &AmqpConfig,
        config: &RelayConfig,
        source: WalSource,
    ) -> anyhow::Result<()> {
        let relay = WalRelay::new(self.relay(amqp, config), source.replication)?
            .with_horizon_interval(source.horizon_interval)
            .with_metrics(self.metrics.wal.clone());
        let setup = relay.setup().await.context("setting up the WAL relay")?;
        tracing::info!(slot = relay.slot(), ?setup, "WAL relay set up");
        let polling = self.relay(amqp, config).with_wake(Wake::default());
        let (cancel, running) = (self.cancel.clone(), self.status.running("relay"));
        self.tracker.spawn(async move {
            let _running = running;
            polling.run(cancel).await
        });
        let cancel = self.cancel.clone();
        let running = self.status.running("wal relay");
        self.tracker.spawn(async move {
            let _running = running;
            relay.run(cancel).await
        });
        Ok(())
    }

    /// Starts the pruning of `prunes` (see [`crate::retention`]).
    pub fn start_retention(&self, prunes: Vec<Prune>, retention: &RetentionConfig) {
        self.tracker.spawn(crate::retention::run(
            self.pool.clone(),
            prunes,
            retention.interval(),
            self.cancel.clone(),
        ));
    }

    /// Starts a consumer of `kind`. The e-mail consumer, with `SMTP_URL` set,
    /// also writes each mail to the mails' outbox and starts the mailer; it
    /// refuses `mail.email_failure_rate` of its events, and every
    /// `order.created` of `mail.email_poison_product` (a demo).
    pub fn start_consumer(
        &self,
        kind: ConsumerKind,
        amqp: &AmqpConfig,
        config: &ConsumerConfig,
        mail: &MailConfig,
    ) -> Result<(), MailConfigError> {
        match kind {
            ConsumerKind::Email => {
                let mailer = match mail.smtp_url.as_ref() {
                    Some(url) => Some(Smtp::new(mail, url.expose(), self.metrics.clone())?),
                    None => None,
                };
                let handler = Email {
                    failure_rate: mail.email_failure_rate,
                    poison_product: mail.email_poison_product.clone(),
                    recipient_domain: mailer.as_ref().map(|_| mail.email_recipient_domain.clone()),
                    in_sequence: mail.email_in_sequence,
                };
                self.start_handler(handler, amqp, config);
                if let Some(smtp) = mailer {
                    self.start_mailer(smtp, mail);
                }
            }
            ConsumerKind::Billing => self.start_handler(Billing, amqp, config),
        }
        Ok(())
    }

    /// Starts the mailer: the mails' outbox, delivered by `smtp`.
    pub fn start_mailer(&self, smtp: Smtp, mail: &MailConfig) {
        // Two waves of sends a round (the default), each send bounded by the
        // SMTP timeout: a round in hand at shutdown ends within two of them.
        // One order's mails reach the SMTP server in their order.
        let dispatcher = Dispatcher::new(self.pool.clone(), MAILS.clone(), smtp)
            .in_sequence_per_aggregate()
            .with_concurrency(mail.mailer_concurrency)
            .with_wake(self.mail_wake.clone())
            .with_timeout(Duration::from_millis(mail.smtp_timeout_ms));
        let (running, cancel) = (self.status.running("mailer"), self.cancel.clone());
        self.tracker.spawn(async move {
            let _running = running;
            dispatcher.run(cancel).await;
        });
        tracing::info!("mailer started");
    }

    /// Starts a consumer running `handler`; its commits wake this process's
    /// relay (or its NOTIFY forwarder).
    pub fn start_handler<H: Handler>(
        &self,
        handler: H,
        amqp: &AmqpConfig,
        config: &ConsumerConfig,
    ) {
        let handler_name = handler.subscription().consumer;
        let consumer = Consumer::new(handler, self.pool.clone(), amqp.clone())
            .with_config(config.clone())
            .with_metrics(&self.metrics.consumers)
            .with_wake(self.wake.clone())
            .with_wake(self.mail_wake.clone())
            .with_subscribed(self.status.subscription(handler_name));
        let running = self.status.running(handler_name);
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let _running = running;
            Arc::new(consumer).run(cancel).await
        });
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `http.http_addr` for a
    /// role without the API; returns the bound address.
    pub async fn start_probes(
        &self,
        http: &HttpConfig,
        probes: Probes,
    ) -> anyhow::Result<SocketAddr> {
        let state = self.probe_state(probes);
        let (addr, server) =
            crate::probe::serve(http.http_addr, state, self.cancel.clone()).await?;
        self.tracker.spawn(server);
        tracing::info!(%addr, "probes listening");
        Ok(addr)
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
