//! A database and a broker topology of one run's own (the demo's, a
//! test's), made under a unique name and removed after it, so runs can
//! share a Postgres server and a RabbitMQ vhost and leave them as they were.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use outbox_common::amqp::AmqpConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::balances::BALANCES;

/// A database `<prefix>_<random>` on the server of an admin URL.
#[derive(Debug, Clone)]
pub struct ScratchDatabase {
    admin: PgConnectOptions,
    name: String,
}

impl ScratchDatabase {
    /// Creates an empty database `<prefix>_<random>` on the server that
    /// `admin_url` (a user allowed to `CREATE DATABASE`) names.
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let admin = PgConnectOptions::from_str(admin_url).context("parsing DATABASE_URL")?;
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .context("connecting to Postgres as DATABASE_URL's user")?;
        // A name cannot be bound; this one is ours, made of [a-z0-9_].
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let _ = conn.close().await;
        Ok(Self { admin, name })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool of connections to it.
    pub async fn connect(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.admin.clone().database(&self.name))
            .await
            .with_context(|| format!("connecting to database {}", self.name))
    }

    /// Drops it, closing its sessions first; nothing if it is gone.
    pub async fn remove(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect_with(&self.admin)
            .await
            .context("connecting to Postgres to drop the database")?;
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        conn.execute(AssertSqlSafe(drop))
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// RabbitMQ settings for `url` with an exchange and queue names of a run's
/// own (`<prefix>_<random>_events`, queues `<prefix>_<random>_...`) and the
/// retry delays given.
pub fn amqp(url: &str, prefix: &str, retry_delays: Vec<Duration>) -> AmqpConfig {
    let id = &Uuid::new_v4().simple().to_string()[..12];
    AmqpConfig::new(url)
        .with_exchange(format!("{prefix}_{id}_events"))
        .with_queue_prefix(format!("{prefix}_{id}_"))
        .with_retry_delays(retry_delays)
}

/// Deletes the balances consumer's queues (their messages with them) and
/// the exchange of `amqp`.
pub async fn delete_topology(amqp: &AmqpConfig) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let connection = outbox_common::amqp::connect_once(amqp, "loyalty cleanup", &cancel)
        .await
        .context("connecting to RabbitMQ to delete the queues")?;
    let channel = connection.create_channel().await?;
    let deleted = outbox_common::amqp::delete_topology(&channel, amqp, &[BALANCES]).await;
    let _ = connection.close(200, "cleaned up".into()).await;
    Ok(deleted?)
}
