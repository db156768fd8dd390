//! The WAL relay's drain (`RELAY_MODE=wal`, issue 24) of a 50,000-row
//! backlog on quorum queues, beside the raw confirmed-publish loop of the
//! relay step, in the same round: the rows are written (500 to a
//! transaction) while no relay reads the slot, then a WAL relay starts and
//! the time runs until the slot has confirmed the last of them.

use std::time::{Duration, Instant};

use order_service::config::{AmqpConfig, QueueType, RelayConfig, SecretUrl};
use order_service::orders::{EVENTS, SUBSCRIPTIONS};
use outbox::wal::WalRelay;
use outbox::{Publisher, Relay, RelayMetrics};
use tokio_util::sync::CancellationToken;

use crate::relay::{ROWS, Raw, fill_rows, purge, raw_publish};
use crate::report::Report;
use crate::setup::{BenchDb, bench_amqp, cleanup_amqp, median_round};

const ROUNDS: usize = 3;
const PER_TRANSACTION: i64 = 500;

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let config = RelayConfig::default();
    let window = config.confirm_window();
    let amqp = bench_amqp("wal").with_queue_type(QueueType::Quorum);
    // Declares the exchange and the order queues, as the relay does.
    let publisher =
        Publisher::open_lanes(&amqp, &SUBSCRIPTIONS, 1, &CancellationToken::new()).await?;
    publisher.close().await;
    let raw = Raw::open(&amqp, config.batches_open()).await?;
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let (raw_rate, wal_rate, size) = one_round(&raw, &amqp, &config).await?;
        println!(
            "wal round {round}: raw confirmed publish {raw_rate:.0} msg/s, WAL relay drain {wal_rate:.0} msg/s, ratio {:.2} ({size} B)",
            wal_rate / raw_rate
        );
        rounds.push((raw_rate, wal_rate));
    }
    purge(&raw, &amqp).await?;
    raw.close().await;
    cleanup_amqp(&amqp).await?;
    let (raw_rate, wal_rate) = *median_round(&rounds, |(raw, wal)| wal / raw);
    let median = wal_rate / raw_rate;
    report.row(
        &format!(
            "WAL relay drain, 50,000-row backlog in {PER_TRANSACTION}-row transactions, quorum queues (median of {ROUNDS} rounds)"
        ),
        format!("{wal_rate:.0} msg/s"),
        format!(
            "raw lapin publish, window {window}, {} channels, same round: {raw_rate:.0} msg/s",
            config.batches_open()
        ),
        median,
        ">= 0.9",
    );
    let all: Vec<String> = rounds
        .iter()
        .map(|(raw, wal)| format!("{wal:.0}/{raw:.0} = {:.2}", wal / raw))
        .collect();
    report.note(format!(
        "WAL relay rounds on quorum queues (WAL relay/raw msg/s): {}",
        all.join(", ")
    ));
    Ok(())
}

/// One round: the raw loop, then the WAL relay's drain; their rates.
async fn one_round(
    raw: &Raw,
    amqp: &AmqpConfig,
    config: &RelayConfig,
) -> anyhow::Result<(f64, f64, usize)> {
    let db = BenchDb::new("wal", 10).await?;
    let slot = db.name.clone();
    let metrics = RelayMetrics::default();
    let published = metrics.published.clone();
    let relay = Relay::new(db.pool.clone(), EVENTS.clone(), amqp.clone())
        .with_config(config.clone())
        .with_metrics(metrics)
        .with_subscriptions(SUBSCRIPTIONS.to_vec());
    let source = order_service::db::replication_config(&SecretUrl::new(&db.url), &slot, &slot)?;
    let wal = WalRelay::new(relay, source)?;
    wal.setup().await?;
    let mut size = 0;
    for _ in 0..ROWS / PER_TRANSACTION {
        size = fill_rows(&db, PER_TRANSACTION).await?;
    }
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db.pool)
        .await?;
    purge(raw, amqp).await?;
    let raw_rate = raw_publish(raw, amqp.exchange(), ROWS, size, config.confirm_window()).await?;
    purge(raw, amqp).await?;

    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(wal.run(cancel.clone()));
    while (published.get() as i64) < ROWS {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the WAL relay published {} of {ROWS} rows within 300 s",
            published.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wal_rate = ROWS as f64 / started.elapsed().as_secs_f64();
    // Then the slot learns the position (within a status interval, 1 s).
    loop {
        let passed: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&slot)
        .bind(&end)
        .fetch_one(&db.pool)
        .await?;
        if passed {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the slot did not confirm the drain within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await?;
    db.drop_db().await?;
    Ok((raw_rate, wal_rate, size))
}
