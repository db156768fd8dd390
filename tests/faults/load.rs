//! The load: orders posted at a steady rate, each on its own task so a slow
//! answer never holds up the next. Every order answered 202 is remembered;
//! refused connections, timeouts and 5xx during an outage are counted but
//! were never promised, so they are not owed. Every request's answer is also
//! kept with the moment it was sent, so a scenario can say which answers are
//! allowed while its fault lasts ([`LoadReport::answers`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Requests awaiting an answer at most; past it a tick is skipped, so an
/// outage cannot pile up thousands of hanging requests.
const MAX_PENDING: usize = 256;
/// How long a request may wait for its answer: longer than the API's own
/// request timeout (10 s, answered 503), so a request left unanswered here
/// is the API failing to bound it, not the client giving up first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    /// An HTTP answer with this status (202 is an accepted order).
    Status(u16),
    /// The connection was refused: nothing listens (the API is down).
    Refused,
    /// No answer within [`CLIENT_TIMEOUT`].
    TimedOut,
    /// The connection broke before a whole answer came (reset, closed).
    Broken,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(code) => write!(f, "{code}"),
            Answer::Refused => f.write_str("connection refused"),
            Answer::TimedOut => write!(f, "no answer in {}s", CLIENT_TIMEOUT.as_secs()),
            Answer::Broken => f.write_str("connection broken"),
        }
    }
}

/// One request: when it was sent, how it ended, and how long that took.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub at: Instant,
    pub answer: Answer,
    pub took: Duration,
}

/// How many requests ended each way, and the slowest of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answers(pub BTreeMap<Answer, (u64, Duration)>);

impl Answers {
    fn add(&mut self, sent: &Sent) {
        let (n, slowest) = self.0.entry(sent.answer).or_default();
        *n += 1;
        *slowest = (*slowest).max(sent.took);
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|(n, _)| n).sum()
    }

    pub fn count(&self, answer: Answer) -> u64 {
        self.0.get(&answer).map_or(0, |(n, _)| *n)
    }

    /// The requests that ended in none of `allowed`.
    pub fn other_than(&self, allowed: &[Answer]) -> Answers {
        Answers(
            self.0
                .iter()
                .filter(|(a, _)| !allowed.contains(a))
                .map(|(a, n)| (*a, *n))
                .collect(),
        )
    }
}

