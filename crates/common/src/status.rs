//! What `/healthz` and `/readyz` read: the loops of a process, each holding
//! a guard that marks it ended when dropped, and the consumers' subscriptions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A flag that a running loop holds: it turns false when the loop ends, by
/// returning, giving up or panicking (its guard is dropped either way).
#[derive(Debug, Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    /// Sets the flag.
    pub fn set(&self, value: bool) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The flag's value.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets its flag false when dropped.
#[derive(Debug)]
pub struct Running(Flag);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// The loops of a process and the consumers' subscriptions, by name.
#[derive(Debug, Clone, Default)]
pub struct Status {
    loops: Arc<Mutex<Vec<(String, Flag)>>>,
    subscriptions: Arc<Mutex<Vec<(String, Flag)>>>,
}

impl Status {
    /// Registers a loop as running; it stays so while the guard lives.
    pub fn running(&self, name: impl Into<String>) -> Running {
        let flag = Flag::default();
        flag.set(true);
        self.lock_loops().push((name.into(), flag.clone()));
        Running(flag)
    }

    /// A consumer's "subscribed" flag, for `/readyz`.
    pub fn subscription(&self, name: impl Into<String>) -> Flag {
        let flag = Flag::default();
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        subscriptions.push((name.into(), flag.clone()));
        flag
    }

    /// The loops that have ended.
    pub fn ended(&self) -> Vec<String> {
        self.lock_loops()
            .iter()
            .filter(|(_, flag)| !flag.get())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The subscriptions not subscribed now.
    pub fn unsubscribed(&self) -> Vec<String> {
        let subscriptions = self.subscriptions.lock().unwrap_or_else(|e| e.into_inner());
        subscriptions
            .iter()
            .filter(|(_, flag)| !flag.get())
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn lock_loops(&self) -> std::sync::MutexGuard<'_, Vec<(String, Flag)>> {
        self.loops.lock().unwrap_or_else(|e| e.into_inner())
    }
}
