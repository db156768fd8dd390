//! The OpenAPI document of the HTTP API, served at `GET /openapi.json`. It
//! is generated: the operations come from the handlers' `#[utoipa::path]`
//! attributes as [`super::routes()`] registers them (the same list the router
//! serves), the schemas from the bodies' `ToSchema` derives. The integration
//! tests hold the running API to it, and so does `.ci/fuzz.sh`.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::error::ErrorBody;
use super::schema::{
    BadRequest, DocumentTop, Forbidden, IdempotencyKey, Internal, NotFound, PayloadTooLarge,
    Unauthorized, Unavailable, Unprocessable, UnsupportedMediaType,
};

const DESCRIPTION: &str = "Orders through a transactional outbox. POST /orders writes the order and its order.created event in one Postgres transaction and answers 202; a relay publishes the event to RabbitMQ and the billing consumer later marks the order CONFIRMED.

Every error body is JSON {\"error\": \"...\"}; a 5xx body never carries internals. An unknown path answers 404 and a known path with another method 405, both with that error body. Any request that outlives the server's request timeout (HTTP_REQUEST_TIMEOUT_MS, default 10 s) answers 503.

Authentication is off by default. With AUTH_JWT_SECRET (HS256) or AUTH_JWT_PUBLIC_KEY_FILE (RS256 or ES256), and optionally AUTH_JWT_ISSUER and AUTH_JWT_AUDIENCE, the order operations need `Authorization: Bearer <JWT>` (scheme bearerAuth) whose sub is the user; the probes, /metrics and this document stay open.";

/// What the document has besides its paths: `info` (title and version from
/// Cargo.toml), the reusable error answers, and the schemas that only
/// parameters or those answers use (utoipa-axum collects the schemas of
/// bodies, not of parameters or reusable responses).
#[derive(OpenApi)]
#[openapi(
    info(description = DESCRIPTION),
    modifiers(&BearerScheme),
    components(
        schemas(ErrorBody, IdempotencyKey),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unprocessable,
            Internal,
            Unavailable,
        ),
    )
)]
struct ApiDoc;

/// The `bearerAuth` security scheme the order operations name.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .description(Some(
                "A JWT whose sub is the user: HS256 with AUTH_JWT_SECRET, or RS256/ES256 verified with AUTH_JWT_PUBLIC_KEY_FILE; exp is required, and iss and aud when AUTH_JWT_ISSUER and AUTH_JWT_AUDIENCE are set. Only when the server runs with authentication.",
            ))
            .build();
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearerAuth", SecurityScheme::Http(scheme));
    }
}

/// The document without paths, for [`super::routes()`] to add them to.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    let mut api = super::routes().into_openapi();
    require_sent_headers(&mut api);
    api.to_pretty_json()
        .expect("the OpenAPI document serialises")
});

/// The document as `GET /openapi.json` serves it (OpenAPI 3.1, JSON).
pub fn document() -> &'static str {
    &DOCUMENT
}

/// Headers always sent with the answer that documents them.
const SENT_HEADERS: [&str; 2] = ["Location", "WWW-Authenticate"];

/// Every `Location` and `WWW-Authenticate` a response documents is always
/// sent. utoipa's `Header` has no `required` field, so it goes in as a
/// (flattened) extension entry.
fn require_sent_headers(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    let operations = api.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
    });
    let reusable = api
        .components
        .iter_mut()
        .flat_map(|components| components.responses.values_mut());
    let responses = operations
        .flat_map(|operation| operation.responses.responses.values_mut())
        .chain(reusable);
    for response in responses {
        let RefOr::T(response) = response else {
            continue;
        };
        for name in SENT_HEADERS {
            if let Some(RefOr::T(header)) = response.headers.get_mut(name) {
                header
                    .extensions
                    .get_or_insert_with(Default::default)
                    .insert("required".into(), true.into());
            }
        }
    }
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    summary = "This document",
    responses(
        (status = OK, description = "The OpenAPI document of this API.", body = inline(DocumentTop)),
    ),
)]
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn parsed() -> Value {
        serde_json::from_str(document()).expect("the document is valid JSON")
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, node: &Value, refs: &mut usize) {
            match node {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let pointer = target.strip_prefix('#').expect("a local $ref");
                        assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
                        *refs += 1;
                    }
                    map.values().for_each(|child| walk(doc, child, refs));
                }
                Value::Array(items) => items.iter().for_each(|child| walk(doc, child, refs)),
                _ => {}
            }
        }
        let doc = parsed();
        let mut refs = 0;
        walk(&doc, &doc, &mut refs);
        assert!(refs > 0);
        assert_eq!(doc["openapi"], "3.1.0");
    }

    #[test]
    fn every_operation_has_an_id_and_a_success() {
        let doc = parsed();
        let mut ids = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("a path item") {
                let id = operation["operationId"].as_str();
                let id = id.unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                ids.push(id.to_owned());
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|status| status.starts_with('2')),
                    "{method} {path} documents no success"
                );
            }
        }
        let count = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count, "operationIds are unique");
    }

    #[test]
    fn the_limits_match_the_validation_code() {
        let doc = parsed();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["ExternalId"]["maxLength"],
            crate::orders::MAX_ID_CHARS
        );
        assert_eq!(schemas["Amount"]["maximum"], crate::orders::MAX_AMOUNT);
        assert_eq!(schemas["Amount"]["minimum"], 1);
    }

    #[test]
    fn the_order_operations_declare_the_bearer_scheme_and_the_rest_is_open() {
        let doc = parsed();
        let scheme = &doc["components"]["securitySchemes"]["bearerAuth"];
        assert_eq!(
            (&scheme["type"], &scheme["scheme"], &scheme["bearerFormat"]),
            (&"http".into(), &"bearer".into(), &"JWT".into())
        );
        for (path, method) in [("/orders", "post"), ("/orders/{id}", "get")] {
            let operation = &doc["paths"][path][method];
            // Bearer, or nothing when the server runs without authentication.
            assert_eq!(
                operation["security"],
                serde_json::json!([{"bearerAuth": []}, {}])
            );
            let unauthorized = &doc["components"]["responses"]["Unauthorized"];
            assert_eq!(
                unauthorized["headers"]["WWW-Authenticate"]["required"],
                true
            );
            assert!(operation["responses"]["401"].is_object(), "{method} {path}");
        }
        assert!(doc["paths"]["/orders"]["post"]["responses"]["403"].is_object());
        for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert!(doc["paths"][path]["get"]["security"].is_null(), "{path}");
        }
        assert!(doc["security"].is_null(), "no document-wide requirement");
        let required = &doc["components"]["schemas"]["NewOrder"]["required"];
        assert_eq!(required, &serde_json::json!(["productId", "amount"]));
    }

    #[test]
    fn the_location_of_an_accepted_order_is_required() {
        let doc = parsed();
        let location = &doc["paths"]["/orders"]["post"]["responses"]["202"]["headers"]["Location"];
        assert_eq!(location["required"], true, "{location}");
        assert_eq!(location["schema"]["type"], "string");
    }
}
