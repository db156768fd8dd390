//! The aggregates of a handler in sequence's batches in flight. Of what
//! arrives, the deliveries of aggregates in flight are deferred: they wait,
//! unacked and in the order they came, and go at the head of a later batch
//! once no batch in flight has their aggregate: with what arrives next, or,
//! when nothing arrives, once no batch at all is in flight. One aggregate's
//! events are applied in the order they were delivered, without the later
//! event being held because it overtook the earlier one, without a
//! transaction waiting in Postgres, a pooled connection in hand, on
//! another's lock on the aggregate's place, and without other aggregates'
//! events waiting behind them. A deferred delivery does not cost a
//! transaction of its own: it shares the next batch.

use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_common::amqp::headers::{AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::task::TaskTracker;

use crate::Consumer;
use crate::handler::Handler;
use crate::message::header;

/// The aggregates (by a hash of their type and id: two aggregates with one
/// hash only make a delivery wait needlessly) that batches in flight have,
/// and the deliveries deferred behind them.
#[derive(Default)]
pub(crate) struct InFlight {
    state: Mutex<State>,
    idle: Notify,
}

#[derive(Default)]
struct State {
    /// The aggregates of the batches in flight.
    aggregates: HashSet<u64>,
    /// How many batches are in flight.
    batches: usize,
    /// The deliveries deferred, in the order they came.
    deferred: Vec<Delivery>,
    /// Whether one of them was deferred only because its batch was full:
    /// it may go at once.
    may_go: bool,
}

/// Marks its batch's aggregates no longer in flight when dropped, however
/// the batch ends.
pub(crate) struct Done {
    in_flight: Arc<InFlight>,
    keys: Vec<u64>,
}

impl<H: Handler> Consumer<H> {
    /// Hands the deferred deliveries that may go, then `arrived`, to a task
    /// on `tracker` with `permit`, as one batch of at most the batch size;
    /// defers the rest.
    pub(crate) fn hand_over(
        self: Arc<Self>,
        in_flight: &Arc<InFlight>,
        arrived: Vec<Delivery>,
        permit: OwnedSemaphorePermit,
        tracker: &TaskTracker,
        publish: Arc<Channel>,
    ) {
        if let Some((now, done)) = in_flight.split(arrived, self.config.batch_size()) {
            tracker.spawn(async move {
                let (_permit, _done) = (permit, done);
                self.handle(now, &publish).await;
            });
        }
    }
}

impl InFlight {
    /// Takes, in the order they came, the deferred deliveries and then
    /// `arrived`: those whose aggregate no batch in flight has, and no
    /// delivery before them deferred, go now, up to `limit`; the others are
    /// deferred. The batch's aggregates are in flight until its mark drops.
    fn split(
        self: &Arc<Self>,
        arrived: Vec<Delivery>,
        limit: usize,
    ) -> Option<(Vec<Delivery>, Done)> {
        let mut state = self.state.lock().expect("never poisoned");
        let state = &mut *state;
        state.may_go = false;
        let mut held_back = HashSet::new();
        let (mut now, mut keys) = (Vec::new(), Vec::new());
        let waiting = std::mem::take(&mut state.deferred);
        for delivery in waiting.into_iter().chain(arrived) {
            let key = aggregate(&delivery);
            let blocked =
                key.is_some_and(|key| state.aggregates.contains(&key) || held_back.contains(&key));
            if blocked || now.len() >= limit {
                // Deferred for the limit alone, unless its aggregate goes now.
                state.may_go |= !blocked && key.is_none_or(|key| !keys.contains(&key));
                held_back.extend(key);
                state.deferred.push(delivery);
            } else {
                keys.extend(key);
                now.push(delivery);
            }
        }
        if now.is_empty() {
            return None;
        }
        state.aggregates.extend(keys.iter().copied());
        state.batches += 1;
        let done = Done {
            in_flight: self.clone(),
            keys,
        };
        Some((now, done))
    }

    /// Whether deliveries are deferred, and whether one of them may go at
    /// once (it was deferred only because its batch was full).
    pub fn deferring(&self) -> (bool, bool) {
        let state = self.state.lock().expect("never poisoned");
        (!state.deferred.is_empty(), state.may_go)
    }

    /// The deferred deliveries, taken: for the end of a session, once no
    /// batch is in flight.
    pub fn take_deferred(&self) -> Vec<Delivery> {
        std::mem::take(&mut self.state.lock().expect("never poisoned").deferred)
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        let mut state = self.in_flight.state.lock().expect("never poisoned");
        for key in &self.keys {
            state.aggregates.remove(key);
        }
        state.batches -= 1;
        if state.batches == 0 {
            self.in_flight.idle.notify_waiters();
        }
    }
}

/// Resolves once no batch of a handler in sequence is in flight; never
/// without one. While deliveries keep arriving, deferred ones go with them
/// instead: a delivery deferred does not take a transaction of its own
/// while others would share it.
pub(crate) async fn idle(in_flight: &Option<Arc<InFlight>>) {
    let Some(in_flight) = in_flight else {
        return std::future::pending().await;
    };
    loop {
        // Registered before the count is read, so no batch's end is missed.
        let notified = in_flight.idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if in_flight.state.lock().expect("never poisoned").batches == 0 {
            return;
        }
        notified.await;
    }
}

/// A hash of a delivery's aggregate, if it has a place.
fn aggregate(delivery: &Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref();
    let text = |name| match header(headers, name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    };
    let mut hasher = DefaultHasher::new();
    (text(AGGREGATE_TYPE_HEADER)?, text(AGGREGATE_ID_HEADER)?).hash(&mut hasher);
    Some(hasher.finish())
}
