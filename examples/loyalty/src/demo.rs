//! `loyalty-example demo`: the service end to end against a real Postgres
//! and RabbitMQ, in a database and under broker names of its own, removed
//! at the end. Awards points (one of them delivered twice, one of them
//! refused), waits, polling against a deadline, until the balances are
//! right and the refused award is in the dead-letter queue, and returns
//! what it saw; an error says what it waited for and what it last saw.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail};
use inbox::dlq::{self, DeadLetter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::scratch::{self, ScratchDatabase};
use crate::{Balances, OUTBOX, Running, Service, schema};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// The balances the demo's awards end in (the refused one credits nothing).
const EXPECTED: &[(&str, i64)] = &[("alice", 15), ("bob", 25)];

/// Where the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// A Postgres URL whose user may create databases.
    pub database_url: String,
    /// The RabbitMQ URL.
    pub amqp_url: String,
    /// How long the demo waits for each step before it gives up.
    pub timeout: Duration,
}

/// What the demo saw at the end.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The database the demo made (and dropped).
    pub database: String,
    /// The balances, by user.
    pub balances: Vec<(String, i64)>,
    /// Awards credited.
    pub processed: u64,
    /// Deliveries recognised as seen before, and acked without effect.
    pub duplicates: u64,
    /// Trips through a delay queue.
    pub retried: u64,
    /// What the dead-letter queue holds.
    pub dead_letters: Vec<DeadLetter>,
    /// From the first award to the last check.
    pub elapsed: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "loyalty demo: ok in {:.1?}", self.elapsed)?;
        for (user, points) in &self.balances {
            writeln!(f, "  balance {user}: {points}")?;
        }
        writeln!(
            f,
            "  credited {}, duplicates acked without effect {}, retries {}",
            self.processed, self.duplicates, self.retried
        )?;
        for letter in &self.dead_letters {
            writeln!(
                f,
                "  dead letter {} after {} attempts: {}",
                letter.message_id, letter.attempts, letter.error
            )?;
        }
        Ok(())
    }
}

/// Runs the demo; removes its database and broker names whatever happens.
pub async fn run(config: &DemoConfig, cancel: &CancellationToken) -> anyhow::Result<Summary> {
    let db = ScratchDatabase::create(&config.database_url, "loyalty_demo").await?;
    // Short retry delays, so the refused award reaches the DLQ in a second.
    let delays = vec![Duration::from_millis(200), Duration::from_millis(400)];
    let amqp = scratch::amqp(&config.amqp_url, "loyalty_demo", delays);
    tracing::info!(
        database = db.name(),
        exchange = amqp.exchange(),
        "demo starting"
    );
    let result = async {
        let pool = db.connect().await?;
        let played =
            set_up_and_play(Service::new(pool.clone(), amqp.clone()), config, cancel).await;
        pool.close().await;
        played
    }
    .await;
    let queues = scratch::delete_topology(&amqp).await;
    let database = db.remove().await;
    let summary = result?;
    queues.context("deleting the demo's queues")?;
    database.context("dropping the demo's database")?;
    Ok(summary)
}

async fn set_up_and_play(
    service: Service,
    config: &DemoConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Summary> {
    schema::create_tables(service.pool())
        .await
        .context("creating the tables")?;
    // A clear error now, rather than the relay's reconnect loop.
    let check = outbox_common::amqp::connect_once(service.amqp(), "demo check", cancel)
        .await
        .context("connecting to RabbitMQ")?;
    let _ = check.close(200, "checked".into()).await;
    let running = service.start(Balances);
    let played = play(&service, &running, config.timeout, cancel).await;
    running.stop().await;
    played
}

/// The scenario, on a running service.
async fn play(
    service: &Service,
    running: &Running<Balances>,
    timeout: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let first = service.award("alice", 10).await?;
    service.award("bob", 25).await?;
    service.award("alice", 5).await?;
    let refused = service.award("carol", -40).await?;
    let wait = Wait {
        timeout,
        cancel,
        running,
    };

    wait.until("alice's first award to be published", || {
        published(service, first.award_id)
    })
    .await?;
    // As a relay would after a crash between the broker's confirm and its
    // mark: the row is due again and published again, same message id.
    republish(service, first.award_id).await?;
    wait.until(
        "the balances, one duplicate acked and every row published",
        || async {
            let balances = balances(service).await?;
            let duplicates = running.metrics().duplicates.get();
            let mut conn = service.pool().acquire().await?;
            let pending = OUTBOX.status(&mut conn).await?.pending;
            let expected: Vec<_> = EXPECTED.iter().map(|(u, p)| (u.to_string(), *p)).collect();
            Ok(if balances == expected && duplicates == 1 && pending == 0 {
                Ok(balances)
            } else {
                Err(format!(
                    "balances {balances:?}, duplicates {duplicates}, rows to publish {pending}"
                ))
            })
        },
    )
    .await?;
    let queues = service.queues();
    let dead_letters = wait
        .until("the refused award in the dead-letter queue", || async {
            let letters = dlq::list_until(service.amqp(), &queues, 10, cancel)
                .await
                .context("listing the dead letters")?;
            let id = refused.award_id.to_string();
            Ok(match letters.iter().any(|l| l.message_id == id) {
                true => Ok(letters),
                false => Err(format!("{} dead letters, not {id}", letters.len())),
            })
        })
        .await?;
    let metrics = running.metrics();
    Ok(Summary {
        database: String::new(),
        balances: balances(service).await?,
        processed: metrics.processed.get(),
        duplicates: metrics.duplicates.get(),
        retried: metrics.retried.get(),
        dead_letters,
        elapsed: started.elapsed(),
    })
}

/// Polling against a deadline, stopped by a signal or by the service.
struct Wait<'a> {
    timeout: Duration,
    cancel: &'a CancellationToken,
    running: &'a Running<Balances>,
}

impl Wait<'_> {
    /// Polls `check` until it gives `Ok(Ok(value))`; `Ok(Err(seen))` says
    /// what it saw instead, for the error after the deadline.
    async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Result<T, String>>>,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            let seen = match check().await? {
                Ok(value) => return Ok(value),
                Err(seen) => seen,
            };
            if self.cancel.is_cancelled() {
                bail!("stopped while waiting for {what} (last seen: {seen})");
            }
            if self.running.is_stopped() {
                bail!("the service stopped while waiting for {what} (last seen: {seen})");
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:?} waiting for {what} (last seen: {seen})",
                    self.timeout
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether the outbox row of `award` is marked published.
async fn published(service: &Service, award: Uuid) -> anyhow::Result<Result<(), String>> {
    let published: Option<bool> = sqlx::query_scalar(
        "SELECT published_at IS NOT NULL FROM loyalty_outbox WHERE transaction_id = $1",
    )
    .bind(award)
    .fetch_optional(service.pool())
    .await?;
    Ok(match published {
        Some(true) => Ok(()),
        Some(false) => Err("not yet published".into()),
        None => Err("no outbox row".into()),
    })
}

/// Makes the published outbox row of `award` due again, and wakes the relay.
pub async fn republish(service: &Service, award: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE loyalty_outbox SET published_at = NULL, next_attempt_at = now() \
         WHERE transaction_id = $1",
    )
    .bind(award)
    .execute(service.pool())
    .await?;
    service.wake_relay();
    Ok(())
}

/// Every balance, by user.
pub async fn balances(service: &Service) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT user_id, points FROM balances ORDER BY user_id")
        .fetch_all(service.pool())
        .await
}
