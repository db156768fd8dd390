//! Mailer drain rate of a backlog of pending `mail_outbox` rows beside a bare
//! lettre send loop with the same concurrency, in the same run, to the same
//! SMTP server: `tests/smtp/server.py` (aiosmtpd, no delay), started here on
//! a free port (needs `python3 -m pip install aiosmtpd`; `PYTHON` names
//! another interpreter).
//!
//! The mailer side is the service's own code: the
//! [`Dispatcher`] over [`MAILS`] with the [`Smtp`] sink, two waves of
//! `MAILER_CONCURRENCY` sends claimed per round and that many sends at once,
//! as `Roles::start_mailer` sets it up, round after round until a round
//! claims nothing. The bare side builds the
//! same messages (sender, recipient, subject, body, `Message-ID`) and sends
//! them with one `AsyncSmtpTransport` (lettre's default pool, the mailer's
//! timeout) at the same concurrency. The absolute figures are bounded by the
//! single-threaded Python server; the ratio is the mailer's overhead
//! (claims, marks, commits, and the wait for a round's slowest send).
//!
//! `MAIL_BENCH_N` (default 2,000) mails per side and round,
//! `MAIL_BENCH_ROUNDS` (default 3) rounds, the order alternating.

#[allow(dead_code)]
#[path = "../../tests/mail/smtp.rs"]
mod smtp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use order_service::config::MailConfig;
use order_service::metrics::Metrics;
use order_service::orders::mailer::{MAILS, Smtp};
use outbox::{Delivered, Dispatcher};

use crate::report::Report;
use crate::setup::{BenchDb, median_round};

/// Rows claimed per round, as `Roles::start_mailer` sets it: two waves.
fn batch_size(concurrency: usize) -> i64 {
    2 * concurrency.max(1) as i64
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fills `mail_outbox` with `n` mails shaped like the e-mail consumer's.
async fn fill(db: &BenchDb, n: usize) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE mail_outbox")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "INSERT INTO mail_outbox (transaction_id, aggregate_type, aggregate_id, event_type, payload, headers) \
         SELECT t, 'order', o::text, 'order.created', \
           jsonb_build_object('to', 'user_' || i || '@example.com', \
             'subject', 'Order ' || o || ' received', \
             'body', 'Hello user_' || i || ', we received your order ' || o || \
               ' for product 123 (500 minor units).'), \
           jsonb_build_object('traceparent', '00-' || md5(t::text) || '-' || left(md5(o::text), 16) || '-01') \
         FROM (SELECT i, gen_random_uuid() AS t, gen_random_uuid() AS o \
               FROM generate_series(1, $1) i) s",
    )
    .bind(i64::try_from(n)?)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE mail_outbox")
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// The bare side: `n` mails like the mailer's, `concurrency` at once.
async fn bare_lettre(port: u16, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let config = MailConfig::default();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .timeout(Some(Duration::from_millis(config.smtp_timeout_ms)))
        .build();
    let from: Mailbox = config.email_from.parse()?;
    let started = Instant::now();
    let sends = (0..n).map(|i| {
        let (transport, from) = (&transport, from.clone());
        async move {
            let order = uuid::Uuid::new_v4();
            let message = Message::builder()
                .message_id(Some(format!("<{}@order-service>", uuid::Uuid::new_v4())))
                .from(from)
                .to(format!("user_{i}@example.com").parse()?)
                .subject(format!("Order {order} received"))
                .header(ContentType::TEXT_PLAIN)
                .body(format!(
                    "Hello user_{i}, we received your order {order} for product 123 (500 minor units)."
                ))?;
            transport.send(message).await?;
            anyhow::Ok(())
        }
    });
    let results: Vec<anyhow::Result<()>> = stream::iter(sends)
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
        anyhow::bail!("bare lettre: {failed} of {n} sends failed, e.g. {error:#}");
    }
    Ok(n as f64 / elapsed)
}

/// The mailer side: the dispatcher's rounds until one claims nothing.
async fn mailer_drain(
    db: &BenchDb,
    port: u16,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let config = MailConfig::default();
    let smtp = Smtp::new(
        &config,
        &format!("smtp://127.0.0.1:{port}"),
        Arc::new(Metrics::default()),
    )?;
    let dispatcher = Dispatcher::new(db.pool.clone(), MAILS.clone(), smtp)
        .with_concurrency(concurrency)
        .with_timeout(Duration::from_millis(config.smtp_timeout_ms));
    let started = Instant::now();
    let mut total = Delivered::default();
    loop {
        let round = dispatcher.run_once().await?;
        anyhow::ensure!(
            round.temporary == 0 && round.permanent == 0,
            "the mailer failed sends: {round:?}"
        );
        if round.claimed == 0 {
            break;
        }
        total.delivered += round.delivered;
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        total.delivered == n,
        "the mailer sent {} of {n}",
        total.delivered
    );
    anyhow::ensure!(
        db.scalar("SELECT count(*) FROM mail_outbox WHERE published_at IS NULL")
            .await
            == 0,
        "mails left pending"
    );
    Ok(n as f64 / elapsed)
}

pub async fn run(report: &mut Report) -> anyhow::Result<()> {
    let n = env_usize("MAIL_BENCH_N", 2_000);
    let rounds = env_usize("MAIL_BENCH_ROUNDS", 3);
    let concurrency = MailConfig::default().mailer_concurrency;
    let dir = std::env::temp_dir().join(format!("mail_bench_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mailbox = dir.join("mailbox.jsonl");
    let port = smtp::free_port();
    let server = smtp::SmtpServer::start(port, &mailbox, &smtp::Behaviour::default());
    let db = BenchDb::new("mail", 10).await?;
    let mut results: Vec<(f64, f64)> = Vec::new();
    let outcome: anyhow::Result<()> = async {
        for round in 1..=rounds {
            fill(&db, n).await?;
            let bare_first = round % 2 == 1;
            let mut bare = 0.0;
            if bare_first {
                bare = bare_lettre(port, n, concurrency).await?;
            }
            let mailer = mailer_drain(&db, port, n, concurrency).await?;
            if !bare_first {
                bare = bare_lettre(port, n, concurrency).await?;
            }
            println!(
                "mail round {round} ({}): bare lettre {bare:.0} mails/s, mailer drain {mailer:.0} mails/s, ratio {:.2}",
                if bare_first { "bare first" } else { "mailer first" },
                mailer / bare
            );
            results.push((bare, mailer));
        }
        let arrived = smtp::read_mailbox(&mailbox).len();
        anyhow::ensure!(
            arrived == 2 * n * rounds,
            "the server accepted {arrived} mails, {} were sent",
            2 * n * rounds
        );
        Ok(())
    }
    .await;
    drop(server);
    db.drop_db().await?;
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;

    let (bare, mailer) = *median_round(&results, |(bare, mailer)| mailer / bare);
    let median = mailer / bare;
    report.row(
        &format!("Mailer drain, {n} pending mails, aiosmtpd (median of {rounds} rounds)"),
        format!("{mailer:.0} mails/s"),
        format!(
            "bare lettre loop, {concurrency} at once, same server, same round: {bare:.0} mails/s"
        ),
        median,
        ">= 0.9",
    );
    let all: Vec<String> = results
        .iter()
        .map(|(bare, mailer)| format!("{mailer:.0}/{bare:.0} = {:.2}", mailer / bare))
        .collect();
    report.note(format!(
        "Mail rounds (mailer/bare lettre mails/s, {n} mails each, {concurrency} at once, \
         {} rows a round; bounded by the single-threaded aiosmtpd server): {}",
        batch_size(concurrency),
        all.join(", ")
    ));
    Ok(())
}
