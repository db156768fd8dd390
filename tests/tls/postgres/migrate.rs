//! `migrate` stops on SIGTERM while it waits for another process's
//! migrations (sqlx's advisory lock), and leaves nothing half applied.

use std::process::Command;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};

use super::PASSWORD;
use super::process::{Process, one_error_line};
use crate::common::{self, eventually, roles};

#[tokio::test]
async fn migrate_waiting_on_another_migration_stops_on_sigterm_and_applies_nothing() {
    let (name, url) = common::create_database().await;
    let _database = common::DropDatabase(name.clone());
    let url = url.replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    // Another process migrating: it holds sqlx's lock of this database.
    let mut other = PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(sqlx_migration_lock(&name))
        .execute(&mut other)
        .await
        .unwrap();

    let migrate = Process::start(&["migrate"], &url, roles::free_addr(), &common::test_amqp());
    let admin = PgPool::connect(&common::admin_url()).await.unwrap();
    eventually(
        "migrate to wait for the lock",
        Duration::from_secs(30),
        || async { (lock_waiters(&admin, &name).await == 1).then_some(()) },
    )
    .await;
    let pid = migrate.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());

    let (status, output) = migrate.exit_within(Duration::from_secs(15)).await;
    assert!(!status.success(), "{output}");
    let line = one_error_line(&output, "migrate on SIGTERM");
    assert_eq!(line, "error: stopped while applying migrations");
    assert!(!output.contains(PASSWORD), "{output}");
    // Its session is gone from the server too, though the lock is still
    // held: it will not take the lock later and migrate without its client.
    eventually(
        "the server to drop the session of the stopped migrate",
        Duration::from_secs(15),
        || async { (lock_waiters(&admin, &name).await == 0).then_some(()) },
    )
    .await;

    other.close().await.unwrap();
    let mut check = PgConnection::connect(&url).await.unwrap();
    for table in ["_sqlx_migrations", "orders"] {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&mut check)
            .await
            .unwrap();
        assert_eq!(found, None, "no migration was applied");
    }
}

/// The sessions of `database` waiting for an advisory lock.
async fn lock_waiters(admin: &PgPool, database: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND a.datname = $1",
    )
    .bind(database)
    .fetch_one(admin)
    .await
    .unwrap()
}

/// The key of sqlx's migration lock for `database` (sqlx-postgres 0.9,
/// `migrate.rs`, `generate_lock_id`): CRC-32 of the name times a constant.
fn sqlx_migration_lock(database: &str) -> i64 {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926, "CRC-32/ISO-HDLC");
    0x3d32_ad9e * i64::from(crc32(database.as_bytes()))
}

/// CRC-32/ISO-HDLC (zlib's), as sqlx computes it with the `crc` crate.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFF_u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
