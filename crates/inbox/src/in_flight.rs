//! The aggregates of a handler in sequence's batches in flight. Of what
//! arrives, the deliveries of aggregates in flight make a batch of their
//! own, which starts once the batches before it of those aggregates are
//! done; the others go at once. One aggregate's events are applied in the
//! order they were delivered, without the later event being held because
//! it overtook the earlier one, without a transaction waiting in Postgres,
//! a pooled connection in hand, on another's lock on the aggregate's place,
//! and without other aggregates' events waiting behind them.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_common::amqp::headers::{AGGREGATE_ID_HEADER, AGGREGATE_TYPE_HEADER};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Consumer;
use crate::handler::Handler;
use crate::message::header;

/// The latest batch in flight of each aggregate (by a hash of its type and
/// id: two aggregates with one hash only make a batch wait needlessly).
#[derive(Default)]
pub(crate) struct InFlight {
    batches: Mutex<Batches>,
}

/// The number of the last batch entered, and by aggregate the number and
/// mark of its latest batch in flight.
type Batches = (u64, HashMap<u64, (u64, CancellationToken)>);

/// A batch entered: the batches it waits for, and its own mark.
pub(crate) struct Entered {
    after: Vec<CancellationToken>,
    done: Done,
}

/// Marks its batch done when dropped, however the batch ends.
pub(crate) struct Done {
    in_flight: Arc<InFlight>,
    batch: u64,
    keys: Vec<u64>,
    token: CancellationToken,
}

impl<H: Handler> Consumer<H> {
    /// Hands `batch` over to tasks on `tracker`: the deliveries of
    /// aggregates in flight wait for their batches, then for a permit of
    /// `limit`; the others go at once, with `permit`.
    pub(crate) fn hand_over(
        self: Arc<Self>,
        in_flight: &Arc<InFlight>,
        batch: Vec<Delivery>,
        (permit, limit): (OwnedSemaphorePermit, Arc<Semaphore>),
        tracker: &TaskTracker,
        publish: Arc<Channel>,
    ) {
        let [(now, entered_now), (later, entered_later)] = in_flight.split(batch);
        if !now.is_empty() {
            let (this, publish) = (self.clone(), publish.clone());
            tracker.spawn(async move {
                let (_permit, _done) = (permit, entered_now.wait().await);
                this.handle(now, &publish).await;
            });
        }
        if !later.is_empty() {
            tracker.spawn(async move {
                let _done = entered_later.wait().await;
                let _permit = limit.acquire_owned().await.expect("never closed");
                self.handle(later, &publish).await;
            });
        }
    }
}

impl InFlight {
    /// Splits a batch, in the order batches are taken, into the deliveries
    /// whose aggregate no batch in flight has, to go now, and the others,
    /// to go after those batches; and enters both, under one lock (a batch
    /// that ends meanwhile cannot put one aggregate's deliveries in both).
    pub fn split(self: &Arc<Self>, batch: Vec<Delivery>) -> [(Vec<Delivery>, Entered); 2] {
        let mut guard = self.batches.lock().expect("never poisoned");
        let (later, now): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|d| (aggregate(&d), d))
            .partition(|(key, _)| key.is_some_and(|key| guard.1.contains_key(&key)));
        [now, later].map(|part| {
            let (keys, deliveries): (Vec<Option<u64>>, Vec<Delivery>) = part.into_iter().unzip();
            (
                deliveries,
                self.enter(&mut guard, keys.into_iter().flatten()),
            )
        })
    }

    /// Enters a batch of the aggregates `keys`: it goes after the batches in
    /// flight of those aggregates.
    fn enter(self: &Arc<Self>, batches: &mut Batches, keys: impl Iterator<Item = u64>) -> Entered {
        let mut keys: Vec<u64> = keys.collect();
        keys.sort_unstable();
        keys.dedup();
        let token = CancellationToken::new();
        let (next, latest) = batches;
        *next += 1;
        let after = keys
            .iter()
            .filter_map(|key| latest.insert(*key, (*next, token.clone())))
            .map(|(_, before)| before)
            .collect();
        let done = Done {
            in_flight: self.clone(),
            batch: *next,
            keys,
            token,
        };
        Entered { after, done }
    }
}

impl Entered {
    /// Waits until the batches before it of its aggregates are done; the
    /// mark returned is to be kept until this batch is.
    pub async fn wait(self) -> Done {
        for before in self.after {
            before.cancelled().await;
        }
        self.done
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        let mut guard = self.in_flight.batches.lock().expect("never poisoned");
        for key in &self.keys {
            if guard
                .1
                .get(key)
                .is_some_and(|(batch, _)| *batch == self.batch)
            {
                guard.1.remove(key);
            }
        }
        self.token.cancel();
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
