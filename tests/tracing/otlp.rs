//! The OTLP exporters that `otlp_provider` builds really send spans, over
//! HTTP and over gRPC, even when built outside any tokio runtime (as `main`
//! does) and flushed from a plain thread; and over TLS (`https://`) to a
//! collector whose certificate a CA of the test's own signed. Fake collectors
//! record the bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::post;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use order_service::telemetry::{LogFormat, OtlpProtocol, TelemetryConfig, otlp_provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::certs::TestCa;
use crate::fixtures::eventually;

/// One HTTP export request as the collector saw it.
#[derive(Debug, Clone)]
struct Received {
    content_type: String,
    body: Bytes,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP collector on 127.0.0.1:0 accepting every trace export.
async fn fake_http_collector(cancel: CancellationToken) -> (SocketAddr, Inbox) {
    async fn record(State(inbox): State<Inbox>, headers: HeaderMap, body: Bytes) {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        inbox.lock().unwrap().push(Received { content_type, body });
    }
    let inbox = Inbox::default();
    let app = Router::new()
        .route("/v1/traces", post(record))
        .with_state(inbox.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
    });
    (addr, inbox)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Like `main`: builds the provider on a thread with no tokio runtime, ends
/// one span named `span_name`, then flushes and shuts down there.
async fn export_one_span(config: TelemetryConfig, span_name: String) -> OTelSdkResult {
    let plain_thread = std::thread::spawn(move || {
        let provider = otlp_provider(&config)
            .expect("building the exporter")
            .expect("an endpoint is set");
        provider.tracer("tracing-test").start(span_name).end();
        let flushed = provider.force_flush();
        let _ = provider.shutdown();
        flushed
    });
    tokio::task::spawn_blocking(move || plain_thread.join().expect("the export thread panicked"))
        .await
        .unwrap()
}

fn config(endpoint: String, otlp_protocol: OtlpProtocol) -> TelemetryConfig {
    TelemetryConfig {
        log_format: LogFormat::Pretty,
        otlp_endpoint: Some(endpoint),
        otlp_protocol,
        otlp_certificate: None,
        service_name: "tracing-test".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_otlp_exporter_sends_spans_over_http_protobuf() {
    let cancel = CancellationToken::new();
    let (addr, inbox) = fake_http_collector(cancel.clone()).await;
    let span_name = format!("probe-{}", uuid::Uuid::new_v4().simple());

    let flushed = export_one_span(
        config(format!("http://{addr}"), OtlpProtocol::HttpProtobuf),
        span_name.clone(),
    )
    .await;

    assert_exported_over_http(flushed, &inbox, &span_name).await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_otlp_exporter_sends_spans_over_https_to_a_collector_of_a_private_ca() {
    let cancel = CancellationToken::new();
    let (plain, inbox) = fake_http_collector(cancel.clone()).await;
    let ca = TestCa::new("otlphttp");
    let tls = tls_front(&ca, plain, b"http/1.1", cancel.clone()).await;
    let span_name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let mut settings = config(
        format!("https://localhost:{}", tls.port()),
        OtlpProtocol::HttpProtobuf,
    );
    settings.otlp_certificate = Some(ca.cert_file());

    let flushed = export_one_span(settings, span_name.clone()).await;

    assert_exported_over_http(flushed, &inbox, &span_name).await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_collector_whose_certificate_is_not_trusted_gets_no_span() {
    let cancel = CancellationToken::new();
    let (plain, inbox) = fake_http_collector(cancel.clone()).await;
    let ca = TestCa::new("otlpuntrusted");
    let tls = tls_front(&ca, plain, b"http/1.1", cancel.clone()).await;
    let span_name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    // No OTEL_EXPORTER_OTLP_CERTIFICATE: the system's roots do not know the CA.
    let settings = config(
        format!("https://localhost:{}", tls.port()),
        OtlpProtocol::HttpProtobuf,
    );

    let flushed = export_one_span(settings, span_name).await;

    assert!(
        flushed.is_err(),
        "an untrusted collector must fail the export"
    );
    assert!(inbox.lock().unwrap().is_empty(), "no span reached it");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_otlp_exporter_sends_spans_over_grpc_with_tls() {
    let cancel = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = listener.local_addr().unwrap();
    let span_name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let collector = tokio::spawn(fake_grpc_export(listener, span_name.clone()));
    let ca = TestCa::new("otlpgrpc");
    let tls = tls_front(&ca, plain, b"h2", cancel.clone()).await;
    let mut settings = config(
        format!("https://localhost:{}", tls.port()),
        OtlpProtocol::Grpc,
    );
    settings.otlp_certificate = Some(ca.cert_file());

    let flushed = export_one_span(settings, span_name).await;

    let received = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the collector got the export in time")
        .unwrap();
    assert!(flushed.is_ok(), "force_flush failed: {flushed:?}");
    assert!(contains(&received, "tracing-test"), "service name exported");
    cancel.cancel();
}

#[test]
fn an_unreadable_otlp_certificate_file_is_refused_naming_the_setting() {
    let mut settings = config("https://localhost:4317".into(), OtlpProtocol::Grpc);
    settings.otlp_certificate = Some("/nonexistent/otlp-ca.pem".into());

    let error = otlp_provider(&settings).expect_err("an unreadable CA file");

    let line = format!("{error:#}");
    assert!(line.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{line}");
}

/// Checks that one export request carried the span, over HTTP/protobuf.
async fn assert_exported_over_http(flushed: OTelSdkResult, inbox: &Inbox, span_name: &str) {
    assert!(flushed.is_ok(), "force_flush failed: {flushed:?}");
    let request = eventually("a trace export", Duration::from_secs(10), || {
        let got = inbox.lock().unwrap().first().cloned();
        async move { got }
    })
    .await;
    assert_eq!(request.content_type, "application/x-protobuf");
    assert!(contains(&request.body, span_name), "span name exported");
    assert!(
        contains(&request.body, "tracing-test"),
        "service name exported"
    );
}

/// A TLS listener on 127.0.0.1:0 with a server certificate of `ca`, which
/// forwards each connection's plaintext to `backend`: the collectors above,
/// served over TLS (ALPN `alpn`: `h2` for gRPC).
async fn tls_front(
    ca: &TestCa,
    backend: SocketAddr,
    alpn: &[u8],
    cancel: CancellationToken,
) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    outbox_common::tls::install_provider();
    let issued = ca.server("collector");
    let chain = CertificateDer::pem_file_iter(&issued.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&issued.key).unwrap();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server.alpn_protocols = vec![alpn.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                _ = cancel.cancelled() => return,
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A handshake the client aborts (an untrusted certificate)
                // simply ends here.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let mut upstream = TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_otlp_exporter_sends_spans_over_grpc() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let span_name = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let collector = tokio::spawn(fake_grpc_export(listener, span_name.clone()));

    let flushed = export_one_span(
        config(format!("http://{addr}"), OtlpProtocol::Grpc),
        span_name,
    )
    .await;

    let received = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .expect("the collector got the export in time")
        .unwrap();
    assert!(flushed.is_ok(), "force_flush failed: {flushed:?}");
    assert!(contains(&received, "tracing-test"), "service name exported");
}

/// Serves one gRPC `Export` call by hand (HTTP/2 frames, no gRPC library):
/// reads until `span_name` has arrived, answers OK and returns the bytes.
async fn fake_grpc_export(listener: TcpListener, span_name: String) -> Vec<u8> {
    let (mut stream, _) = listener.accept().await.unwrap();
    // Server preface: an empty SETTINGS frame.
    stream.write_all(&frame(0x4, 0x0, 0, &[])).await.unwrap();
    let received = read_until(&mut stream, &span_name).await;
    let mut answer = frame(0x4, 0x1, 0, &[]); // SETTINGS ack
    // HEADERS on stream 1: :status 200 (static index 8), content-type application/grpc.
    let mut headers = vec![0x88, 0x5f, 16];
    headers.extend_from_slice(b"application/grpc");
    answer.extend(frame(0x1, 0x4, 1, &headers));
    // DATA: one empty ExportTraceServiceResponse (uncompressed, length 0).
    answer.extend(frame(0x0, 0x0, 1, &[0, 0, 0, 0, 0]));
    // Trailers, ending the stream: grpc-status 0.
    let mut trailers = vec![0x00, 11];
    trailers.extend_from_slice(b"grpc-status");
    trailers.extend_from_slice(&[1, b'0']);
    answer.extend(frame(0x1, 0x5, 1, &trailers));
    stream.write_all(&answer).await.unwrap();
    // Keep the connection open until the client hangs up after shutdown.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    received
}

async fn read_until(stream: &mut TcpStream, needle: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !contains(&received, needle) {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the exporter hung up before sending the span");
        received.extend_from_slice(&chunk[..n]);
    }
    received
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}
