//! Benchmarks that print the project's figures beside the machine's own
//! limits, measured in the same run (absolute times drift here).
//!
//! ```text
//! cargo bench --bench perf               # everything
//! cargo bench --bench perf -- relay      # or: ingest, wal, consumer, ordering, e2e, mail
//! ```
//!
//! Needs Postgres and RabbitMQ as for the tests (BENCH_DATABASE_URL,
//! BENCH_AMQP_URL), and `pgbench` and `wrk` on the PATH. Writes a Markdown
//! table and an SVG plot to `bench-results/` (or to `BENCH_RESULTS_DIR`, so
//! a smoke run such as
//! `BENCH_RESULTS_DIR=/tmp/b E2E_SECONDS=3 E2E_RATE=100 E2E_LADDER=0 cargo bench --bench perf -- e2e`
//! leaves the recorded figures alone).

mod consumer;
mod cpu;
// Databases of the benchmark's own (the tests' helper).
#[path = "../../tests/common/database.rs"]
mod database;
mod e2e;
mod ingest;
mod mail;
mod ordering;
// Ports for the SMTP server of the mail step (the tests' fixture).
#[path = "../../tests/common/ports.rs"]
mod ports;
mod relay;
mod report;
mod service;
mod setup;
mod statements;
mod wal;

use report::Report;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let mut report = Report::new();
    if run("ingest") {
        ingest::run(&mut report).await?;
    }
    if run("relay") {
        relay::run(&mut report).await?;
    }
    if run("wal") {
        wal::run(&mut report).await?;
    }
    if run("consumer") {
        consumer::run(&mut report).await?;
    }
    if run("ordering") {
        ordering::run(&mut report).await?;
    }
    if run("e2e") {
        e2e::run(&mut report).await?;
    }
    if run("mail") {
        mail::run(&mut report).await?;
    }
    report.write()?;
    Ok(())
}
