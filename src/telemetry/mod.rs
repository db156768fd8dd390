//! Logs and traces: one `tracing` subscriber (pretty or JSON logs), an
//! OpenTelemetry layer exporting over OTLP when an endpoint is configured, and
//! the W3C TraceContext propagator that carries a trace through the outbox
//! row and the AMQP headers.

pub mod propagation;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
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

/// Builds the OTLP exporter and a batching tracer provider.
pub fn otlp_provider(config: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = match config.otlp_protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build(),
    }
    .context("building the OTLP span exporter")?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Installs the global subscriber and propagator. Call once, from `main`.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = otlp_provider(config)?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn,amq_protocol=warn"));
    let fmt_layer = match config.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer().compact().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("order-service"))
            .boxed()
    });
    Registry::default()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard { provider })
}
