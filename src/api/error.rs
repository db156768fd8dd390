//! The one error type of the HTTP API. Its status is one match; internal
//! causes are logged once and never returned to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

// The body of every error answer (schema `Error`). Plain comments, not doc
// comments: those would become the schema's description.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: String,
}

use crate::db::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, missing field, bad header or path (400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is not `application/json` (415).
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// The body is over the configured limit (413).
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// No bearer token, or one that does not verify (401, with a
    /// `WWW-Authenticate` challenge).
    #[error("{0}")]
    Unauthorized(Unauthorized),
    /// The token's user may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// Well-formed but invalid values (422).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A dependency is down or saturated (503); the cause is logged.
    #[error("service temporarily unavailable, retry later")]
    Unavailable(#[source] anyhow::Error),
    /// The request took longer than the configured timeout (503).
    #[error("request timed out")]
    Timeout,
    /// Anything else (500); the cause is logged.
    #[error("internal server error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Why a request is not authenticated (RFC 6750 §3).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unauthorized {
    /// No `Authorization: Bearer` header.
    #[error("a bearer token is required (Authorization: Bearer <token>)")]
    Missing,
    /// A token was given and refused; the reason is safe to tell.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

impl Unauthorized {
    /// The `WWW-Authenticate` challenge: RFC 6750 names the error only when
    /// a token was given.
    fn challenge(&self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Missing => "Bearer",
            Self::Invalid(_) => "Bearer error=\"invalid_token\"",
        })
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        // No connection to be had, or the one in use failed: retryable, so a 503.
        let kind = crate::db::classify(&error);
        if matches!(kind, ErrorKind::Unavailable | ErrorKind::ConnectionLost) {
            Self::Unavailable(anyhow::Error::new(error).context("database unavailable"))
        } else {
            Self::Internal(anyhow::Error::new(error).context("database error"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(cause) | Self::Unavailable(cause) => {
                tracing::error!(error = format!("{cause:#}"), "request failed");
            }
            _ => {}
        }
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        let mut response = (self.status_code(), body).into_response();
        if let Self::Unauthorized(why) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, why.challenge());
        }
        response
    }
}
