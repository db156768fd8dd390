//! `/healthz`, `/readyz` and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

// The answer of `/healthz`. Doc comments on these types and their fields
// become descriptions in the OpenAPI document; plain comments stay out of it.
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
    /// Age of the oldest unpublished outbox row (0 when none, or when Postgres did not answer).
    #[schema(minimum = 0)]
    pub outbox_lag_seconds: f64,
    #[schema(minimum = 0)]
    pub outbox_lag_limit_seconds: f64,
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
pub async fn healthz(State(state): State<AppState>) -> Response {
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

/// Ready: Postgres answers, RabbitMQ accepts a connection (when configured),
/// and the oldest pending outbox row is younger than the configured limit.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    summary = "Readiness: Postgres answers, RabbitMQ accepts a connection (when the role checks it), and the oldest unpublished outbox row is younger than the limit",
    responses(
        (status = OK, description = "Ready.", body = Readiness),
        (status = SERVICE_UNAVAILABLE, description = "Not ready; the body says which check failed.", body = Readiness),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    let outbox = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = state.pool.acquire().await?;
        crate::orders::EVENTS.status(&mut conn).await
    })
    .await;
    let (postgres, lag_secs) = match outbox {
        Ok(Ok(status)) => (
            PostgresCheck::Ok,
            status.oldest_pending_age_secs.unwrap_or(0.0),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: Postgres check failed");
            (PostgresCheck::Unreachable, 0.0)
        }
        Err(_) => (PostgresCheck::Timeout, 0.0),
    };
    let rabbitmq = match &state.amqp {
        None => RabbitMqCheck::NotChecked,
        Some(amqp) => {
            match tokio::time::timeout(CHECK_TIMEOUT, outbox_common::amqp::ping(amqp)).await {
                Ok(Ok(())) => RabbitMqCheck::Ok,
                Ok(Err(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "readiness: RabbitMQ check failed"
                    );
                    RabbitMqCheck::Unreachable
                }
                Err(_) => RabbitMqCheck::Timeout,
            }
        }
    };
    let lag_ok = lag_secs <= state.max_outbox_lag.as_secs_f64();
    let ready = postgres == PostgresCheck::Ok
        && matches!(rabbitmq, RabbitMqCheck::Ok | RabbitMqCheck::NotChecked)
        && lag_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { Ready::Ready } else { Ready::NotReady },
        postgres,
        rabbitmq,
        outbox_lag_seconds: lag_secs,
        outbox_lag_limit_seconds: state.max_outbox_lag.as_secs_f64(),
    };
    (status, Json(body)).into_response()
}

/// The OpenMetrics text exposition, with the outbox gauges read now.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    summary = "Metrics, OpenMetrics text format 1.0.0",
    responses((status = OK, description = "The metrics.", body = String, content_type = "application/openmetrics-text")),
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    crate::probe::refresh_all_gauges(&state.pool, &state.metrics).await;
    crate::probe::openmetrics(&state.metrics)
}
