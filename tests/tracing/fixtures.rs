//! What the tracing tests share: one global subscriber collecting every span
//! in memory, the whole system started in-process over its own database and
//! broker names, a caller with its own trace, and polling with a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use order_service::amqp::{CONSUMERS, QueueNames};
use order_service::config::{AmqpConfig, ConsumerConfig, DatabaseConfig, HttpConfig, RelayConfig};
use order_service::startup::{ConsumerKind, Roles};
use order_service::telemetry;
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry};
use uuid::Uuid;

struct Collector {
    exporter: InMemorySpanExporter,
    /// Kept alive so the subscriber's tracer keeps exporting.
    _provider: SdkTracerProvider,
}

/// Every span ended in this test binary, from any test. Installs, once, the
/// production filter and OpenTelemetry layer around an in-memory exporter
/// (no log output, so the tests stay silent) and the W3C propagator.
pub fn finished_spans() -> Vec<SpanData> {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    let collector = COLLECTOR.get_or_init(|| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        Registry::default()
            .with(EnvFilter::new(telemetry::DEFAULT_FILTER))
            .with(telemetry::otel_layer(&provider))
            .try_init()
            .expect("installing the span collector");
        Collector {
            exporter,
            _provider: provider,
        }
    });
    collector
        .exporter
        .get_finished_spans()
        .expect("reading spans")
}

/// An upstream caller: the span that sends us `traceparent`.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

impl Caller {
    /// A fresh, sampled trace no other test shares.
    pub fn random() -> Self {
        let bytes = Uuid::new_v4().into_bytes();
        let span = Uuid::new_v4().into_bytes();
        Self {
            trace_id: TraceId::from_bytes(bytes),
            span_id: SpanId::from_bytes(span[..8].try_into().unwrap()),
        }
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

/// The API, the relay and the chosen consumers in this process, over a fresh
/// database and this test's own exchange and queues.
pub struct System {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    roles: Roles,
    db_name: String,
}

impl System {
    pub async fn start(consumers: &[ConsumerKind], config: &ConsumerConfig) -> Self {
        finished_spans(); // the subscriber must be in place before any span opens
        let db_name = format!("ostest_{}", Uuid::new_v4().simple());
        admin()
            .await
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .await
            .expect("creating the test database");
        let admin_url = admin_url();
        let base = admin_url.rsplit_once('/').expect("a URL with a database").0;
        let db = DatabaseConfig::new(format!("{base}/{db_name}"));
        let pool = order_service::db::connect(&db, &CancellationToken::new())
            .await
            .expect("connecting to the test database");

        let amqp = test_amqp();
        let roles = Roles::new(pool.clone(), CancellationToken::new());
        let addr = roles
            .start_api(&HttpConfig::default(), None)
            .await
            .expect("starting the API");
        roles.start_relay(&amqp, &RelayConfig::default(), false);
        for kind in consumers {
            roles.start_consumer(*kind, &amqp, config);
        }
        Self {
            addr,
            pool,
            amqp,
            roles,
            db_name,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The consumer's main queue, as named in its spans.
    pub fn queue(&self, consumer: &str) -> String {
        QueueNames::new(&self.amqp, consumer).main
    }

    /// Stops every role, then deletes the database, queues and exchange.
    pub async fn stop(self) {
        self.roles.cancel.cancel();
        self.roles
            .wait(Duration::from_secs(15))
            .await
            .expect("roles stop in time");
        self.pool.close().await;
        let _ = admin()
            .await
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.db_name
            )))
            .await;
        delete_broker_objects(&self.amqp).await;
    }
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn admin() -> PgConnection {
    PgConnection::connect(&admin_url())
        .await
        .expect("connecting to Postgres")
}

/// This test's own exchange and queue names, with short retry delays.
fn test_amqp() -> AmqpConfig {
    let url = std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let id = Uuid::new_v4().simple().to_string();
    let mut config = AmqpConfig::new(url);
    config.exchange = format!("t{}_order_events", &id[..12]);
    config.queue_prefix = format!("t{}_", &id[..12]);
    config.retry_delays_ms = vec![50, 100];
    config
}

async fn delete_broker_objects(config: &AmqpConfig) {
    let connection = Connection::connect(config.amqp_url.expose(), ConnectionProperties::default())
        .await
        .expect("connecting to RabbitMQ");
    let channel = connection.create_channel().await.expect("a channel");
    for consumer in CONSUMERS {
        let names = QueueNames::new(config, consumer);
        let retries = names.retries.iter().map(|(queue, _)| queue.clone());
        for queue in [names.main.clone(), names.dlq.clone()]
            .into_iter()
            .chain(retries)
        {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let _ = channel
        .exchange_delete(
            config.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "test done".into()).await;
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
