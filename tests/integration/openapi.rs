//! `GET /openapi.json` against the running API, checked the way a client of
//! the API would check it: every documented operation answers with a
//! documented status, content type and body; any other method on a
//! documented path is a 405 whose `Allow` names exactly the documented
//! methods; paths next to the documented ones are 404s; real answers, errors
//! included, match the documented schemas; and every documented 2xx and 4xx
//! is one the API really gives.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use order_service::config::AuthConfig;

use crate::auth::{SECRET, hs256_token, spawn_with_auth};
use crate::helpers::{TestApp, order_body};

/// Every method probed on every documented path (axum has no CONNECT routes).
const PROBED_METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
];

/// The operation keys of an OpenAPI path item.
const OPERATIONS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Documented path template -> its documented methods (upper case).
type Operations = BTreeMap<String, BTreeSet<String>>;

async fn fetch_document(app: &TestApp) -> Value {
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(media_type(&response), "application/json");
    let doc: Value = response.json().await.expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    doc
}

fn documented_operations(doc: &Value) -> Operations {
    let mut operations = Operations::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let methods = operations.entry(path.clone()).or_default();
        for method in item.as_object().expect("a path item").keys() {
            if OPERATIONS.contains(&method.as_str()) {
                methods.insert(method.to_uppercase());
            }
        }
        assert!(!methods.is_empty(), "{path} documents no operation");
    }
    operations
}

/// `template` with every `{param}` segment replaced by `id`.
fn concrete(template: &str, id: &str) -> String {
    template
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                id
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether `path` is matched by one of the documented templates.
fn is_documented(operations: &Operations, path: &str) -> bool {
    operations.keys().any(|template| {
        let (template, path): (Vec<_>, Vec<_>) =
            (template.split('/').collect(), path.split('/').collect());
        template.len() == path.len()
            && template
                .iter()
                .zip(&path)
                .all(|(t, p)| t == p || (t.starts_with('{') && !p.is_empty()))
    })
}

/// What `Allow` must list for a documented path: its methods, and HEAD
/// wherever there is GET (axum answers HEAD with the GET handler).
fn allowed(methods: &BTreeSet<String>) -> BTreeSet<String> {
    let mut allowed = methods.clone();
    if allowed.contains("GET") {
        allowed.insert("HEAD".into());
    }
    allowed
}

fn allow_header(response: &reqwest::Response) -> BTreeSet<String> {
    response
        .headers()
        .get_all("allow")
        .iter()
        .flat_map(|value| value.to_str().unwrap().split(','))
        .map(|method| method.trim().to_owned())
        .filter(|method| !method.is_empty())
        .collect()
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

/// The keywords [`conforms`] knows: it checks the assertions among them
/// (`pattern` excepted: no regex engine here; the fuzzer checks it) and
/// ignores the annotations. Any other keyword fails the test, so that a
/// schema the check cannot read is never passed unread.
const KNOWN_KEYWORDS: [&str; 20] = [
    "$ref",
    "type",
    "enum",
    "const",
    "required",
    "properties",
    "items",
    "allOf",
    "anyOf",
    "oneOf",
    "format",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "pattern",
    "description",
    "title",
    "example",
    "examples",
];

fn type_matches(kind: &str, value: &Value) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        other => panic!("unknown JSON Schema type `{other}`"),
    }
}

