//! Each test's own database and broker names, removed by a drop guard even
//! when the test fails, and polling with a deadline instead of sleeping.

use std::future::Future;
use std::time::Duration;

use inbox::Handler;
use loyalty_example::scratch::{self, ScratchDatabase};
use loyalty_example::{Running, Service, schema};
use outbox_common::amqp::AmqpConfig;
use uuid::Uuid;

/// How long a test waits for an effect.
pub const WAIT: Duration = Duration::from_secs(20);

/// The server's admin database; each test creates its own beside it.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The broker.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The service over a database of the test's own (its tables created) and
/// an exchange and queues of its own, with short retry delays.
pub struct TestService {
    pub service: Service,
    _cleanup: Cleanup,
}

impl TestService {
    pub async fn new() -> Self {
        let db = ScratchDatabase::create(&admin_url(), "loyalty_test")
            .await
            .expect("creating the test database");
        let delays = vec![Duration::from_millis(50), Duration::from_millis(100)];
        let amqp = scratch::amqp(&amqp_url(), "loyalty_test", delays);
        let cleanup = Cleanup {
            db: db.clone(),
            amqp: amqp.clone(),
        };
        let pool = db.connect().await.expect("connecting to the test database");
        schema::create_tables(&pool)
            .await
            .expect("creating the tables");
        Self {
            service: Service::new(pool, amqp),
            _cleanup: cleanup,
        }
    }

    /// The number `sql` counts.
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.service.pool())
            .await
            .expect(sql)
    }

    /// `user`'s balance, if credited at all.
    pub async fn balance(&self, user: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT points FROM balances WHERE user_id = $1")
            .bind(user)
            .fetch_optional(self.service.pool())
            .await
            .unwrap()
    }

    /// The balances consumer's dedup rows.
    pub async fn dedup_rows(&self) -> Vec<Uuid> {
        sqlx::query_scalar(
            "SELECT transaction_id FROM processed_messages WHERE consumer = 'loyalty_balances' \
             ORDER BY transaction_id",
        )
        .fetch_all(self.service.pool())
        .await
        .unwrap()
    }

    /// Waits until every outbox row is published.
    pub async fn all_published(&self) {
        eventually("every outbox row to be published", || async {
            let unpublished = self
                .count("SELECT count(*) FROM loyalty_outbox WHERE published_at IS NULL")
                .await;
            (unpublished == 0).then_some(())
        })
        .await;
    }

    /// Stops `running`, waiting for the work in hand, and removes the
    /// test's database and broker names.
    pub async fn stop<H: Handler>(self, running: Running<H>) {
        running.stop().await;
        self.service.pool().close().await;
    }
}

/// Drops the test's database and deletes its exchange and queues.
struct Cleanup {
    db: ScratchDatabase,
    amqp: AmqpConfig,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (db, amqp) = (self.db.clone(), self.amqp.clone());
        // On a thread and a runtime of its own: it works while a test
        // unwinds from a failed assertion, inside or outside a runtime.
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup")
                .block_on(async move {
                    let _ = scratch::delete_topology(&amqp).await;
                    let _ = db.remove().await;
                })
        });
        let _ = done.join();
    }
}

/// Polls `check` every 20 ms until it gives `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
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
            started.elapsed() < WAIT,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
