//! The OpenAPI schemas of the order's own fields: the rules that
//! [`super::NewOrder::from_json`] checks by hand and the values of the
//! string-typed status. They belong to the domain, so `api::schema` takes
//! them from here and the order types name them without importing the API.
//! The types exist only for their schemas (they are never built).

#![allow(dead_code)]

use utoipa::ToSchema;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};

/// 1 to 128 characters (Unicode scalar values), not only whitespace, no control characters (U+0000 to U+001F, U+007F to U+009F).
#[derive(ToSchema)]
#[schema(
    min_length = 1,
    max_length = 128,
    pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
)]
pub struct ExternalId(String);

/// Minor units (cents); at most 10^12.
#[derive(ToSchema)]
#[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
pub struct Amount(i64);

/// `status` of an [`super::Order`].
pub fn order_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(
            "PENDING until billing confirms the order, then CONFIRMED.",
        ))
        .enum_values(Some([super::PENDING, super::CONFIRMED]))
        .build()
}
