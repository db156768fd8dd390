//! `POST /orders` and `GET /orders/{id}`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::Instrument;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{JsonBody, idempotency_key};
use super::idempotency::{self, Claim};
use super::schema::{
    self, BadRequest, Forbidden, IdempotencyKey, Internal, NotFound, OrderLocation, OrderRequest,
    PayloadTooLarge, Unauthorized, Unavailable, Unprocessable, UnsupportedMediaType,
};
use crate::orders::{self, NewOrder, Order, ValidationError, writer};
use crate::telemetry::propagation;

// The answer to an accepted order (plain comments: doc comments would become
// the schema's description).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderAccepted {
    pub order_id: Uuid,
    #[schema(schema_with = schema::accepted_status)]
    pub status: &'static str,
    pub message: &'static str,
}

/// Validates the order, writes it and its `order.created` outbox row in one
/// transaction, wakes the relay and answers 202.
#[utoipa::path(
    post,
    path = "/orders",
    operation_id = "createOrder",
    summary = "Accept a new order",
    description = "Validates the body, stores the order (status PENDING) and its outbox event in one transaction, and answers 202. A missing field or a body that is not a JSON object is a 400; a field of the wrong type or value is a 422. Unknown fields are ignored. With an Idempotency-Key, a retry with the same key and the same order answers the first order's id and creates nothing; the same key with another order is a 422.\n\nWhen the server runs with authentication (AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY_FILE), the request needs a bearer token (401 without a valid one): the order's user is the token's sub, an omitted userId is filled from it, and another userId is a 403. Idempotency keys are then each user's own. Without authentication, userId is required.",
    params(
        (
            "Idempotency-Key" = Option<IdempotencyKey>,
            Header,
            // Optional (not required), but never null.
            nullable = false,
            description = "1 to 255 visible ASCII characters (0x21 to 0x7E); anything else is a 400.",
        ),
    ),
    request_body(
        content = OrderRequest,
        description = "application/json or any application/*+json; another content type is a 415. The body is limited to HTTP_BODY_LIMIT bytes (default 65536); over it is a 413.",
        example = json!({"productId": "123", "userId": "user_99", "amount": 500}),
    ),
    responses(
        (
            status = ACCEPTED,
            description = "Accepted: the order is stored and its event will be published.",
            body = OrderAccepted,
            headers(
                ("Location" = inline(OrderLocation), description = "Where to GET the order: /orders/{orderId}."),
            ),
            links(
                ("GetOrder" = (
                    operation_id = "getOrder",
                    parameters(("id" = "$response.body#/orderId")),
                    description = "The order just accepted.",
                )),
            ),
        ),
        (status = BAD_REQUEST, response = BadRequest),
        (status = UNAUTHORIZED, response = Unauthorized),
        (status = FORBIDDEN, response = Forbidden),
        (status = PAYLOAD_TOO_LARGE, response = PayloadTooLarge),
        (status = UNSUPPORTED_MEDIA_TYPE, response = UnsupportedMediaType),
        (status = UNPROCESSABLE_ENTITY, response = Unprocessable),
        (status = INTERNAL_SERVER_ERROR, response = Internal),
        (status = SERVICE_UNAVAILABLE, response = Unavailable),
    ),
    security(("bearerAuth" = []), ()),
)]
#[tracing::instrument(name = "create_order", skip_all, fields(order.id), err(level = "info"))]
pub async fn create_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?.map(|key| idempotency::scoped(key, caller.user()));
    let order = new_order(&caller, body)?;
    let order_id = Uuid::now_v7();
    let trace_headers = propagation::current_context_headers();
    let (order_id, created) = match key {
        Some(key) => {
            let (order_id, created) =
                create_with_key(&state, &key, order, order_id, trace_headers).await?;
            if created {
                state.wake.notify();
            }
            (order_id, created)
        }
        // The writer wakes the relay itself, as soon as it has committed.
        None => {
            state
                .writer
                .write(order_id, order, trace_headers)
                .instrument(tracing::info_span!("db insert order+outbox"))
                .await?;
            (order_id, true)
        }
    };
    if created {
        state.metrics.orders_created.inc();
    }
    tracing::Span::current().record("order.id", tracing::field::display(order_id));
    Ok(accepted(order_id))
}

