//! `GET /openapi.json` against the running API: every documented route
//! answers as documented and every other method on its path is a 405, and
//! real answers match the documented statuses, content types and schemas.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{TestApp, order_body};

/// The methods probed on every known path; HEAD rides along with GET in axum.
const PROBED_METHODS: [&str; 6] = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

type Routes = BTreeSet<(String, String)>;

async fn fetch_document(app: &TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(media_type(&response), "application/json");
    response.json().await.expect("the document is JSON")
}

fn documented_routes(doc: &Value) -> Routes {
    let mut routes = Routes::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            const OPERATIONS: [&str; 8] = [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ];
            if OPERATIONS.contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

fn media_type(response: &reqwest::Response) -> String {
    let value = response.headers()["content-type"].to_str().unwrap();
    value.split(';').next().unwrap().trim().to_ascii_lowercase()
}

/// Follows a local `$ref` (`#/components/...`), if `node` is one.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(target) => {
            let pointer = target.strip_prefix('#').expect("a local $ref");
            resolve(doc, doc.pointer(pointer).expect("the $ref resolves"))
        }
        None => node,
    }
}

/// Checks `value` against the JSON Schema subset the document uses: type,
/// required, properties, items, enum, format (uuid, date-time), lengths and
/// bounds. `pattern` is left to the fuzzer (no regex engine here).
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    let fail = |what: String| Err(format!("{at}: {what}, got {value}"));
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return fail(format!("not one of {allowed:?}"));
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail("not an object".into());
            };
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                if !object.contains_key(key) {
                    return fail(format!("missing required `{key}`"));
                }
            }
            for (key, property) in schema["properties"].as_object().into_iter().flatten() {
                if let Some(field) = object.get(key) {
                    conforms(doc, property, field, &format!("{at}.{key}"))?;
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("not an array".into());
            };
            for (i, item) in items.iter().enumerate() {
                conforms(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Some("string") => {
            let Some(text) = value.as_str() else {
                return fail("not a string".into());
            };
            let chars = text.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|min| chars < min)
                || schema["maxLength"].as_u64().is_some_and(|max| chars > max)
            {
                return fail("length out of bounds".into());
            }
            match schema["format"].as_str() {
                Some("uuid") if uuid::Uuid::parse_str(text).is_err() => {
                    return fail("not a uuid".into());
                }
                Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                    return fail("not an RFC 3339 date-time".into());
                }
                _ => {}
            }
        }
        Some(kind @ ("integer" | "number")) => {
            let is_integer = value.is_i64() || value.is_u64();
            let Some(number) = value.as_f64().filter(|_| kind == "number" || is_integer) else {
                return fail(format!("not an {kind}"));
            };
            if schema["minimum"].as_f64().is_some_and(|min| number < min)
                || schema["maximum"].as_f64().is_some_and(|max| number > max)
            {
                return fail("out of bounds".into());
            }
        }
        Some("boolean") if !value.is_boolean() => return fail("not a boolean".into()),
        _ => {}
    }
    Ok(())
}

/// Checks an answer against the document's entry for `method path` and its
/// status: the status is documented, required headers are present, the
/// content type is the documented one and a JSON body matches its schema.
/// Returns the body (JSON, or a JSON string for text).
async fn check_answer(doc: &Value, method: &str, path: &str, response: reqwest::Response) -> Value {
    let status = response.status();
    let operation = &doc["paths"][path][method.to_ascii_lowercase()];
    let documented = operation["responses"]
        .get(status.as_str())
        .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
    let documented = resolve(doc, documented);
    for (name, header) in documented["headers"].as_object().into_iter().flatten() {
        if header["required"] == true {
            assert!(
                response.headers().contains_key(name.as_str()),
                "{method} {path} {status}: no {name} header"
            );
        }
    }
    let media = media_type(&response);
    let content = documented["content"]
        .as_object()
        .expect("documented content");
    let schema = content
        .get(&media)
        .unwrap_or_else(|| panic!("{method} {path} {status}: {media} is not documented"))["schema"]
        .clone();
    let body = if media == "application/json" {
        response.json::<Value>().await.expect("a JSON body")
    } else {
        Value::String(response.text().await.unwrap())
    };
    if let Err(mismatch) = conforms(doc, &schema, &body, "body") {
        panic!("{method} {path} {status}: {mismatch}");
    }
    body
}

