//! The three probes' handlers and answers. Doc comments on the answers'
//! types and fields become descriptions in the api's OpenAPI document;
//! plain comments stay out of it.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use super::{CHECK_TIMEOUT, ProbeState};

// The answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    #[schema(inline)]
    pub status: Alive,
    /// The loops of the process that have ended (a panic, or a loop that gave up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ended_loops: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum Alive {
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "loop ended")]
    LoopEnded,
}

// The answer of `/readyz`, 200 or 503.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    #[schema(inline)]
    pub status: Ready,
    #[schema(inline)]
    pub postgres: PostgresCheck,
    // Its description is the enum's: a doc comment here would make utoipa wrap
    // the inlined enum in an `allOf` with an object schema.
    #[schema(inline)]
    pub rabbitmq: RabbitMqCheck,
    /// Age of the oldest unpublished outbox row (0 when none, or when Postgres did not answer); for a role that checks it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub outbox_lag_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub outbox_lag_limit_seconds: Option<f64>,
    /// With `RELAY_MODE=wal`: the age of the oldest transaction the WAL relay received and the broker has not confirmed (held to the outbox lag's limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub wal_lag_seconds: Option<f64>,
    /// With `RELAY_MODE=wal`: WAL bytes between the server's position and the slot's confirmed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub wal_lag_bytes: Option<i64>,
    /// The consumers of the process not subscribed to their queue now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_subscribed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum Ready {
    #[serde(rename = "ready")]
    Ready,
    #[serde(rename = "not ready")]
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PostgresCheck {
    Ok,
    Unreachable,
    Timeout,
}

/// "not checked" when this role does not check RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum RabbitMqCheck {
    #[serde(rename = "ok")]
    Ok,
    #[serde(rename = "unreachable")]
    Unreachable,
    #[serde(rename = "timeout")]
    Timeout,
    #[serde(rename = "not checked")]
    NotChecked,
}

/// Alive: every loop of the process still runs. Once one has ended, 503,
/// so that an orchestrator restarts the process.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    summary = "Liveness: every loop of the process still runs",
    responses(
        (status = OK, description = "Alive.", body = inline(Health)),
        (status = SERVICE_UNAVAILABLE, description = "A loop has ended; restart the process.", body = inline(Health)),
    ),
)]
pub async fn healthz(State(state): State<ProbeState>) -> Response {
    let ended_loops = state.status.ended();
    let (code, status) = if ended_loops.is_empty() {
        (StatusCode::OK, Alive::Ok)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Alive::LoopEnded)
    };
    (
        code,
        Json(Health {
            status,
            ended_loops,
        }),
    )
        .into_response()
}

/// Ready: Postgres answers, RabbitMQ accepts a connection (for a role that
/// uses it), the oldest pending outbox row is younger than the limit (for a
/// role that checks it), and every consumer of the process is subscribed.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    summary = "Readiness: Postgres answers, RabbitMQ accepts a connection (when the role checks it), the oldest unpublished outbox row is younger than the limit, and every consumer of the process is subscribed",
    responses(
        (status = OK, description = "Ready.", body = Readiness),
        (status = SERVICE_UNAVAILABLE, description = "Not ready; the body says which check failed.", body = Readiness),
    ),
)]
pub async fn readyz(State(state): State<ProbeState>) -> Response {
    let (postgres, lag) = check_postgres(&state).await;
    let rabbitmq = check_rabbitmq(&state).await;
    let limit = state
        .probes
        .lag
        .as_ref()
        .map(|(_, limit)| limit.as_secs_f64());
    let not_subscribed = state.status.unsubscribed();
    let wal = &state.metrics.wal;
    let wal_lag = state.probes.wal.then(|| wal.lag_seconds.get());
    let ready = postgres == PostgresCheck::Ok
        && matches!(rabbitmq, RabbitMqCheck::Ok | RabbitMqCheck::NotChecked)
        && limit.is_none_or(|limit| lag <= limit && wal_lag.is_none_or(|wal| wal <= limit))
        && not_subscribed.is_empty();
    let (code, status) = if ready {
        (StatusCode::OK, Ready::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Ready::NotReady)
    };
    let body = Readiness {
        status,
        postgres,
        rabbitmq,
        outbox_lag_seconds: limit.map(|_| lag),
        outbox_lag_limit_seconds: limit,
        wal_lag_seconds: wal_lag,
        wal_lag_bytes: state.probes.wal.then(|| wal.lag_bytes.get()),
        not_subscribed,
    };
    (code, Json(body)).into_response()
}

/// Postgres answers (the outbox's lag, when the role checks it, is the
/// query; `SELECT 1` otherwise), and the lag in seconds.
async fn check_postgres(state: &ProbeState) -> (PostgresCheck, f64) {
    let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = state.pool.acquire().await?;
        match &state.probes.lag {
            Some((table, _)) => Ok(table.status(&mut conn).await?.oldest_pending_age_secs),
            None => sqlx::query("SELECT 1")
                .execute(&mut *conn)
                .await
                .map(|_| None),
        }
    })
    .await;
    match answer {
        Ok(Ok(lag)) => (PostgresCheck::Ok, lag.unwrap_or(0.0)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: Postgres check failed");
            (PostgresCheck::Unreachable, 0.0)
        }
        Err(_) => (PostgresCheck::Timeout, 0.0),
    }
}

async fn check_rabbitmq(state: &ProbeState) -> RabbitMqCheck {
    let Some(amqp) = &state.probes.amqp else {
        return RabbitMqCheck::NotChecked;
    };
    match tokio::time::timeout(CHECK_TIMEOUT, outbox_common::amqp::ping(amqp)).await {
        Ok(Ok(())) => RabbitMqCheck::Ok,
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: RabbitMQ check failed");
            RabbitMqCheck::Unreachable
        }
        Err(_) => RabbitMqCheck::Timeout,
    }
}

/// The OpenMetrics text exposition, with the outbox gauges read now.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Metrics, OpenMetrics text format 1.0.0",
    responses((status = OK, description = "The metrics.", body = String, content_type = "application/openmetrics-text")),
)]
pub async fn metrics(State(state): State<ProbeState>) -> Response {
    for (table, gauges) in &state.probes.gauges {
        refresh_gauges(&state.pool, table, gauges).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Reads `table`'s pending rows and lag into `gauges` (bounded in time).
async fn refresh_gauges(pool: &PgPool, table: &outbox::Table, gauges: &outbox::OutboxGauges) {
    let status = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = pool.acquire().await?;
        table.status(&mut conn).await
    })
    .await;
    if let Ok(Ok(status)) = status {
        gauges.set(&status);
    }
}
