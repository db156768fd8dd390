//! The order domain, on top of the generic outbox and inbox: validation of a
//! new order, the `orders` table, the events ([`events`]), the group-commit
//! writer ([`writer`]), and the two consumers' handlers ([`billing`],
//! [`email`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

pub mod billing;
pub mod email;
pub mod events;
pub mod mailer;
pub mod schema;
pub mod writer;

pub use events::{
    BILLING, EMAIL, ORDER_CONFIRMED, ORDER_CREATED, OrderConfirmed, OrderEvent, SUBSCRIPTIONS,
};

/// Longest `productId`/`userId` accepted, in characters.
/// The events' outbox: `order.created` and `order.confirmed`, published
/// to RabbitMQ by the relay, numbered within their order (`seq`), so that
/// the e-mail consumer applies an order's events in sequence.
pub static EVENTS: std::sync::LazyLock<outbox::Table> =
    std::sync::LazyLock::new(|| outbox::Table::named("outbox").with_sequences());

pub const MAX_ID_CHARS: usize = 128;
/// Largest amount accepted, in minor units (ten billion in major units).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Why a request body is not a valid order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The body is JSON but not an object, or lacks a required field (400).
    #[error("{0}")]
    Shape(String),
    /// A field is present but its value is not acceptable (422).
    #[error("{field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// A validated order, not yet stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewOrder {
    #[schema(value_type = schema::ExternalId)]
    pub product_id: String,
    #[schema(value_type = schema::ExternalId)]
    pub user_id: String,
    #[schema(value_type = schema::Amount)]
    pub amount: i64,
}

impl NewOrder {
    /// Validates a parsed JSON body. Unknown fields are ignored, like the
    /// original Node.js service did.
    pub fn from_json(body: &serde_json::Value) -> Result<Self, ValidationError> {
        let object = body
            .as_object()
            .ok_or_else(|| ValidationError::Shape("request body must be a JSON object".into()))?;
        let field = |name: &'static str| {
            object
                .get(name)
                .filter(|v| !v.is_null())
                .ok_or_else(|| ValidationError::Shape(format!("missing field `{name}`")))
        };
        Ok(Self {
            product_id: validate_id("productId", field("productId")?)?,
            user_id: validate_id("userId", field("userId")?)?,
            amount: validate_amount(field("amount")?)?,
        })
    }
}

fn validate_id(field: &'static str, value: &serde_json::Value) -> Result<String, ValidationError> {
    let invalid = |reason| ValidationError::Invalid { field, reason };
    let text = value.as_str().ok_or(invalid("must be a string"))?;
    if text.trim().is_empty() {
        return Err(invalid("must not be empty"));
    }
    if text.chars().count() > MAX_ID_CHARS {
        return Err(invalid("must be at most 128 characters"));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    Ok(text.to_owned())
}

fn validate_amount(value: &serde_json::Value) -> Result<i64, ValidationError> {
    let invalid = |reason| ValidationError::Invalid {
        field: "amount",
        reason,
    };
    let serde_json::Value::Number(number) = value else {
        return Err(invalid("must be a positive integer (minor units)"));
    };
    match number.as_i64() {
        Some(amount) if amount <= 0 => Err(invalid("must be greater than zero")),
        Some(amount) if amount > MAX_AMOUNT => Err(invalid("must be at most 1000000000000")),
        Some(amount) => Ok(amount),
        None if number.is_u64() => Err(invalid("must be at most 1000000000000")),
        None => Err(invalid("must be a positive integer (minor units)")),
    }
}

/// Order status as stored in `orders.status`.
pub const PENDING: &str = "PENDING";
pub const CONFIRMED: &str = "CONFIRMED";

/// An order as `GET /orders/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    #[serde(rename = "orderId")]
    pub id: Uuid,
    pub product_id: String,
    pub user_id: String,
    #[schema(value_type = schema::Amount)]
    pub amount: i64,
    #[schema(schema_with = schema::order_status)]
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Inserts a `PENDING` order; returns its creation time.
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    order: &NewOrder,
) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar(
        "INSERT INTO orders (id, product_id, user_id, amount) VALUES ($1, $2, $3, $4) \
         RETURNING created_at",
    )
    .bind(id)
    .bind(&order.product_id)
    .bind(&order.user_id)
    .bind(order.amount)
    .fetch_one(conn)
    .await
}

pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Order>> {
    sqlx::query_as(
        "SELECT id, product_id, user_id, amount, status, created_at, updated_at \
         FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: serde_json::Value) -> Result<NewOrder, ValidationError> {
        NewOrder::from_json(&body)
    }

    #[test]
    fn a_well_formed_order_is_accepted() {
        let order = check(json!({"productId": "123", "userId": "user_99", "amount": 500})).unwrap();
        assert_eq!(order.amount, 500);
        assert_eq!(order.user_id, "user_99");
    }

    #[test]
    fn missing_fields_are_shape_errors_and_bad_values_are_invalid() {
        assert!(matches!(
            check(json!({"userId": "u", "amount": 1})),
            Err(ValidationError::Shape(_))
        ));
        assert!(matches!(
            check(json!([1, 2])),
            Err(ValidationError::Shape(_))
        ));
        for amount in [
            json!(0),
            json!(-5),
            json!(1.5),
            json!("500"),
            json!(1e30),
            json!(u64::MAX),
        ] {
            let result = check(json!({"productId": "p", "userId": "u", "amount": amount}));
            assert!(
                matches!(
                    result,
                    Err(ValidationError::Invalid {
                        field: "amount",
                        ..
                    })
                ),
                "{amount} gave {result:?}"
            );
        }
        for id in [
            json!(""),
            json!("   "),
            json!(7),
            json!("a\u{0}b"),
            json!("x".repeat(129)),
        ] {
            let result = check(json!({"productId": id, "userId": "u", "amount": 1}));
            assert!(matches!(
                result,
                Err(ValidationError::Invalid {
                    field: "productId",
                    ..
                })
            ));
        }
    }
}