#[tokio::test]
async fn every_documented_route_answers_and_other_methods_are_405() {
    let app = TestApp::spawn().await;
    let doc = fetch_document(&app).await;
    let routes = documented_routes(&doc);

    let created: Value = app.post_order(order_body()).await.json().await.unwrap();
    let order_id = created["orderId"].as_str().unwrap().to_owned();
    let paths: BTreeSet<&str> = routes.iter().map(|(_, path)| path.as_str()).collect();
    for path in paths {
        let concrete: Vec<&str> = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    order_id.as_str()
                } else {
                    segment
                }
            })
            .collect();
        let url = app.url(&concrete.join("/"));
        for method in PROBED_METHODS {
            let mut request = app
                .client
                .request(Method::from_bytes(method.as_bytes()).unwrap(), &url);
            if method == "POST" {
                request = request.json(&order_body());
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            if routes.contains(&(method.to_owned(), path.to_owned())) {
                assert!(status.is_success(), "{method} {path} answered {status}");
                check_answer(&doc, method, path, response).await;
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented"
                );
                let body: Value = response.json().await.unwrap();
                assert!(body["error"].is_string(), "a 405 is a JSON error");
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn real_answers_match_the_documented_schemas() {
    let app = TestApp::spawn().await;
    let doc = fetch_document(&app).await;

    let response = app.post_order(order_body()).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted = check_answer(&doc, "POST", "/orders", response).await;
    assert_eq!(
        location,
        format!("/orders/{}", accepted["orderId"].as_str().unwrap())
    );

    let mut bad_amount = order_body();
    bad_amount["amount"] = json!(0);
    let response = app.post_order(bad_amount).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error = check_answer(&doc, "POST", "/orders", response).await;
    assert_eq!(error, json!({"error": "amount: must be greater than zero"}));

    let response = app
        .post_order(json!({"productId": "1", "userId": "u"}))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    check_answer(&doc, "POST", "/orders", response).await;

    let response = app
        .client
        .post(app.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    check_answer(&doc, "POST", "/orders", response).await;

    let response = app.client.get(app.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let order = check_answer(&doc, "GET", "/orders/{id}", response).await;
    assert_eq!(order["orderId"], accepted["orderId"]);

    for (path, status) in [
        (
            format!("/orders/{}", uuid::Uuid::new_v4()),
            StatusCode::NOT_FOUND,
        ),
        ("/orders/not-a-uuid".to_owned(), StatusCode::BAD_REQUEST),
    ] {
        let response = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), status, "GET {path}");
        check_answer(&doc, "GET", "/orders/{id}", response).await;
    }

    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        check_answer(&doc, "GET", path, response).await;
    }
    app.stop().await;
}

#[test]
fn the_schema_check_catches_a_wrong_shape() {
    let doc: Value = serde_json::from_str(order_service::api::openapi::document()).unwrap();
    let accepted = json!({"$ref": "#/components/schemas/OrderAccepted"});
    let id = uuid::Uuid::new_v4().to_string();
    let good = json!({"orderId": id, "status": "PENDING", "message": "ok"});
    assert_eq!(conforms(&doc, &accepted, &good, "body"), Ok(()));
    for bad in [
        json!({"orderId": id, "status": "PENDING"}),
        json!({"orderId": "nope", "status": "PENDING", "message": "ok"}),
        json!({"orderId": id, "status": "DONE", "message": "ok"}),
        json!({"orderId": id, "status": "PENDING", "message": 7}),
        json!([good]),
    ] {
        assert!(
            conforms(&doc, &accepted, &bad, "body").is_err(),
            "{bad} passed"
        );
    }
    let order = json!({"$ref": "#/components/schemas/Order"});
    let mut fetched = json!({
        "orderId": id, "productId": "p", "userId": "u", "amount": 5, "status": "CONFIRMED",
        "createdAt": "2024-01-01T00:00:00Z", "updatedAt": "2024-01-01T00:00:00.5+00:00",
    });
    assert_eq!(conforms(&doc, &order, &fetched, "body"), Ok(()));
    fetched["amount"] = json!(1.5);
    assert!(conforms(&doc, &order, &fetched, "body").is_err());
}
