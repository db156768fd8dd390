//! The relay's settings and their defaults.

use std::time::Duration;

/// How a [`Relay`](crate::Relay) claims and publishes. `Default` gives 750
/// rows a batch, 2 workers, a 1 s fallback poll and a week's retention.
///
/// ```
/// use std::time::Duration;
/// let config = outbox::RelayConfig::default()
///     .with_batch_size(100)
///     .with_workers(1)
///     .with_poll_interval(Duration::from_millis(200));
/// assert_eq!(config.confirm_window(), 100);
/// assert_eq!(config.batches_open(), 3);
/// ```
#[derive(Debug, Clone)]
pub struct RelayConfig {
    batch_size: i64,
    workers: usize,
    poll_interval: Duration,
    retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 750,
            workers: 2,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl RelayConfig {
    /// Rows claimed per batch (at least 1).
    pub fn with_batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Batches publishing at once; the confirm window is
    /// `batch_size × workers` (at least 1).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// The fallback poll when nothing wakes the relay.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long published rows are kept before they are pruned.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Rows claimed per batch.
    pub fn batch_size(&self) -> i64 {
        self.batch_size
    }

    /// Batches publishing at once.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The fallback poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// How long published rows are kept.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Publishes awaiting confirms at most, across the batches in flight.
    pub fn confirm_window(&self) -> usize {
        self.batch_size as usize * self.workers
    }

    /// Batches open at most (claim transactions), each on a publisher lane
    /// of its own: two more than the workers, so the window stays full
    /// while one batch marks and the next claims.
    pub fn batches_open(&self) -> usize {
        self.workers + 2
    }
}
