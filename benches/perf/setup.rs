//! Databases, broker names and small measuring helpers for the benchmarks.

use anyhow::Context;
use order_service::config::{AmqpConfig, DatabaseConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::database;

pub fn admin_url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("BENCH_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh, migrated database; dropped by [`BenchDb::drop_db`], or when
/// dropped if a step failed before it (the connections it still has are
/// ended by `WITH (FORCE)`).
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl BenchDb {
    pub async fn new(tag: &str, pool_size: u32) -> anyhow::Result<Self> {
        let (name, url) = database::create(&admin_url(), &format!("osbench_{tag}")).await?;
        let mut config = DatabaseConfig::new(url.clone());
        config.pool_size = pool_size;
        let pool = order_service::db::connect(&config, &CancellationToken::new()).await?;
        Ok(Self { name, url, pool })
    }

    pub async fn drop_db(mut self) -> anyhow::Result<()> {
        self.pool.close().await;
        database::remove(&admin_url(), &std::mem::take(&mut self.name)).await?;
        Ok(())
    }

    pub async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .expect(sql)
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        if name.is_empty() {
            return;
        }
        // A runtime of its own: this may run inside the benchmark's.
        let removed =
            database::run_to_end(async move { database::remove(&admin_url(), &name).await });
        if !matches!(removed, Some(Ok(()))) {
            eprintln!("could not drop a benchmark database: {removed:?}");
        }
    }
}

/// Exchange and queues of this benchmark only.
pub fn bench_amqp(tag: &str) -> AmqpConfig {
    let mut config = AmqpConfig::new(amqp_url());
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    config = config.with_exchange(format!("bench_{tag}_{id}_order_events"));
    config = config.with_queue_prefix(format!("bench_{tag}_{id}_"));
    config
}

/// Deletes the benchmark's queues (every order consumer's) and exchange.
pub async fn cleanup_amqp(config: &AmqpConfig) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connection =
        outbox_common::amqp::connect(config, "bench cleanup", &CancellationToken::new()).await?;
    let channel = connection.create_channel().await?;
    for subscription in order_service::orders::SUBSCRIPTIONS {
        let names = outbox_common::amqp::QueueNames::new(config, subscription.consumer);
        let queues = [names.main, names.dlq]
            .into_iter()
            .chain(names.retries.into_iter().map(|(q, _)| q));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    channel
        .exchange_delete(config.exchange().into(), ExchangeDeleteOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// Runs pgbench with `script` for `seconds` at `clients`; returns its tps.
pub fn pgbench(db_url: &str, script: &str, clients: u32, seconds: u32) -> anyhow::Result<f64> {
    let path = std::env::temp_dir().join(format!("pgbench-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, script)?;
    let output = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(&path)
        .arg(db_url)
        .output()
        .context("running pgbench (apt-get install postgresql-contrib)")?;
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {stdout}"))
}

/// The round whose `ratio` is the median of the rounds' ([`percentile`]'s
/// 50th): the figures of one round, adjacent in time, robust to one
/// round's drift.
pub fn median_round<T>(rounds: &[T], ratio: impl Fn(&T) -> f64) -> &T {
    let mut ratios: Vec<f64> = rounds.iter().map(&ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let median = percentile(&ratios, 50.0);
    rounds
        .iter()
        .find(|r| ratio(r) == median)
        .expect("the median is one of the rounds")
}

/// p-th percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
