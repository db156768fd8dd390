//! Authenticated orders: bearer tokens (ES256 with a key pair made here, and
//! HS256) checked on POST /orders and GET /orders/{id}, against an API over
//! the test's own database.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use order_service::api::auth::Authenticator;
use order_service::config::{AuthConfig, HttpConfig};
use order_service::startup::Roles;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, TestDb};

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orders";
/// An HS256 secret of the required 32 bytes.
pub const SECRET: &str = "test-secret-of-at-least-32-bytes!";

/// An API over its own database whose order routes check tokens.
pub async fn spawn_with_auth(config: AuthConfig) -> TestApp {
    let auth = Authenticator::from_config(&config).expect("valid auth settings");
    let db = TestDb::new().await;
    let roles = Roles::new(db.pool.clone(), CancellationToken::new());
    let addr = roles
        .start_api_with_auth(&HttpConfig::default(), None, auth)
        .await
        .expect("starting the API");
    TestApp {
        addr,
        db,
        client: reqwest::Client::new(),
        roles,
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub`, valid for ten minutes.
pub fn hs256_token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": now() + 600});
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// An ECDSA P-256 key pair: the public key in a PEM file (removed on drop),
/// the private one to sign tokens with.
struct KeyPair {
    public_file: PathBuf,
    public_pem: String,
    signing: EncodingKey,
}

impl KeyPair {
    fn generate() -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let public_file = std::env::temp_dir().join(format!("jwt-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&public_file, pair.public_key_pem()).unwrap();
        Self {
            public_file,
            public_pem: pair.public_key_pem(),
            signing: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &self.signing).unwrap()
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.public_file);
    }
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE})
}

/// `claims(sub)` with `field` set to `value` (or removed when null).
fn claims_with(sub: &str, field: &str, value: Value) -> Value {
    let mut claims = claims(sub);
    if value.is_null() {
        claims.as_object_mut().unwrap().remove(field);
    } else {
        claims[field] = value;
    }
    claims
}

async fn es256_app(keys: &KeyPair) -> TestApp {
    spawn_with_auth(AuthConfig {
        auth_jwt_issuer: Some(ISSUER.into()),
        auth_jwt_audience: Some(AUDIENCE.into()),
        ..AuthConfig::public_key_file(&keys.public_file)
    })
    .await
}

/// Posts `body` with an `Idempotency-Key` of its own, so that a refusal
/// shows it stored no key either.
async fn post(app: &TestApp, authorization: Option<&str>, body: &Value) -> reqwest::Response {
    let key = uuid::Uuid::new_v4().simple().to_string();
    let mut request = app
        .client
        .post(app.url("/orders"))
        .header("Idempotency-Key", key)
        .json(body);
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    request.send().await.unwrap()
}

async fn rows_written(db: &TestDb) -> (i64, i64, i64) {
    (
        db.count("SELECT count(*) FROM orders").await,
        db.count("SELECT count(*) FROM outbox").await,
        db.count("SELECT count(*) FROM idempotency_keys").await,
    )
}

/// What a refused request gets.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// 401 with a bare `Bearer` challenge: no token was given.
    NoToken,
    /// 401 with `error="invalid_token"`: the token given is not accepted.
    BadToken,
    /// 403: the token is fine but the order is another user's.
    Forbidden,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::NoToken | Self::BadToken => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    fn challenge(self) -> Option<&'static str> {
        match self {
            Self::NoToken => Some("Bearer"),
            Self::BadToken => Some(r#"Bearer error="invalid_token""#),
            Self::Forbidden => None,
        }
    }
}

#[tokio::test]
async fn a_request_without_a_valid_token_for_its_user_is_refused_and_writes_nothing() {
    use Refusal::*;
    let keys = KeyPair::generate();
    let stranger = KeyPair::generate();
    let app = es256_app(&keys).await;
    let bearer = |token: String| Some(format!("Bearer {token}"));
    let signed = |field: &str, value: Value| bearer(keys.sign(&claims_with("alice", field, value)));
    // The public key used as an HMAC secret: the algorithm-confusion attack.
    let hmac_with_public_key = EncodingKey::from_secret(keys.public_pem.as_bytes()).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("alice"),
        &hmac_with_public_key,
    )
    .unwrap();
    let cases = [
        ("no token", None, "alice", NoToken),
        (
            "another scheme",
            Some("Basic YWxpY2U6cHc=".into()),
            "alice",
            NoToken,
        ),
        ("an empty bearer", Some("Bearer ".into()), "alice", BadToken),
        (
            "a malformed token",
            Some("Bearer not.a.jwt".into()),
            "alice",
            BadToken,
        ),
        (
            "an expired token",
            signed("exp", json!(now() - 3600)),
            "alice",
            BadToken,
        ),
        (
            "a token not valid yet",
            signed("nbf", json!(now() + 3600)),
            "alice",
            BadToken,
        ),
        ("no exp", signed("exp", Value::Null), "alice", BadToken),
        (
            "a wrong signature",
            bearer(stranger.sign(&claims("alice"))),
            "alice",
            BadToken,
        ),
        (
            "HS256 keyed with the public key",
            bearer(confused),
            "alice",
            BadToken,
        ),
        (
            "a wrong issuer",
            signed("iss", json!("https://evil.test")),
            "alice",
            BadToken,
        ),
        ("no issuer", signed("iss", Value::Null), "alice", BadToken),
        (
            "a wrong audience",
            signed("aud", json!("billing")),
            "alice",
            BadToken,
        ),
        ("no audience", signed("aud", Value::Null), "alice", BadToken),
        ("no sub", signed("sub", Value::Null), "alice", BadToken),
        ("a blank sub", signed("sub", json!(" ")), " ", BadToken),
        (
            "another user's userId",
            bearer(keys.sign(&claims("alice"))),
            "bob",
            Forbidden,
        ),
    ];
    for (what, authorization, user_id, refusal) in cases {
        let body = json!({"productId": "123", "userId": user_id, "amount": 500});
        let response = post(&app, authorization.as_deref(), &body).await;
        assert_eq!(response.status(), refusal.status(), "{what}");
        let header = response.headers().get("www-authenticate");
        let header = header.map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(
            header.as_deref(),
            refusal.challenge(),
            "WWW-Authenticate of {what}"
        );
        let error: Value = response.json().await.expect("a JSON error");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: {error}");
        assert_eq!(rows_written(&app.db).await, (0, 0, 0), "{what} wrote a row");
    }
    // A refused GET answers the same way.
    let url = app.url(&format!("/orders/{}", uuid::Uuid::new_v4()));
    let response = app.client.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    app.stop().await;
}

#[tokio::test]
async fn a_valid_token_orders_for_its_sub_and_reads_only_that_users_orders() {
    let keys = KeyPair::generate();
    let app = es256_app(&keys).await;
    let alice = format!("Bearer {}", keys.sign(&claims("alice")));
    let bob = format!("Bearer {}", keys.sign(&claims("bob")));

    let omitted = post(
        &app,
        Some(&alice),
        &json!({"productId": "123", "amount": 500}),
    )
    .await;
    assert_eq!(omitted.status(), StatusCode::ACCEPTED);
    let location = omitted.headers()["location"].to_str().unwrap().to_owned();
    let same = json!({"productId": "123", "userId": "alice", "amount": 7});
    let stated = post(&app, Some(&alice), &same).await;
    assert_eq!(stated.status(), StatusCode::ACCEPTED);
    let users: Vec<String> = sqlx::query_scalar("SELECT user_id FROM orders")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(users, ["alice", "alice"]);

    let get = |authorization: &str| {
        let request = app.client.get(app.url(&location));
        request.header("Authorization", authorization).send()
    };
    let own = get(&alice).await.unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    assert_eq!(own.json::<Value>().await.unwrap()["userId"], "alice");

    let theirs = get(&bob).await.unwrap();
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
    let id = location.trim_start_matches("/orders/");
    assert_eq!(
        theirs.json::<Value>().await.unwrap(),
        json!({"error": format!("order {id} not found")}),
        "another user's order answers as an unknown one"
    );
    app.stop().await;
}

#[tokio::test]
async fn two_users_with_the_same_idempotency_key_each_get_their_own_order() {
    let app = spawn_with_auth(AuthConfig::hs256(SECRET)).await;
    let order = json!({"productId": "123", "amount": 500});
    let send = |user: &str| {
        let request = app.client.post(app.url("/orders")).json(&order);
        let request = request.header("Authorization", format!("Bearer {}", hs256_token(user)));
        request.header("Idempotency-Key", "same-key").send()
    };
    let mut ids = Vec::new();
    for user in ["alice", "bob", "alice"] {
        let response = send(user).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{user}");
        let body: Value = response.json().await.unwrap();
        ids.push(body["orderId"].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1], "bob got alice's order");
    assert_eq!(ids[0], ids[2], "alice's retry created a second order");
    assert_eq!(rows_written(&app.db).await, (2, 2, 2));
    app.stop().await;
}

#[tokio::test]
async fn probes_metrics_and_the_document_stay_open() {
    let app = spawn_with_auth(AuthConfig::hs256(SECRET)).await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        assert!(
            !response.headers().contains_key("www-authenticate"),
            "{path}"
        );
    }
    app.stop().await;
}
