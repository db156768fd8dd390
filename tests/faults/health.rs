//! Every role's liveness while a fault lasts: each serves `/healthz` on its
//! own `HTTP_ADDR`, and it must keep answering 200 promptly. A broker call
//! left hanging would show here (a loop that gave up answers 503; a process
//! whose runtime is stuck does not answer at all).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::stack::Role;

/// How often each role is asked.
const EVERY: Duration = Duration::from_millis(500);
/// How long one answer may take: `/healthz` reads a few flags in memory.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// What one role's probes saw.
#[derive(Debug, Clone, Default)]
pub struct RoleHealth {
    pub polls: u64,
    pub ok: u64,
    pub slowest: Duration,
    /// The first few answers other than a prompt 200, with when they came
    /// (seconds since the watch started).
    pub failures: Vec<String>,
    pub failed: u64,
}

/// What the watch saw, by role.
#[derive(Debug, Clone, Default)]
pub struct Health(pub BTreeMap<&'static str, RoleHealth>);

impl Health {
    pub fn failed(&self) -> u64 {
        self.0.values().map(|r| r.failed).sum()
    }

    pub fn polls(&self) -> u64 {
        self.0.values().map(|r| r.polls).sum()
    }

    /// The slowest answer of any role.
    pub fn slowest(&self) -> Duration {
        self.0.values().map(|r| r.slowest).max().unwrap_or_default()
    }

    /// One line per role that failed a probe.
    pub fn failures(&self) -> String {
        self.0
            .iter()
            .filter(|(_, r)| r.failed > 0)
            .map(|(role, r)| {
                format!(
                    "{role}: {} of {} probes failed: {}",
                    r.failed,
                    r.polls,
                    r.failures.join("; ")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Asks every role's `/healthz` every [`EVERY`] until [`HealthWatch::stop`]
/// (or until dropped, when a scenario fails first).
pub struct HealthWatch {
    cancel: CancellationToken,
    task: JoinHandle<Health>,
    _stop_on_drop: DropGuard,
}

impl HealthWatch {
    pub fn start(addrs: &HashMap<Role, SocketAddr>) -> Self {
        let cancel = CancellationToken::new();
        let client = reqwest::Client::builder()
            .timeout(ANSWER_WITHIN)
            .build()
            .expect("an HTTP client");
        let urls: Vec<(&'static str, String)> = addrs
            .iter()
            .map(|(role, addr)| (role.name(), format!("http://{addr}/healthz")))
            .collect();
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut health = Health::default();
            let mut ticks = tokio::time::interval(EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return health,
                    _ = ticks.tick() => {}
                }
                // All roles at once, so one slow answer does not delay the others.
                let probes = urls.iter().map(|(role, url)| {
                    let client = client.clone();
                    async move {
                        let asked = Instant::now();
                        let answer = client.get(url).send().await;
                        let took = asked.elapsed();
                        let verdict = match answer {
                            Ok(r) if r.status() == StatusCode::OK => Ok(()),
                            Ok(r) => {
                                let status = r.status();
                                Err(format!("{status} {}", r.text().await.unwrap_or_default()))
                            }
                            Err(e) if e.is_timeout() => {
                                Err(format!("no answer within {ANSWER_WITHIN:?}"))
                            }
                            Err(e) => Err(format!("{e}")),
                        };
                        (*role, took, verdict)
                    }
                });
                for (role, took, verdict) in futures_util::future::join_all(probes).await {
                    let r = health.0.entry(role).or_default();
                    r.polls += 1;
                    r.slowest = r.slowest.max(took);
                    match verdict {
                        Ok(()) => r.ok += 1,
                        Err(why) => {
                            r.failed += 1;
                            if r.failures.len() < 5 {
                                let at = started.elapsed().as_secs_f64();
                                r.failures.push(format!("at {at:.1}s: {why}"));
                            }
                        }
                    }
                }
            }
        });
        Self {
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
            task,
        }
    }

    pub async fn stop(self) -> Health {
        self.cancel.cancel();
        self.task.await.expect("the health watch")
    }
}
