//! Shutdown signals and the small helpers every loop shares: waiting,
//! backoff, retrying, and the text of a caught panic.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGTERM or Ctrl-C. Roles stop taking new work when the
/// token fires and finish what they hold.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
            _ = term => tracing::info!("SIGTERM received, shutting down"),
        }
        token.cancel();
    });
}

/// Sleeps for `delay` unless `cancel` fires first. Returns false if cancelled.
pub async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = cancel.cancelled() => false,
    }
}

/// Exponential backoff with a cap and full jitter, for reconnect loops: a
/// fleet that lost its broker or database together does not come back in
/// lockstep. The delays come from `backon`; this keeps the reset that a
/// long-lived loop needs after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: backon::ExponentialBackoff,
}

impl Default for Backoff {
    /// 100 ms doubling to 5 s; with the jitter (up to the delay again) a
    /// reconnect is at most 10 s after the outage ends.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// Delays start near `initial` and double up to `max`, each drawn with
    /// jitter; they never run out.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
        }
    }

    /// The delay to wait now; the next one is about twice as long.
    pub fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .expect("a backoff without a maximum number of times never runs out")
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// Why waiting for a dependency ended without it.
#[derive(Debug, thiserror::Error)]
pub enum WaitError<E> {
    /// The dependency answered with a refusal that waiting cannot change (a
    /// database that does not exist, refused credentials, an untrusted
    /// certificate): a misconfiguration to report, not an outage to ride out.
    #[error("{0}")]
    Permanent(E),
    /// `cancel` fired first.
    #[error("cancelled while waiting for {0}")]
    Cancelled(String),
}

/// Runs `attempt` until it succeeds, waiting a [`Backoff`] delay after each
/// failure and logging it with `what`. Stops early with
/// [`WaitError::Permanent`] on an error that `permanent` says waiting cannot
/// fix, and with [`WaitError::Cancelled`] when `cancel` fires. The one
/// connect-and-wait loop of the crate: a dependency that is only not up yet
/// (connection refused, Postgres starting up) is waited for.
pub async fn wait_for<T, E, F, Fut>(
    what: &str,
    cancel: &CancellationToken,
    mut attempt: F,
    permanent: impl Fn(&E) -> bool,
) -> Result<T, WaitError<E>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if permanent(&error) => return Err(WaitError::Permanent(error)),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what} not reachable");
                if !sleep_or_cancel(delay, cancel).await {
                    return Err(WaitError::Cancelled(what.to_owned()));
                }
            }
        }
    }
}

/// The message of a panic payload (a caught task or handler panic), for the
/// error it becomes.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
