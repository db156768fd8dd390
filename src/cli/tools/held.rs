//! `dlq list`'s held orders, and `dlq skip`: the orders whose later events
//! the e-mail consumer holds back until an earlier one is applied.

use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

/// Prints the consumer's held aggregates; a Postgres it cannot read is a
/// note, not a failure: the dead letters above were listed.
pub(super) async fn print(db: &DatabaseConfig, consumer: &str, cancel: &CancellationToken) {
    let held = async {
        let pool = crate::db::connect_for_command(db, cancel).await?;
        let held = inbox::waiting::list(&pool, consumer, 100).await;
        pool.close().await;
        anyhow::Ok(held?)
    };
    match held.await {
        Ok(held) if held.is_empty() => println!("no aggregate held back by {consumer}"),
        Ok(held) => {
            println!("{} aggregate(s) held back by {consumer}:", held.len());
            for h in held {
                let age = (chrono::Utc::now() - h.oldest_held_at).num_seconds();
                println!(
                    "{} {}  held={}  waiting_for={}  last_applied={}  oldest={age}s",
                    h.aggregate_type, h.aggregate_id, h.events, h.waiting_for, h.last_applied
                );
            }
        }
        Err(error) => println!("held aggregates not read: {error:#}"),
    }
}

/// `dlq skip`: lets the aggregate go on without the event it waits for.
pub(super) async fn skip(
    db: &DatabaseConfig,
    consumer: &str,
    aggregate_type: &str,
    aggregate_id: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let pool = crate::db::connect_for_command(db, cancel).await?;
    let skipped = inbox::waiting::skip(&pool, consumer, aggregate_type, aggregate_id).await?;
    pool.close().await;
    match skipped {
        Some(place) => {
            println!(
                "{aggregate_type} {aggregate_id}: skipped to place {place}; {consumer} releases its held events"
            );
            Ok(())
        }
        None => {
            anyhow::bail!("{aggregate_type} {aggregate_id}: {consumer} holds nothing back for it")
        }
    }
}
