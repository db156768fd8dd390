//! Logs and traces: one `tracing` subscriber (pretty or JSON logs), an
//! OpenTelemetry layer exporting over OTLP when an endpoint is configured, and
//! the W3C TraceContext propagator that carries a trace through the outbox
//! row and the AMQP headers.

pub mod propagation;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use outbox_common::tls;
use rustls::pki_types::CertificateDer;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetryLayer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Telemetry settings; the OTLP ones are the standard OpenTelemetry variables.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// `pretty` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
    /// OTLP collector endpoint; tracing export is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: OtlpProtocol,
    /// A CA certificate (PEM) to trust for an `https://` endpoint, beside the
    /// system's roots: a collector with a private CA.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_certificate: Option<std::path::PathBuf>,
    /// Service name on every span.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "order-service")]
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes it.
#[must_use]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes spans still in the batch processor and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("failed to flush traces: {error}");
        }
    }
}

/// Builds the OTLP exporter and a batching tracer provider; `None` when no
/// endpoint is configured.
///
/// The exporter runs on its own one-thread tokio runtime. tonic and the async
/// reqwest client need a reactor, but the SDK's batch processor exports from a
/// plain thread; and [`init`] runs before the application's runtime exists
/// and flushes after it is gone.
pub fn otlp_provider(config: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let ca = read_ca(config)?;
    let runtime = ExportRuntime::start()?;
    let exporter = {
        // tonic spawns its connection task when the exporter is built.
        let _inside = runtime.handle().enter();
        match config.otlp_protocol {
            OtlpProtocol::Grpc => grpc_exporter(endpoint, &ca),
            OtlpProtocol::HttpProtobuf => http_exporter(endpoint, &ca),
        }
    }
    .context("building the OTLP span exporter")?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(OnRuntime {
                inner: exporter,
                runtime,
            })
            .with_resource(resource)
            .build(),
    ))
}

/// The CA of `OTEL_EXPORTER_OTLP_CERTIFICATE`: its certificates, and the
/// file as it is for tonic, which takes PEM.
#[derive(Default)]
struct CollectorCa {
    certs: Vec<CertificateDer<'static>>,
    pem: Vec<u8>,
}

/// Reads and parses the CA file at start, for both protocols: a file that
/// cannot be used stops the process with the setting's name.
fn read_ca(config: &TelemetryConfig) -> anyhow::Result<CollectorCa> {
    let Some(path) = config.otlp_certificate.as_deref() else {
        return Ok(CollectorCa::default());
    };
    let certs = tls::pem_certificates(path).context("OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    let pem = std::fs::read(path).context("OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    Ok(CollectorCa { certs, pem })
}

/// OTLP over gRPC (tonic). An `https://` endpoint gets TLS with the system's
/// roots and the configured CA; tonic refuses a server they do not trust.
fn grpc_exporter(
    endpoint: &str,
    ca: &CollectorCa,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint);
    if endpoint.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if !ca.pem.is_empty() {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(&ca.pem));
        }
        builder = builder.with_tls_config(tls);
    }
    Ok(builder.build()?)
}

/// OTLP over HTTP/protobuf, on a hyper client of our own: rustls (ring)
/// trusting the system's roots and the configured CA, for `https://`
/// endpoints; `http://` ones stay plain.
fn http_exporter(
    endpoint: &str,
    ca: &CollectorCa,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let tls = tls::client_config(&ca.certs).context("OTEL_EXPORTER_OTLP_CERTIFICATE")?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = opentelemetry_http::hyper::HyperClient::new(connector, HTTP_EXPORT_TIMEOUT, None);
    Ok(opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()?)
}

/// The OTLP default export timeout: a collector that does not answer costs
/// one batch, not a stuck exporter.
const HTTP_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The exporter's private runtime; shut down without blocking when dropped,
/// so dropping it inside another runtime cannot panic.
#[derive(Debug)]
struct ExportRuntime(Option<tokio::runtime::Runtime>);

impl ExportRuntime {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .context("starting the trace export runtime")?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A span exporter whose exports are polled inside the export runtime, so
/// their sockets and timers have a reactor whichever thread awaits them.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: ExportRuntime,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        Entered {
            handle: self.runtime.handle().clone(),
            future: Box::pin(self.inner.export(batch)),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _inside = self.runtime.handle().enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _inside = self.runtime.handle().enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Enters `handle` for each poll of `future`.
struct Entered<F> {
    handle: tokio::runtime::Handle,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for Entered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _inside = this.handle.enter();
        this.future.as_mut().poll(cx)
    }
}

/// The log filter used when `RUST_LOG` is unset: our spans and events at
/// `info`, the chatty drivers only when they warn.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,lapin=warn,amq_protocol=warn";

/// `RUST_LOG` if set and valid, else [`DEFAULT_FILTER`].
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

/// The log output: compact human-readable lines or one JSON object per event.
pub fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    }
}

/// Turns `tracing` spans into OpenTelemetry spans exported by `provider`
/// (`otel.name`, `otel.kind` and `otel.status_code` fields set the span's
/// name, kind and status). Tests build it around an in-memory exporter.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("order-service"))
}

/// Installs the global subscriber and propagator. Call once, from `main`.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = otlp_provider(config)?;
    Registry::default()
        .with(env_filter())
        .with(fmt_layer(config.log_format))
        .with(provider.as_ref().map(otel_layer))
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
}
