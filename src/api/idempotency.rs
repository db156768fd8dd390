//! `Idempotency-Key`: the first request with a key wins; later ones with the
//! same body get the same answer, with another body a 422. With
//! authentication on, each user's keys are their own ([`scoped`]).

use sqlx::PgConnection;
use uuid::Uuid;

/// The key as stored: with authentication on, `"<key> <user>"`, so two
/// users who pick the same key never meet (neither sees the other's order
/// id, nor is refused because of the other's body). A key has no spaces, so
/// this never equals another user's key nor a key stored with authentication
/// off.
pub fn scoped(key: String, user: Option<&str>) -> String {
    match user {
        Some(user) => format!("{key} {user}"),
        None => key,
    }
}

/// The outcome of claiming a key inside the order's transaction.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// The key is ours; go on and create the order with `order_id`.
    New,
    /// The key was used before (its transaction has committed).
    Existing {
        order_id: Uuid,
        request: serde_json::Value,
    },
}

/// Inserts the key. A concurrent request with the same key blocks on the
/// unique index until the first transaction ends, then sees its row, so eight
/// racing requests create one order.
pub async fn claim(
    conn: &mut PgConnection,
    key: &str,
    request: &serde_json::Value,
    order_id: Uuid,
) -> sqlx::Result<Claim> {
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, request, order_id) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO NOTHING RETURNING order_id",
    )
    .bind(key)
    .bind(request)
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_some() {
        return Ok(Claim::New);
    }
    let (order_id, request): (Uuid, serde_json::Value) =
        sqlx::query_as("SELECT order_id, request FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_one(conn)
            .await?;
    Ok(Claim::Existing { order_id, request })
}
