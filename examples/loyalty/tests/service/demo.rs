//! The demo CI runs, run whole.

use std::time::Duration;

use loyalty_example::demo::{self, DemoConfig};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::fixture::{admin_url, amqp_url};

#[tokio::test]
async fn the_demo_ends_with_the_balances_one_duplicate_and_one_dead_letter_and_leaves_nothing() {
    let config = DemoConfig {
        database_url: admin_url(),
        amqp_url: amqp_url(),
        timeout: Duration::from_secs(20),
    };

    let summary = demo::run(&config, &CancellationToken::new()).await.unwrap();

    let balances = [("alice".to_owned(), 15), ("bob".to_owned(), 25)];
    assert_eq!(summary.balances, balances);
    assert_eq!((summary.processed, summary.duplicates), (3, 1));
    assert_eq!(summary.dead_letters.len(), 1);
    assert!(summary.dead_letters[0].error.contains("cannot debit"));
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&summary.database)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "the demo drops its database");
}