impl fmt::Display for Answers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(a, (n, slowest))| format!("{n} x {a} (slowest {:.1}s)", slowest.as_secs_f64()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// What the load saw, shared with its request tasks.
#[derive(Default)]
struct Tally {
    /// Orders answered 202, by the id in their `Location`.
    accepted: Mutex<Vec<Uuid>>,
    /// Connection refused or reset, or no answer in time.
    failed: AtomicU64,
    /// 5xx answers.
    server_errors: AtomicU64,
    /// Any other answer (a 4xx, a 202 without its `Location`): a valid
    /// order is never refused.
    unexpected: Mutex<Vec<String>>,
    /// Every request's answer, with when it was sent.
    answers: Mutex<Vec<Sent>>,
    /// Requests sent and not yet answered.
    pending: AtomicUsize,
    /// Of those, the ones sent by [`Load::burst`].
    burst_pending: AtomicUsize,
    /// Numbers the orders, to vary their amounts.
    sequence: AtomicU64,
}

/// What the load saw once stopped.
#[derive(Debug)]
pub struct LoadReport {
    pub accepted: Vec<Uuid>,
    pub failed: u64,
    pub server_errors: u64,
    pub unexpected: Vec<String>,
    /// Every request's answer, with when it was sent.
    pub answers: Vec<Sent>,
}

impl LoadReport {
    /// How the requests sent in a range of moments ended (all of them with
    /// `..`); [`Load::stop`] has waited for every one to end.
    pub fn answers(&self, sent: impl std::ops::RangeBounds<Instant>) -> Answers {
        let mut answers = Answers::default();
        for request in self.answers.iter().filter(|r| sent.contains(&r.at)) {
            answers.add(request);
        }
        answers
    }
}

/// Posts orders until stopped. Dropping it stops the posting too.
pub struct Load {
    tally: Arc<Tally>,
    tracker: TaskTracker,
    client: reqwest::Client,
    url: String,
    cancel: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Load {
    /// Starts posting `per_second` orders to `url`.
    pub fn start(url: String, per_second: u32) -> Self {
        let cancel = CancellationToken::new();
        let load = Self {
            tally: Arc::default(),
            tracker: TaskTracker::new(),
            client: reqwest::Client::builder()
                .timeout(CLIENT_TIMEOUT)
                .build()
                .expect("an HTTP client"),
            url,
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
        };
        let pacer = load.clone_parts();
        let period = Duration::from_secs(1) / per_second;
        load.tracker.spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = pacer.cancel.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                if pacer.tally.pending.load(Ordering::Relaxed) < MAX_PENDING {
                    pacer.post(false, None);
                }
            }
        });
        load
    }

    fn clone_parts(&self) -> Poster {
        Poster {
            tally: self.tally.clone(),
            tracker: self.tracker.clone(),
            client: self.client.clone(),
            url: self.url.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Posts `n` orders at once, so that a fault lands on a full batch.
    pub fn burst(&self, n: usize) {
        let poster = self.clone_parts();
        for _ in 0..n {
            poster.post(true, None);
        }
    }

    /// Posts `n` orders of `product` at once, amid the steady load.
    pub fn burst_of(&self, n: usize, product: &str) {
        let poster = self.clone_parts();
        for _ in 0..n {
            poster.post(true, Some(product));
        }
    }

    /// Requests of the bursts not yet answered.
    pub fn burst_pending(&self) -> usize {
        self.tally.burst_pending.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> usize {
        self.tally.accepted.lock().unwrap().len()
    }

    /// Requests that failed to connect or got no answer, so far.
    pub fn failed(&self) -> u64 {
        self.tally.failed.load(Ordering::Relaxed)
    }

    /// Requests awaiting an answer right now.
    pub fn pending(&self) -> usize {
        self.tally.pending.load(Ordering::Relaxed)
    }

    /// Stops posting and waits for every request in flight to be answered
    /// (or to time out).
    pub async fn stop(self) -> LoadReport {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        let tally = &self.tally;
        LoadReport {
            accepted: std::mem::take(&mut *tally.accepted.lock().unwrap()),
            failed: tally.failed.load(Ordering::Relaxed),
            server_errors: tally.server_errors.load(Ordering::Relaxed),
            unexpected: std::mem::take(&mut *tally.unexpected.lock().unwrap()),
            answers: std::mem::take(&mut *tally.answers.lock().unwrap()),
        }
    }
}

/// What a request task needs.
#[derive(Clone)]
struct Poster {
    tally: Arc<Tally>,
    tracker: TaskTracker,
    client: reqwest::Client,
    url: String,
    cancel: CancellationToken,
}

impl Poster {
    /// Posts one order, of `product` or one of 50 products.
    fn post(&self, burst: bool, product: Option<&str>) {
        let n = self.tally.sequence.fetch_add(1, Ordering::Relaxed);
        let product = product.map_or_else(|| format!("product-{}", n % 50), str::to_owned);
        let body = serde_json::json!({
            "productId": product,
            "userId": format!("user_{}", n % 20),
            "amount": n % 997 + 1,
        });
        let request = self.client.post(&self.url).json(&body);
        let tally = self.tally.clone();
        tally.pending.fetch_add(1, Ordering::Relaxed);
        if burst {
            tally.burst_pending.fetch_add(1, Ordering::Relaxed);
        }
        let sent = Instant::now();
        self.tracker.spawn(async move {
            let answer = match request.send().await {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    let id = response
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .and_then(|l| l.strip_prefix("/orders/"))
                        .and_then(|id| Uuid::parse_str(id).ok());
                    match id {
                        Some(id) => tally.accepted.lock().unwrap().push(id),
                        None => tally
                            .unexpected
                            .lock()
                            .unwrap()
                            .push("202 without Location: /orders/{id}".into()),
                    }
                    Answer::Status(StatusCode::ACCEPTED.as_u16())
                }
                Ok(response) if response.status().is_server_error() => {
                    tally.server_errors.fetch_add(1, Ordering::Relaxed);
                    Answer::Status(response.status().as_u16())
                }
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    tally
                        .unexpected
                        .lock()
                        .unwrap()
                        .push(format!("{status} {body}"));
                    Answer::Status(status.as_u16())
                }
                Err(error) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    if error.is_timeout() {
                        Answer::TimedOut
                    } else if error.is_connect() {
                        Answer::Refused
                    } else {
                        Answer::Broken
                    }
                }
            };
            tally.answers.lock().unwrap().push(Sent {
                at: sent,
                answer,
                took: sent.elapsed(),
            });
            tally.pending.fetch_sub(1, Ordering::Relaxed);
            if burst {
                tally.burst_pending.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}
