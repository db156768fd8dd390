//! `/healthz`, `/readyz` and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::outbox::store;

/// Alive: the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
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
        Ok(Ok(status)) => ("ok", status.oldest_pending_age_secs.unwrap_or(0.0)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: Postgres check failed");
            ("unreachable", 0.0)
        }
        Err(_) => ("timeout", 0.0),
    };
    let rabbitmq = match &state.amqp {
        None => "not checked",
        Some(amqp) => match tokio::time::timeout(CHECK_TIMEOUT, crate::amqp::ping(amqp)).await {
            Ok(Ok(())) => "ok",
            Ok(Err(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "readiness: RabbitMQ check failed"
                );
                "unreachable"
            }
            Err(_) => "timeout",
        },
    };
    let lag_ok = lag_secs <= state.max_outbox_lag.as_secs_f64();
    let ready = postgres == "ok" && matches!(rabbitmq, "ok" | "not checked") && lag_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "postgres": postgres,
        "rabbitmq": rabbitmq,
        "outboxLagSeconds": lag_secs,
        "outboxLagLimitSeconds": state.max_outbox_lag.as_secs_f64(),
    });
    (status, Json(body)).into_response()
}

/// The OpenMetrics text exposition, with the outbox gauges read now.
pub async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(mut conn) = state.pool.acquire().await
        && let Ok(status) = store::status(&mut conn).await
    {
        state.metrics.outbox.set(&status);
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
