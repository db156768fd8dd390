//! The probes every role serves on `HTTP_ADDR`: `/healthz` (its loops still
//! run), `/readyz` (what that role depends on) and `/metrics`. The api role
//! serves them beside its own routes; the relay and the consumers serve
//! only these.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, HttpConfig};
use crate::metrics::Metrics;
use outbox::OutboxGauges;
use outbox::Table;

pub use outbox_common::status::{Flag, Running, Status};

/// How long one dependency check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a role's `/readyz` checks besides Postgres.
#[derive(Debug, Clone, Default)]
pub struct Probes {
    /// RabbitMQ accepts a connection.
    pub amqp: Option<AmqpConfig>,
    /// The oldest pending outbox row is younger than this (and `/metrics`
    /// reports the outbox gauges).
    pub max_outbox_lag: Option<Duration>,
    /// The role runs the mailer: `/metrics` reports the mails' outbox.
    pub mailer: bool,
}

impl Probes {
    /// The relay: Postgres, RabbitMQ, and its lag.
    pub fn relay(amqp: &AmqpConfig, http: &HttpConfig) -> Self {
        Self {
            amqp: Some(amqp.clone()),
            max_outbox_lag: Some(Duration::from_millis(http.max_outbox_lag_ms)),
            mailer: false,
        }
    }

    /// A consumer: Postgres, RabbitMQ, and that it is subscribed; `mailer`
    /// when it also runs the mailer.
    pub fn consumer(amqp: &AmqpConfig, mailer: bool) -> Self {
        Self {
            amqp: Some(amqp.clone()),
            max_outbox_lag: None,
            mailer,
        }
    }
}

/// What the probe handlers share.
#[derive(Clone)]
pub struct ProbeState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub status: Status,
    pub probes: Probes,
}

/// The three probe routes.
pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: &'static str,
    /// Loops that have ended (a panic, or a loop that gave up).
    #[serde(rename = "endedLoops", skip_serializing_if = "Vec::is_empty")]
    pub ended_loops: Vec<String>,
}

/// Alive while every loop of the role runs; 503 once one has ended, so an
/// orchestrator restarts the process.
pub async fn healthz(State(state): State<ProbeState>) -> Response {
    health(&state.status)
}

/// The `/healthz` answer for `status`.
pub fn health(status: &Status) -> Response {
    let ended = status.ended();
    let code = if ended.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if ended.is_empty() { "ok" } else { "loop ended" },
        ended_loops: ended,
    };
    (code, Json(body)).into_response()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Readiness {
    status: &'static str,
    postgres: &'static str,
    rabbitmq: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    outbox_lag_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outbox_lag_limit_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_subscribed: Vec<String>,
}

/// Ready: Postgres answers, RabbitMQ accepts a connection, the relay's lag
/// is under its limit, every consumer of the process is subscribed.
pub async fn readyz(State(state): State<ProbeState>) -> Response {
    let outbox = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = state.pool.acquire().await?;
        crate::orders::EVENTS.status(&mut conn).await
    })
    .await;
    let (postgres, lag) = match outbox {
        Ok(Ok(status)) => ("ok", status.oldest_pending_age_secs.unwrap_or(0.0)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: Postgres check failed");
            ("unreachable", 0.0)
        }
        Err(_) => ("timeout", 0.0),
    };
    let rabbitmq = match &state.probes.amqp {
        None => "not checked",
        Some(amqp) => {
            match tokio::time::timeout(CHECK_TIMEOUT, outbox_common::amqp::ping(amqp)).await {
                Ok(Ok(())) => "ok",
                Ok(Err(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "readiness: RabbitMQ check failed"
                    );
                    "unreachable"
                }
                Err(_) => "timeout",
            }
        }
    };
    let limit = state.probes.max_outbox_lag.map(|l| l.as_secs_f64());
    let not_subscribed = state.status.unsubscribed();
    let ready = postgres == "ok"
        && matches!(rabbitmq, "ok" | "not checked")
        && limit.is_none_or(|limit| lag <= limit)
        && not_subscribed.is_empty();
    let body = Readiness {
        status: if ready { "ready" } else { "not ready" },
        postgres,
        rabbitmq,
        outbox_lag_seconds: limit.map(|_| lag),
        outbox_lag_limit_seconds: limit,
        not_subscribed,
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// The OpenMetrics text; a relay's outbox gauges are read now.
pub async fn metrics(State(state): State<ProbeState>) -> Response {
    if state.probes.max_outbox_lag.is_some() {
        refresh_outbox_gauges(&state.pool, &state.metrics).await;
    }
    if state.probes.mailer {
        let mails = &crate::orders::mailer::MAILS;
        refresh_gauges(&state.pool, mails, &state.metrics.mail_outbox).await;
    }
    openmetrics(&state.metrics)
}

/// Reads the events' outbox's pending rows and lag into the gauges.
pub async fn refresh_outbox_gauges(pool: &PgPool, metrics: &Metrics) {
    refresh_gauges(pool, &crate::orders::EVENTS, &metrics.outbox).await;
}

/// Both outboxes' gauges: for the api, which in `run` serves the metrics of
/// every role of the process.
pub async fn refresh_all_gauges(pool: &PgPool, metrics: &Metrics) {
    refresh_outbox_gauges(pool, metrics).await;
    let mails = &crate::orders::mailer::MAILS;
    refresh_gauges(pool, mails, &metrics.mail_outbox).await;
}

/// Reads `table`'s pending rows and lag into `gauges` (bounded in time).
async fn refresh_gauges(pool: &PgPool, table: &Table, gauges: &OutboxGauges) {
    let status = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = pool.acquire().await?;
        table.status(&mut conn).await
    })
    .await;
    if let Ok(Ok(status)) = status {
        gauges.set(&status);
    }
}

/// `metrics` as an OpenMetrics text response.
pub fn openmetrics(metrics: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}
