//! A consumer's settings, and their defaults.

use std::time::Duration;

/// How a [`Consumer`](crate::Consumer) takes deliveries. `Default` gives a
/// prefetch of 128, 4 transactions at once and up to 64 deliveries in one.
///
/// ```
/// let config = inbox::ConsumerConfig::default()
///     .with_prefetch(32)
///     .with_concurrency(2)
///     .with_batch_size(1);
/// assert_eq!(config.batch_size(), 1);
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    prefetch: u16,
    concurrency: usize,
    batch_size: usize,
    hold_limit: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            prefetch: 128,
            concurrency: 4,
            batch_size: 64,
            hold_limit: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl ConsumerConfig {
    /// Unacked deliveries the broker may send at once (`basic.qos`).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Transactions handled at once (at least 1); each holds a pooled
    /// connection while it runs, so keep it under the pool's size.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Most deliveries in one transaction (at least 1): those already
    /// received when a transaction starts share it.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How long a handler in sequence's event may wait for its predecessor
    /// before it goes to the dead-letter queue (keep it to the dedup
    /// window: a week by default).
    pub fn with_hold_limit(mut self, limit: Duration) -> Self {
        self.hold_limit = limit;
        self
    }

    /// The hold limit.
    pub fn hold_limit(&self) -> Duration {
        self.hold_limit
    }

    /// The prefetch.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// Transactions at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Deliveries a transaction at most.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}
