//! What the tracing tests share: one global subscriber collecting every span
//! in memory, the whole system started in-process over its own database and
//! broker names, a caller with its own trace, and polling with a deadline.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use order_service::config::{
    AmqpConfig, ConsumerConfig, DatabaseConfig, HttpConfig, MailConfig, RelayConfig, SecretUrl,
    WalSource,
};
use order_service::startup::{ConsumerKind, Roles};
use order_service::telemetry;
use outbox_common::amqp::QueueNames;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry};
use uuid::Uuid;

use crate::common;
pub use crate::common::{eventually, test_amqp};

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
/// database and this test's own exchange and queues. The database, queues
/// and exchange are deleted when it is dropped, also when a test fails
/// before [`System::stop`].
pub struct System {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub amqp: AmqpConfig,
    roles: Roles,
    // Dropped after `roles` and `pool`, in this order: the queues, then the
    // database (FORCE cuts any connection a failed test left open).
    _queues: common::DeleteQueues,
    _database: common::DropDatabase,
}

/// Which relay publishes the outbox.
#[derive(Debug, Clone, Copy)]
pub enum RelayMode {
    /// The polling relay (claim and mark).
    Poll,
    /// The WAL relay, on a logical slot of the test's own.
    Wal,
}

impl System {
    pub async fn start(consumers: &[ConsumerKind], mail: &MailConfig) -> Self {
        Self::start_with(consumers, mail, RelayMode::Poll).await
    }

    pub async fn start_with(
        consumers: &[ConsumerKind],
        mail: &MailConfig,
        relay: RelayMode,
    ) -> Self {
        finished_spans(); // the subscriber must be in place before any span opens
        let (db_name, url) = common::create_database().await;
        let database = common::DropDatabase(db_name);
        let db = DatabaseConfig::new(url.clone());
        let pool = order_service::db::connect(&db, &CancellationToken::new())
            .await
            .expect("connecting to the test database");

        let amqp = test_amqp();
        // The relay declares every order consumer's queues, whichever run.
        let queues = common::DeleteQueues::orders(&amqp);
        let roles = Roles::new(pool.clone(), CancellationToken::new());
        let addr = roles
            .start_api(&HttpConfig::default(), None)
            .await
            .expect("starting the API");
        match relay {
            RelayMode::Poll => roles.start_relay(&amqp, &RelayConfig::default(), false),
            RelayMode::Wal => {
                // The slot goes with the database (see `common::DropDatabase`).
                let slot = format!("t{}", &Uuid::new_v4().simple().to_string()[..16]);
                let source = WalSource {
                    replication: order_service::db::replication_config(
                        &SecretUrl::new(url.clone()),
                        &slot,
                        &slot,
                    )
                    .expect("a replication config"),
                    horizon_interval: Duration::from_secs(60),
                };
                roles
                    .start_wal_relay(&amqp, &RelayConfig::default(), source)
                    .await
                    .expect("starting the WAL relay");
            }
        }
        // The mailer stays off (no SMTP_URL): the spans end at the consumers.
        for kind in consumers {
            roles
                .start_consumer(*kind, &amqp, &ConsumerConfig::default(), mail)
                .expect("starting a consumer");
        }
        Self {
            addr,
            pool,
            amqp,
            roles,
            _queues: queues,
            _database: database,
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
        let Self {
            pool,
            roles,
            _queues: queues,
            _database: database,
            ..
        } = self;
        roles.cancel.cancel();
        roles
            .wait(Duration::from_secs(15))
            .await
            .expect("roles stop in time");
        pool.close().await;
        drop(queues);
        drop(database);
    }
}
