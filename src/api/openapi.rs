//! The OpenAPI document of the HTTP API, served at `GET /openapi.json`, and
//! the list of routes it must describe. The integration tests hold the
//! document, this list and the router to each other, and `.ci/fuzz.sh`
//! holds the running API to the document.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The OpenAPI 3.0.3 document, kept as JSON beside this file.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// Every `(method, path)` that [`super::router`] serves, paths in the
/// router's (and OpenAPI's) `{param}` syntax. Add a route here, in the
/// router and in `openapi.json` together; the tests fail until all three agree.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/orders"),
    ("GET", "/orders/{id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
];

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
    }

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    #[test]
    fn the_document_describes_exactly_the_listed_routes() {
        let doc = document();
        let described: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("a path item")
                    .keys()
                    .filter(|key| METHODS.contains(&key.as_str()))
                    .map(move |method| (method.to_uppercase(), path.clone()))
            })
            .collect();
        let listed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(method, path)| (method.to_string(), path.to_string()))
            .collect();
        assert_eq!(described, listed);
        assert_eq!(listed.len(), ROUTES.len(), "ROUTES has no duplicates");
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
        let doc = document();
        let mut refs = 0;
        walk(&doc, &doc, &mut refs);
        assert!(refs > 0);
        assert_eq!(doc["openapi"], "3.0.3");
    }

    #[test]
    fn the_limits_match_the_validation_code() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["ExternalId"]["maxLength"],
            crate::orders::MAX_ID_CHARS
        );
        assert_eq!(schemas["Amount"]["maximum"], crate::orders::MAX_AMOUNT);
        assert_eq!(schemas["Amount"]["minimum"], 1);
    }
}
