//! How long the bounded tables keep their rows.

use std::time::Duration;

use super::AmqpConfig;

/// How long the dedup rows and idempotency keys are kept, and how often the
/// pruner runs.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionConfig {
    /// Dedup rows (`processed_messages`) older than this are deleted
    /// (seconds). A redelivery or a replay later than this is applied again.
    #[arg(long, env = "DEDUP_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub dedup_retention_secs: u64,
    /// Idempotency keys older than this are deleted (seconds).
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub idempotency_key_retention_secs: u64,
    /// How often the pruner runs (seconds).
    #[arg(long, env = "PRUNE_INTERVAL_SECS", default_value_t = 60)]
    pub prune_interval_secs: u64,
}

/// Seven days, the default of every retention.
pub const WEEK_SECS: u64 = 7 * 24 * 3600;

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            dedup_retention_secs: WEEK_SECS,
            idempotency_key_retention_secs: WEEK_SECS,
            prune_interval_secs: 60,
        }
    }
}

impl RetentionConfig {
    pub fn dedup(&self) -> Duration {
        Duration::from_secs(self.dedup_retention_secs)
    }

    pub fn idempotency_keys(&self) -> Duration {
        Duration::from_secs(self.idempotency_key_retention_secs)
    }

    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.prune_interval_secs.max(1))
    }

    /// Refuses a dedup window shorter than a message's way through every
    /// retry queue (the sum of the delays, so at least the longest): a
    /// message still retrying after its dedup row was pruned could be
    /// applied twice.
    pub fn check(&self, amqp: &AmqpConfig) -> Result<(), String> {
        let retries: Duration = amqp.retry_delays().iter().sum();
        if self.dedup() < retries {
            return Err(format!(
                "DEDUP_RETENTION_SECS ({}s) is shorter than the retry delays together ({}s): \
                 a message still being retried could be applied twice",
                self.dedup_retention_secs,
                retries.as_secs_f64()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dedup_window_shorter_than_the_retries_is_refused() {
        let amqp = AmqpConfig::new("amqp://localhost");
        let mut retention = RetentionConfig::default();
        assert!(retention.check(&amqp).is_ok(), "the defaults fit");
        retention.dedup_retention_secs = 60; // the retries take 71 s
        let error = retention.check(&amqp).unwrap_err();
        assert!(error.contains("DEDUP_RETENTION_SECS"), "{error}");
    }
}
