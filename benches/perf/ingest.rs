//! `POST /orders` at 32 connections (wrk) beside pgbench running the same
//! two-insert transaction on the same schema at 32 clients, same run; the same
//! POST load with authentication on (an HS256 bearer token checked on every
//! request); and with trace export on.

use anyhow::Context;
use std::process::Command;

use crate::report::Report;
use crate::service::Service;
use crate::setup::{BenchDb, pgbench};

const CONNECTIONS: u32 = 32;
const SECONDS: u32 = 10;

/// The order and its outbox row, as the API writes them.
const TWO_INSERTS: &str = r#"
\set amount random(1, 100000)
BEGIN;
INSERT INTO orders (id, product_id, user_id, amount) VALUES (gen_random_uuid(), '123', 'user_99', :amount);
INSERT INTO outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers)
  VALUES (gen_random_uuid(), 'order', '0196c0de-0000-7000-8000-000000000000', 'order.created',
  '{"transactionId":"0196c0de-0000-7000-8000-000000000001","orderId":"0196c0de-0000-7000-8000-000000000000","productId":"123","userId":"user_99","amount":500,"timestamp":"2026-11-27T16:11:37.274922Z"}',
  '{}');
END;
"#;

const WRK_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = '{"productId":"123","userId":"user_99","amount":500}'
wrk.headers["Content-Type"] = "application/json"
"#;

/// The HS256 secret of the authenticated run (32 bytes, as required).
const AUTH_SECRET: &str = "bench-secret-of-at-least-32-bytes";

pub struct WrkResult {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
}

pub fn wrk(url: &str, connections: u32, seconds: u32) -> anyhow::Result<WrkResult> {
    wrk_as(url, connections, seconds, None)
}

/// [`wrk`], each request with `Authorization: Bearer <token>` when given.
pub fn wrk_as(
    url: &str,
    connections: u32,
    seconds: u32,
    token: Option<&str>,
) -> anyhow::Result<WrkResult> {
    let mut lua = WRK_SCRIPT.to_owned();
    if let Some(token) = token {
        lua.push_str(&format!(
            "wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        ));
    }
    let name = if token.is_some() { "post-auth" } else { "post" };
    let script = std::env::temp_dir().join(format!("order-service-{name}.lua"));
    std::fs::write(&script, lua)?;
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .map(str::to_owned)
    };
    let ms = |v: Option<String>| -> f64 {
        let v = v.unwrap_or_default();
        if let Some(x) = v.strip_suffix("us") {
            x.parse::<f64>().unwrap_or(f64::NAN) / 1000.0
        } else if let Some(x) = v.strip_suffix("ms") {
            x.parse().unwrap_or(f64::NAN)
        } else if let Some(x) = v.strip_suffix('s') {
            x.parse::<f64>().unwrap_or(f64::NAN) * 1000.0
        } else {
            f64::NAN
        }
    };
    let non_2xx = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
        .unwrap_or(0);
    Ok(WrkResult {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: ms(field("50%")),
        p99_ms: ms(field("99%")),
        non_2xx,
    })
}

/// The POST load against an API that checks a bearer token on each request
/// (one token for all: the signature is verified every time all the same).
async fn with_auth(env: &[(&str, String)]) -> anyhow::Result<WrkResult> {
    let claims = serde_json::json!({"sub": "user_99", "exp": 4_102_444_800_u64});
    let key = jsonwebtoken::EncodingKey::from_secret(AUTH_SECRET.as_bytes())?;
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?;
    let mut env = env.to_vec();
    env.push(("AUTH_JWT_SECRET", AUTH_SECRET.into()));
    let service = Service::start(&["api"], &env).await?;
    let url = format!("http://{}/orders", service.addr);
    wrk_as(&url, CONNECTIONS, 2, Some(&token))?;
    let result = wrk_as(&url, CONNECTIONS, SECONDS, Some(&token))?;
    service.stop()?;
    anyhow::ensure!(
        result.non_2xx == 0,
        "{} non-2xx answers with authentication on",
        result.non_2xx
    );
    println!(
        "ingest with authentication: POST /orders {:.0}/s (p50 {:.2} ms, p99 {:.2} ms)",
        result.rps, result.p50_ms, result.p99_ms
    );
    Ok(result)
}

/// An OTLP/HTTP receiver that accepts and discards spans.
async fn otlp_sink() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let db = BenchDb::new("ingest", 10).await?;
    let env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("DATABASE_POOL_SIZE", CONNECTIONS.to_string()),
    ];
    let service = Service::start(&["api"], &env).await?;
    let url = format!("http://{}/orders", service.addr);
    // Warm up, then measure.
    wrk(&url, CONNECTIONS, 2)?;
    let cpu_before = service.cpu_seconds();
    let before = db.scalar("SELECT count(*) FROM orders").await;
    let api = wrk(&url, CONNECTIONS, SECONDS)?;
    let orders = db.scalar("SELECT count(*) FROM orders").await - before;
    let cpu = service.cpu_seconds() - cpu_before;
    let rss = service.peak_rss_mib();
    service.stop()?;
    anyhow::ensure!(api.non_2xx == 0, "{} non-2xx answers", api.non_2xx);
    // Right after the run without authentication, for the fairest ratio.
    let authenticated = with_auth(&env).await?;
    let pg = pgbench(&db.url, TWO_INSERTS, CONNECTIONS, SECONDS)?;
    println!(
        "ingest: POST /orders {:.0}/s (p50 {:.2} ms, p99 {:.2} ms), pgbench two-insert {pg:.0} tps, ratio {:.2}",
        api.rps,
        api.p50_ms,
        api.p99_ms,
        api.rps / pg
    );
    report.row(
        "Ingest, POST /orders at 32 connections (wrk)",
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            api.rps, api.p50_ms, api.p99_ms
        ),
        format!("pgbench two-insert transaction, 32 clients: {pg:.0} tps"),
        api.rps / pg,
        ">= 1.0",
    );
    report.row(
        "Ingest with authentication on (HS256 bearer token)",
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            authenticated.rps, authenticated.p50_ms, authenticated.p99_ms
        ),
        format!("same run, authentication off: {:.0} req/s", api.rps),
        authenticated.rps / api.rps,
        ">= 0.90",
    );
    report.note(format!(
        "Ingest: {orders} orders stored in {SECONDS} s; API process {:.2} CPU s per 1,000 orders, peak RSS {rss:.1} MiB.",
        cpu / orders as f64 * 1000.0
    ));

    // The same with tracing exported over OTLP/HTTP to a local sink.
    let sink = otlp_sink().await?;
    let mut traced_env = env.clone();
    traced_env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", sink));
    traced_env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()));
    let service = Service::start(&["api"], &traced_env).await?;
    let url = format!("http://{}/orders", service.addr);
    wrk(&url, CONNECTIONS, 2)?;
    let traced = wrk(&url, CONNECTIONS, SECONDS)?;
    service.stop()?;
    report.row(
        "Ingest with trace export on (OTLP/HTTP)",
        format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            traced.rps, traced.p50_ms, traced.p99_ms
        ),
        format!("same run, export off: {:.0} req/s", api.rps),
        traced.rps / api.rps,
        "(cost of tracing)",
    );
    db.drop_db().await?;
    Ok(())
}
