//! The operator's commands: `dlq list`, `dlq skip`, `dlq replay`, `outbox status`.

mod held;

use tokio_util::sync::CancellationToken;

use super::DlqCommand;
use crate::config::{AmqpConfig, DatabaseConfig};
use crate::orders;
use outbox_common::amqp::QueueNames;

/// `dlq list` and `dlq replay`: each tries the broker once, and stops on
/// `cancel` (SIGTERM or Ctrl-C).
pub(super) async fn dlq(command: DlqCommand, cancel: &CancellationToken) -> anyhow::Result<()> {
    use inbox::dlq;
    match command {
        DlqCommand::List {
            queue,
            limit,
            amqp,
            db,
        } => {
            let amqp = amqp.config();
            let queues = consumer_queues(&amqp, &queue)?;
            let letters = dlq::list_until(&amqp, &queues, limit, cancel).await?;
            anyhow::ensure!(!cancel.is_cancelled(), "dlq list stopped by a signal");
            held::print(&db, consumer_name(&queue)?, cancel).await;
            println!("{} dead letter(s) in {}", letters.len(), queues.dlq);
            for l in letters {
                let age = l
                    .published_at
                    .map(|t| format!("{}s", (chrono::Utc::now() - t).num_seconds()))
                    .unwrap_or_else(|| "?".into());
                println!(
                    "{}  {}  attempts={}  age={}  error={}",
                    l.message_id, l.event_type, l.attempts, age, l.error
                );
            }
            Ok(())
        }
        DlqCommand::Skip {
            queue,
            aggregate_type,
            aggregate_id,
            db,
        } => {
            held::skip(
                &db,
                consumer_name(&queue)?,
                &aggregate_type,
                &aggregate_id,
                cancel,
            )
            .await
        }
        DlqCommand::Replay {
            queue,
            limit,
            force,
            amqp,
            retention,
        } => {
            let amqp = amqp.config();
            let queues = consumer_queues(&amqp, &queue)?;
            let window = (!force).then(|| retention.dedup());
            let replay = dlq::replay_until(&amqp, &queues, limit, window, cancel).await?;
            println!(
                "replayed {} message(s) from {} to {}",
                replay.moved, queues.dlq, queues.main
            );
            if replay.too_old > 0 {
                eprintln!(
                    "warning: left {} message(s) older than the dedup window ({}s) in {}: their \
                     dedup rows may be pruned, so a replay could apply them twice; \
                     `--force` replays them anyway",
                    replay.too_old, retention.dedup_retention_secs, queues.dlq
                );
            }
            anyhow::ensure!(!cancel.is_cancelled(), "dlq replay stopped by a signal");
            Ok(())
        }
    }
}

/// The queues of a consumer, named `email`/`billing` or in full.
fn consumer_queues(amqp: &AmqpConfig, consumer: &str) -> anyhow::Result<QueueNames> {
    Ok(QueueNames::new(amqp, consumer_name(consumer)?))
}

/// A consumer's name, from `email`/`billing` or in full.
fn consumer_name(consumer: &str) -> anyhow::Result<&'static str> {
    Ok(match consumer {
        "email" | orders::EMAIL => orders::EMAIL,
        "billing" | orders::BILLING => orders::BILLING,
        other => anyhow::bail!("unknown consumer {other:?}: use email or billing"),
    })
}

pub(super) async fn outbox_status(
    db: DatabaseConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let pool = crate::db::connect_for_command(&db, cancel).await?;
    let mut conn = pool.acquire().await?;
    let tables = [
        ("events (outbox, to RabbitMQ)", &*crate::orders::EVENTS),
        (
            "mails (mail_outbox, to SMTP)",
            &*crate::orders::mailer::MAILS,
        ),
    ];
    for (title, table) in tables {
        let status = table.status(&mut conn).await?;
        let failures = table.recent_failures(&mut conn, 10).await?;
        println!("{title}");
        println!("  pending rows:        {}", status.pending);
        println!(
            "  oldest pending age:  {}",
            status
                .oldest_pending_age_secs
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into())
        );
        println!("  rows with errors:    {}", status.with_errors);
        println!("  given up (refused):  {}", status.given_up);
        for f in failures {
            println!(
                "    #{} {} {} attempts={} next={} error={}",
                f.id,
                f.transaction_id,
                f.event_type,
                f.attempts,
                f.next_attempt_at
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "never (given up)".into()),
                f.last_error
            );
        }
    }
    let slots = outbox::wal::slots(&pool, crate::orders::EVENTS.name()).await?;
    if !slots.is_empty() {
        println!("WAL relay slots (RELAY_MODE=wal)");
    }
    let secs = |s: Option<f64>| s.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into());
    for slot in slots {
        let reader = slot.reader_pid.map(|p| format!("pid {p}"));
        println!("  {}", slot.slot);
        println!(
            "    read by:             {}",
            reader.as_deref().unwrap_or("nobody (the WAL piles up)")
        );
        println!(
            "    lag:                 {} bytes",
            slot.lag_bytes.unwrap_or(0)
        );
        println!("    flush lag:           {}", secs(slot.flush_lag_secs));
        println!(
            "    WAL kept:            {}",
            slot.wal_status.as_deref().unwrap_or("-")
        );
        println!(
            "    last passed horizon: {} ago",
            secs(slot.passed_horizon_age_secs)
        );
    }
    Ok(())
}
