//! The HTTP API: one router, state shared by handlers, a middleware that
//! opens the server span, times the request and enforces the timeout.

pub mod auth;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod openapi;
pub mod orders;
pub mod schema;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::HttpConfig;
use crate::metrics::Metrics;
use crate::probe::ProbeState;
use crate::telemetry::propagation;
use auth::Authenticator;
use error::ApiError;
use outbox::Wake;

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Group-commit writer for new orders.
    pub writer: crate::orders::writer::OrderWriter,
    /// Signalled after each committed order so the relay publishes at once.
    pub wake: Wake,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// What `/healthz`, `/readyz` and `/metrics` check and read.
    pub probe: ProbeState,
    /// Checks the bearer tokens of the order routes (off by default).
    pub auth: Authenticator,
}

impl FromRef<AppState> for ProbeState {
    fn from_ref(state: &AppState) -> Self {
        state.probe.clone()
    }
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl AppState {
    /// `wake` is signalled after each commit of new orders; `probe` says
    /// what the probes check, and holds the metrics.
    pub fn new(pool: PgPool, config: &HttpConfig, wake: Wake, probe: ProbeState) -> Self {
        Self {
            writer: crate::orders::writer::OrderWriter::start(pool.clone(), wake.clone()),
            pool,
            wake,
            metrics: probe.metrics.clone(),
            body_limit: config.body_limit,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            probe,
            auth: Authenticator::off(),
        }
    }
}

/// Every route of the API, each registered with its handler's
/// `#[utoipa::path]` operation: [`router`] serves exactly these routes and
/// [`openapi::document`] describes exactly them. Add a route here, with
/// `routes!`, never on the axum `Router`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(orders::create_order))
        .routes(routes!(orders::get_order))
        .routes(routes!(openapi::serve))
        .merge(crate::probe::routes())
}

pub fn router(state: AppState) -> Router {
    Router::from(routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Opens the HTTP server span (honouring an incoming `traceparent`), applies
/// the request timeout and records the request's metrics.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // Must happen before the span is first entered.
    let _ = span.set_parent(propagation::context_from_http(request.headers()));
    let started = Instant::now();
    let response = match tokio::time::timeout(state.request_timeout, next.run(request))
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    };
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    state
        .metrics
        .record_http(&method, &route, status, started.elapsed());
    response
}

/// Serves until `cancel` fires, then stops accepting and lets in-flight
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}
