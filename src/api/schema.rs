//! Schemas of the OpenAPI document that no value of the program carries: the
//! rules that `orders::NewOrder::from_json` and `extract::idempotency_key`
//! check by hand, the values of the string-typed order status, and the
//! reusable error answers. The order's own fields' schemas live in
//! `orders::schema` (the API depends on the domain, not the reverse) and are
//! re-exported here. The types exist only for their schemas (they are
//! never built); the unit tests of `openapi` hold the limits to the
//! validation code and the integration tests hold real answers to all of it.

#![allow(dead_code)]

use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::{ToResponse, ToSchema};

use super::error::ErrorBody;
use crate::orders;
pub use crate::orders::schema::{Amount, ExternalId, order_status};

// The body of `POST /orders` (what `orders::NewOrder::from_json` accepts,
// and `orders::create_order` with authentication on). Plain comments: doc
// comments would become the schema's description.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = NewOrder)]
pub struct OrderRequest {
    product_id: ExternalId,
    /// Required when the server runs without authentication. With it, the user of the bearer token (its sub): may be omitted, and any other value is a 403.
    #[schema(required = false)]
    user_id: ExternalId,
    amount: Amount,
}

// The `Idempotency-Key` header (no description: the parameter has one).
#[derive(ToSchema)]
#[schema(min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
pub struct IdempotencyKey(String);

// The `Location` of a 202: the path of the order (a lowercase hyphenated UUID).
#[derive(ToSchema)]
#[schema(pattern = "^/orders/[0-9a-f-]{36}$")]
pub struct OrderLocation(String);

/// `status` of a 202: a new order is always `PENDING`.
pub fn accepted_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([orders::PENDING]))
        .build()
}

/// Malformed JSON, a body that is not a JSON object, a missing field, a bad Idempotency-Key or a path id that is not a UUID.
#[derive(ToResponse)]
pub struct BadRequest(ErrorBody);

/// No valid bearer token (only when the server runs with authentication): none was sent, or it is malformed, expired, not yet valid, badly signed, or has the wrong issuer or audience.
#[derive(ToResponse)]
#[response(headers((
    "WWW-Authenticate" = String,
    description = r#"`Bearer`, with `error="invalid_token"` when a token was sent (RFC 6750)."#
)))]
pub struct Unauthorized(ErrorBody);

/// The body's userId is not the bearer token's user (only when the server runs with authentication).
#[derive(ToResponse)]
pub struct Forbidden(ErrorBody);

/// No such order.
#[derive(ToResponse)]
pub struct NotFound(ErrorBody);

/// The body is over the configured limit.
#[derive(ToResponse)]
pub struct PayloadTooLarge(ErrorBody);

/// The Content-Type is not application/json (nor application/*+json).
#[derive(ToResponse)]
pub struct UnsupportedMediaType(ErrorBody);

/// A field has the wrong type or an invalid value, or the Idempotency-Key was used with another order.
#[derive(ToResponse)]
pub struct Unprocessable(ErrorBody);

/// Unexpected failure; the cause is logged, never returned.
#[derive(ToResponse)]
pub struct Internal(ErrorBody);

/// Postgres is unreachable or saturated, or the request timed out; retry later.
#[derive(ToResponse)]
pub struct Unavailable(ErrorBody);

// The top of an OpenAPI document, as `GET /openapi.json` describes its answer.
#[derive(ToSchema)]
pub struct DocumentTop {
    openapi: String,
    #[schema(value_type = Object)]
    info: serde_json::Value,
    #[schema(value_type = Object)]
    paths: serde_json::Value,
}
