//! `/healthz`, `/readyz` and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use crate::outbox::store;

/// The answer of `/healthz`.
#[derive(Debug, Serialize)]
pub struct Health {
    pub status: Alive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Alive {
    Ok,
}

/// The answer of `/readyz`, 200 or 503.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    pub status: Ready,
    pub postgres: PostgresCheck,
    pub rabbitmq: RabbitMqCheck,
    /// Age of the oldest unpublished outbox row (0 when none, or when Postgres did not answer).
    pub outbox_lag_seconds: f64,
    pub outbox_lag_limit_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Ready {
    #[serde(rename = "ready")]
    Ready,
    #[serde(rename = "not ready")]
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PostgresCheck {
    Ok,
    Unreachable,
    Timeout,
}

/// "not checked" when this role does not check RabbitMQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// Alive: the process answers.
pub async fn healthz() -> Json<Health> {
    Json(Health { status: Alive::Ok })
}

/// Ready: Postgres answers, RabbitMQ accepts a connection (when configured),
/// and the oldest pending outbox row is younger than the configured limit.
pub async fn readyz(State(state): State<AppState>) -> Response {
    const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
    let outbox = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut conn = state.pool.acquire().await?;
        store::status(&mut conn).await
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
        Some(amqp) => match tokio::time::timeout(CHECK_TIMEOUT, crate::amqp::ping(amqp)).await {
            Ok(Ok(())) => RabbitMqCheck::Ok,
            Ok(Err(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "readiness: RabbitMQ check failed"
                );
                RabbitMqCheck::Unreachable
            }
            Err(_) => RabbitMqCheck::Timeout,
        },
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

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let outbox = match state.pool.acquire().await {
        Ok(mut conn) => store::status(&mut conn).await.ok(),
        Err(_) => None,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(outbox.as_ref()),
    )
        .into_response()
}
