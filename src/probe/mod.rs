//! The probes every role serves on `HTTP_ADDR`, in one place: `/healthz`
//! (its loops still run), `/readyz` (what that role depends on) and
//! `/metrics`. The api serves them beside its own routes (and describes
//! them in its OpenAPI document); the relay and the consumers serve only
//! these. What each role checks is a [`Probes`], built by the startup.

mod checks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::FromRef;
use outbox::{OutboxGauges, Table};
use outbox_common::amqp::AmqpConfig;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::metrics::Metrics;
pub use checks::{Alive, Health, PostgresCheck, RabbitMqCheck, Readiness, Ready};
pub use checks::{healthz, metrics, readyz};
pub use outbox_common::status::{Flag, Running, Status};

/// How long one dependency check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a role's `/readyz` checks besides Postgres and its subscriptions,
/// and what its `/metrics` reads from Postgres at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Probes {
    /// RabbitMQ accepts a connection.
    pub amqp: Option<AmqpConfig>,
    /// The oldest pending row of this outbox is younger than this.
    pub lag: Option<(Table, Duration)>,
    /// The outbox tables whose gauges `/metrics` sets.
    pub gauges: Vec<(Table, OutboxGauges)>,
    /// The process runs the WAL relay: `/readyz` holds its lag to the
    /// outbox lag's limit, and reports it.
    pub wal: bool,
}

/// What the probe handlers share.
#[derive(Clone)]
pub struct ProbeState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// The loops and subscriptions of the process.
    pub status: Status,
    pub probes: Arc<Probes>,
}

/// The three probe routes, for any router whose state holds a
/// [`ProbeState`], each with its OpenAPI operation.
pub fn routes<S>() -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
    ProbeState: FromRef<S>,
{
    OpenApiRouter::new()
        .routes(routes!(checks::healthz))
        .routes(routes!(checks::readyz))
        .routes(routes!(checks::metrics))
}

/// The probes alone: a relay's or a consumer's HTTP server.
pub fn router(state: ProbeState) -> Router {
    Router::from(routes::<ProbeState>()).with_state(state)
}

/// Binds `addr` and serves the probes until `cancel`; returns the address.
pub async fn serve(
    addr: SocketAddr,
    state: ProbeState,
    cancel: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()> + Send)> {
    use anyhow::Context;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let server = async move {
        let serve =
            axum::serve(listener, router(state)).with_graceful_shutdown(cancel.cancelled_owned());
        if let Err(error) = serve.await {
            tracing::error!(%error, "probe server failed");
        }
    };
    Ok((bound, server))
}