/// Validates the body as the caller's order. With authentication on, an
/// omitted `userId` is the token's user and another one is a 403.
fn new_order(caller: &Caller, mut body: serde_json::Value) -> Result<NewOrder, ApiError> {
    if let (Some(user), Some(object)) = (caller.user(), body.as_object_mut())
        && object.get("userId").is_none_or(serde_json::Value::is_null)
    {
        object.insert("userId".into(), user.into());
    }
    let order = NewOrder::from_json(&body).map_err(|error| match error {
        ValidationError::Shape(_) => ApiError::BadRequest(error.to_string()),
        ValidationError::Invalid { .. } => ApiError::Unprocessable(error.to_string()),
    })?;
    if !caller.may_act_for(&order.user_id) {
        return Err(ApiError::Forbidden(
            "userId must be the token's user (its sub)".into(),
        ));
    }
    Ok(order)
}

/// The `Idempotency-Key` path: the key, the order and its outbox row in one
/// transaction of their own. Returns the order id to answer with, and
/// whether this request created it.
async fn create_with_key(
    state: &AppState,
    key: &str,
    order: NewOrder,
    order_id: Uuid,
    trace_headers: serde_json::Value,
) -> Result<(Uuid, bool), ApiError> {
    let normalized = serde_json::to_value(&order).expect("an order serialises");
    let mut tx = state.pool.begin().await?;
    match idempotency::claim(&mut tx, key, &normalized, order_id).await? {
        Claim::New => {}
        Claim::Existing { order_id, request } if request == normalized => {
            tx.commit().await?;
            return Ok((order_id, false));
        }
        Claim::Existing { .. } => {
            return Err(ApiError::Unprocessable(
                "Idempotency-Key was already used with a different request body".into(),
            ));
        }
    }
    writer::write_one(&mut tx, order_id, order, trace_headers).await?;
    tx.commit().await?;
    Ok((order_id, true))
}

fn accepted(order_id: Uuid) -> Response {
    let body = OrderAccepted {
        order_id,
        status: orders::PENDING,
        message: "Order accepted for processing",
    };
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/orders/{order_id}"))],
        Json(body),
    )
        .into_response()
}

/// The order and its status; 404 if unknown (or, with authentication on,
/// another user's), 400 if the id is not a UUID.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    operation_id = "getOrder",
    summary = "An order and its status",
    description = "When the server runs with authentication (AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY_FILE), the request needs a bearer token (401 without a valid one), and another user's order answers 404, as an unknown one does.",
    params(
        (
            "id" = Uuid,
            Path,
            description = "The orderId of a 202 answer; anything but a UUID is a 400.",
        ),
    ),
    responses(
        (status = OK, description = "The order.", body = Order),
        (status = BAD_REQUEST, response = BadRequest),
        (status = UNAUTHORIZED, response = Unauthorized),
        (status = NOT_FOUND, response = NotFound),
        (status = INTERNAL_SERVER_ERROR, response = Internal),
        (status = SERVICE_UNAVAILABLE, response = Unavailable),
    ),
    security(("bearerAuth" = []), ()),
)]
#[tracing::instrument(name = "get_order", skip_all, fields(order.id = %id), err(level = "info"))]
pub async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest("order id must be a UUID".into()))?;
    let mut conn = state.pool.acquire().await?;
    orders::find(&mut conn, id)
        .await?
        // Another user's order is not theirs to know of: as unknown.
        .filter(|order| caller.may_act_for(&order.user_id))
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("order {id} not found")))
}