/// Checks `value` against the JSON Schema subset of [`KNOWN_KEYWORDS`].
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    let fail = |what: String| Err(format!("{at}: {what}, got {value}"));
    let Some(keywords) = schema.as_object() else {
        panic!("{at}: a schema that is not an object: {schema}");
    };
    for keyword in keywords.keys() {
        assert!(
            KNOWN_KEYWORDS.contains(&keyword.as_str()),
            "{at}: teach `conforms` the schema keyword `{keyword}`"
        );
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return fail(format!("not one of {allowed:?}"));
    }
    if let Some(constant) = schema.get("const")
        && constant != value
    {
        return fail(format!("not {constant}"));
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        conforms(doc, part, value, at)?;
    }
    if let Some(parts) = schema["anyOf"].as_array()
        && !parts
            .iter()
            .any(|part| conforms(doc, part, value, at).is_ok())
    {
        return fail("matches none of anyOf".into());
    }
    if let Some(parts) = schema["oneOf"].as_array() {
        let matching = parts
            .iter()
            .filter(|part| conforms(doc, part, value, at).is_ok())
            .count();
        if matching != 1 {
            return fail(format!("matches {matching} of oneOf, not one"));
        }
    }
    let kinds: Vec<&str> = match &schema["type"] {
        Value::Null => Vec::new(),
        Value::String(kind) => vec![kind.as_str()],
        Value::Array(kinds) => kinds.iter().map(|k| k.as_str().unwrap()).collect(),
        other => panic!("{at}: a `type` that is neither a string nor a list: {other}"),
    };
    if !kinds.is_empty() && !kinds.iter().any(|kind| type_matches(kind, value)) {
        return fail(format!("not of type {kinds:?}"));
    }
    match value {
        Value::Object(object) => {
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
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    conforms(doc, item_schema, item, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::String(text) => {
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
        Value::Number(number) => {
            let number = number.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|min| number < min)
                || schema["maximum"].as_f64().is_some_and(|max| number > max)
            {
                return fail("out of bounds".into());
            }
        }
        _ => {}
    }
    Ok(())
}

/// The document, and the `(METHOD, path, status)` answers seen so far.
struct Contract {
    doc: Value,
    seen: BTreeSet<(String, String, String)>,
}

impl Contract {
    async fn fetch(app: &TestApp) -> Self {
        Self {
            doc: fetch_document(app).await,
            seen: BTreeSet::new(),
        }
    }

    /// Checks an answer against the document's entry for `method path` and
    /// its status: the status is documented, required headers are present,
    /// the content type is the documented one and the body matches its
    /// schema. Returns the body (JSON, or a JSON string for text).
    async fn check(&mut self, method: &str, path: &str, response: reqwest::Response) -> Value {
        let doc = &self.doc;
        let status = response.status();
        let operation = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not documented");
        let documented = operation["responses"]
            .get(status.as_str())
            .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
        self.seen
            .insert((method.into(), path.into(), status.as_str().into()));
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
            .unwrap_or_else(|| panic!("{method} {path} {status}: no documented content"));
        let schema = content
            .get(&media)
            .unwrap_or_else(|| panic!("{method} {path} {status}: {media} is not documented"))
            ["schema"]
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

    /// The documented `(METHOD, path, status)` answers not seen yet, 5xx
    /// left out (a dependency must fail for those: see the fault suite).
    fn unseen(&self) -> BTreeSet<(String, String, String)> {
        let mut unseen = BTreeSet::new();
        for (path, methods) in documented_operations(&self.doc) {
            for method in methods {
                let responses = &self.doc["paths"][&path][method.to_ascii_lowercase()]["responses"];
                for status in responses.as_object().expect("responses").keys() {
                    let answer = (method.clone(), path.clone(), status.clone());
                    if !status.starts_with('5') && !self.seen.contains(&answer) {
                        unseen.insert(answer);
                    }
                }
            }
        }
        unseen
    }

    /// The documented example of the operation's JSON request body.
    fn example_body(&self, method: &str, path: &str) -> Value {
        let body = &self.doc["paths"][path][method.to_ascii_lowercase()]["requestBody"];
        body["content"]["application/json"]["example"].clone()
    }

    fn error_schema() -> Value {
        json!({"$ref": "#/components/schemas/Error"})
    }

    /// A 404 or 405 of the router's fallbacks: a JSON error body.
    async fn check_error(&self, what: &str, response: reqwest::Response) {
        assert_eq!(media_type(&response), "application/json", "{what}");
        let body: Value = response.json().await.unwrap();
        if let Err(mismatch) = conforms(&self.doc, &Self::error_schema(), &body, "body") {
            panic!("{what}: {mismatch}");
        }
    }
}

#[tokio::test]
async fn every_documented_route_answers_as_documented_and_nothing_else_is_served() {
    let app = TestApp::spawn().await;
    let mut contract = Contract::fetch(&app).await;
    let operations = documented_operations(&contract.doc);

    let created: Value = app.post_order(order_body()).await.json().await.unwrap();
    let order_id = created["orderId"].as_str().unwrap().to_owned();
    for (template, methods) in &operations {
        let url = app.url(&concrete(template, &order_id));
        for method in PROBED_METHODS {
            let mut request = app
                .client
                .request(Method::from_bytes(method.as_bytes()).unwrap(), &url);
            if methods.contains(method) {
                let example = contract.example_body(method, template);
                if !example.is_null() {
                    request = request.json(&example);
                }
            }
            let response = request.send().await.unwrap();
            let status = response.status();
            if methods.contains(method) {
                assert!(status.is_success(), "{method} {template} answered {status}");
                contract.check(method, template, response).await;
            } else if method == "HEAD" && methods.contains("GET") {
                assert!(status.is_success(), "HEAD {template} answered {status}");
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template} is served but not documented"
                );
                assert_eq!(
                    allow_header(&response),
                    allowed(methods),
                    "Allow of {method} {template}: the router serves other methods than documented"
                );
                if method != "HEAD" {
                    contract
                        .check_error(&format!("405 of {method} {template}"), response)
                        .await;
                }
            }
        }
    }

    // Unknown paths answer 404 (the document's description says so): the
    // root, and paths one segment off a documented one.
    let mut neighbours = BTreeSet::from(["/".to_owned(), "/unknown".to_owned()]);
    for template in operations.keys() {
        let path = concrete(template, &order_id);
        neighbours.insert(format!("{path}/"));
        neighbours.insert(format!("{path}/unknown"));
        let mut prefix = path.as_str();
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            neighbours.insert(format!("{parent}/"));
            prefix = parent;
        }
    }
    neighbours.retain(|path| !is_documented(&operations, path));
    assert!(neighbours.len() > 5, "{neighbours:?}");
    for path in &neighbours {
        for method in [Method::GET, Method::POST] {
            let response = app
                .client
                .request(method.clone(), app.url(path))
                .json(&order_body())
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::NOT_FOUND,
                "{method} {path} is served but not documented"
            );
            contract
                .check_error(&format!("404 of {method} {path}"), response)
                .await;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn real_answers_match_the_documented_schemas() {
    let app = TestApp::spawn().await;
    let mut contract = Contract::fetch(&app).await;
    let post = |body: Value, key: Option<&str>| {
        let mut request = app.client.post(app.url("/orders")).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send()
    };

    let response = post(order_body(), None).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted = contract.check("POST", "/orders", response).await;
    assert_eq!(
        location,
        format!("/orders/{}", accepted["orderId"].as_str().unwrap())
    );

    let first = post(order_body(), Some("contract-key")).await.unwrap();
    let first = contract.check("POST", "/orders", first).await;
    let again = post(order_body(), Some("contract-key")).await.unwrap();
    let again = contract.check("POST", "/orders", again).await;
    assert_eq!(first["orderId"], again["orderId"]);
    let mut other = order_body();
    other["amount"] = json!(501);
    let response = post(other, Some("contract-key")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    contract.check("POST", "/orders", response).await;

    let mut bad_amount = order_body();
    bad_amount["amount"] = json!(0);
    let response = post(bad_amount, None).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error = contract.check("POST", "/orders", response).await;
    assert_eq!(error, json!({"error": "amount: must be greater than zero"}));

    for (body, key) in [
        (json!({"productId": "1", "userId": "u"}), None),
        (json!([1, 2]), None),
        (order_body(), Some("bad key with spaces")),
    ] {
        let response = post(body.clone(), key).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body} {key:?}");
        contract.check("POST", "/orders", response).await;
    }

    let response = app
        .client
        .post(app.url("/orders"))
        .header("content-type", "application/json")
        .body("{\"productId\":")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    contract.check("POST", "/orders", response).await;

    let response = app
        .client
        .post(app.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    contract.check("POST", "/orders", response).await;

    let mut huge = order_body();
    huge["productId"] = json!("x".repeat(70 * 1024));
    let response = post(huge, None).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    contract.check("POST", "/orders", response).await;

    let response = app.client.get(app.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let order = contract.check("GET", "/orders/{id}", response).await;
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
        contract.check("GET", "/orders/{id}", response).await;
    }

    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        contract.check("GET", path, response).await;
    }

    check_authenticated_answers(&mut contract).await;

    assert_eq!(
        contract.unseen(),
        BTreeSet::new(),
        "documented answers this test never got: give each a request here"
    );
    app.stop().await;
}

/// The answers only an API with authentication gives, against the same
/// document: no token or a bad one (401) and another user's userId (403).
async fn check_authenticated_answers(contract: &mut Contract) {
    let app = spawn_with_auth(AuthConfig::hs256(SECRET)).await;
    assert_eq!(fetch_document(&app).await, contract.doc, "one document");
    let token = format!("Bearer {}", hs256_token("user_1"));
    let unknown = format!("/orders/{}", uuid::Uuid::new_v4());
    let post = |authorization: Option<&str>, body: Value| {
        let mut request = app.client.post(app.url("/orders")).json(&body);
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        request.send()
    };

    let response = post(None, order_body()).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    contract.check("POST", "/orders", response).await;
    let response = post(Some(&token), order_body()).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    contract.check("POST", "/orders", response).await;
    let response = post(Some(&token), json!({"productId": "1", "amount": 5}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    contract.check("POST", "/orders", response).await;

    let get = app.client.get(app.url(&unknown));
    let response = get
        .header("Authorization", "Bearer x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    contract.check("GET", "/orders/{id}", response).await;
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

    // The combinators and 3.1's type lists, which utoipa emits for `Option`s.
    let nullable = json!({"oneOf": [{"type": "string"}, {"type": "null"}]});
    assert_eq!(conforms(&doc, &nullable, &Value::Null, "v"), Ok(()));
    assert!(conforms(&doc, &nullable, &json!(1), "v").is_err());
    let listed = json!({"type": ["integer", "null"], "minimum": 1});
    assert_eq!(conforms(&doc, &listed, &json!(3), "v"), Ok(()));
    assert!(conforms(&doc, &listed, &json!(0), "v").is_err());
    assert!(conforms(&doc, &listed, &json!("3"), "v").is_err());
    let both = json!({"allOf": [{"type": "integer"}, {"maximum": 2}]});
    assert!(conforms(&doc, &both, &json!(3), "v").is_err());
}

#[test]
#[should_panic(expected = "teach `conforms` the schema keyword `exclusiveMinimum`")]
fn the_schema_check_refuses_a_keyword_it_cannot_check() {
    let doc = json!({});
    let _ = conforms(&doc, &json!({"exclusiveMinimum": 0}), &json!(1), "v");
}
