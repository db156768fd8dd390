//! The dedup transaction: ONE Postgres transaction per batch of events,
//! holding their rows in `processed_messages` and, for the events not seen
//! before, the handler's side effect. Nothing is acked here.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use uuid::Uuid;

use crate::error::report;
use crate::handler::{Event, Handler, HandlerError};
use crate::hold::Deliveries;
use crate::{Consumer, InboxError};
use outbox_common::shutdown::panic_text;
use outbox_common::sqlstate::{ErrorKind, classify};
use outbox_common::wake::Wake;

/// What the dedup transaction did with one event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Its dedup row and the side effect were committed.
    Committed,
    /// Its dedup row existed: nothing was done.
    Duplicate,
    /// A handler in sequence's event whose predecessor is not applied yet:
    /// held in Postgres (committed), to be applied after it.
    Held,
    /// The handler (or Postgres) refused it; everything was rolled back.
    /// The text says why, its causes included: the dead letter carries it.
    Refused(String),
}

/// Results by event id: an outage for an id leaves its deliveries for
/// redelivery.
pub type Results = HashMap<Uuid, Result<Applied, InboxError>>;

/// What one dedup transaction over a batch of events did.
#[derive(Debug)]
enum Transacted {
    /// Committed: the batch's dedup rows and the handler's effect on the
    /// events first seen, whose ids are `new`.
    Committed {
        new: HashSet<Uuid>,
        held: HashSet<Uuid>,
    },
    /// The handler, or Postgres at the dedup insert or the commit, refused
    /// the events: rolled back, nothing written.
    Refused { reason: String },
    /// Postgres or something the handler depends on is down: rolled back,
    /// the deliveries wait for redelivery.
    Outage(InboxError),
}

impl<H: Handler> Consumer<H> {
    /// The database half of handling `events`: ONE transaction holding their
    /// dedup rows and, for the new ones, the handler's effect. Does not ack.
    /// When the handler refuses a batch, each event is applied again on its
    /// own, so only the refused ones fail. Two copies of one id in a batch
    /// are applied once (the result is the id's).
    pub async fn apply_batch(&self, events: &[Event<H::Event>]) -> Results {
        self.apply_batch_holding(events, &HashMap::new()).await
    }

    /// [`Consumer::apply_batch`], with what the deliveries carried, for a
    /// handler in sequence to hold an event that comes before its predecessor.
    pub(crate) async fn apply_batch_holding(
        &self,
        events: &[Event<H::Event>],
        raw: &Deliveries<'_>,
    ) -> Results {
        let ids: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
        match self.transact(events, raw, true).await {
            Transacted::Committed { new, held } => ids
                .into_iter()
                .map(|id| (id, Ok(applied(new.contains(&id), held.contains(&id)))))
                .collect(),
            Transacted::Refused { reason } if ids.len() == 1 => ids
                .into_iter()
                .map(|id| (id, Ok(Applied::Refused(reason.clone()))))
                .collect(),
            Transacted::Refused { reason } => {
                tracing::debug!(%reason, events = events.len(), "batch refused; applying one at a time");
                let mut results = Results::new();
                // Each aggregate's in sequence, so that a successor in the
                // batch follows its predecessor rather than being held.
                let mut events: Vec<&Event<H::Event>> = events.iter().collect();
                events.sort_by_key(|e| {
                    e.sequence
                        .as_ref()
                        .map(|s| (s.aggregate_type.clone(), s.aggregate_id.clone(), s.seq))
                });
                for event in events {
                    if let Entry::Vacant(slot) = results.entry(event.id) {
                        slot.insert(self.apply_one_holding(event, raw).await);
                    }
                }
                results
            }
            Transacted::Outage(error) => {
                ids.into_iter().map(|id| (id, Err(error.clone()))).collect()
            }
        }
    }

    /// [`Consumer::apply_batch`] for one event.
    pub async fn apply_one(&self, event: &Event<H::Event>) -> Result<Applied, InboxError> {
        self.apply_one_holding(event, &HashMap::new()).await
    }

    async fn apply_one_holding(
        &self,
        event: &Event<H::Event>,
        raw: &Deliveries<'_>,
    ) -> Result<Applied, InboxError> {
        // Alone, and without the held events that would follow it: one
        // the handler refuses must not fail the event it waited for.
        match self.transact(std::slice::from_ref(event), raw, false).await {
            Transacted::Committed { new, held } => {
                Ok(applied(new.contains(&event.id), held.contains(&event.id)))
            }
            Transacted::Refused { reason } => Ok(Applied::Refused(reason)),
            Transacted::Outage(error) => Err(error),
        }
    }

    /// One transaction over `events` and, if `follow`, the held events that
    /// follow them now. Refused or failed with such events along, it is
    /// tried again without them: the failure may be theirs (or their
    /// number's), and must not fail or hold up `events`.
    async fn transact(
        &self,
        events: &[Event<H::Event>],
        raw: &Deliveries<'_>,
        follow: bool,
    ) -> Transacted {
        let mut followed = false;
        match self.transact_once(events, raw, follow, &mut followed).await {
            failed @ (Transacted::Refused { .. } | Transacted::Outage(_)) if followed => {
                tracing::debug!(
                    ?failed,
                    "failed with held events that followed; again without them"
                );
                self.transact_once(events, raw, false, &mut followed).await
            }
            transacted => transacted,
        }
    }

    /// One transaction, rolled back unless it commits; sets `followed` if
    /// held events followed in it.
    async fn transact_once(
        &self,
        events: &[Event<H::Event>],
        raw: &Deliveries<'_>,
        follow: bool,
        followed: &mut bool,
    ) -> Transacted {
        // One copy of each id goes on; later copies are duplicates.
        let mut handed = HashSet::new();
        let mut candidates: Vec<Event<H::Event>> = events
            .iter()
            .filter(|e| handed.insert(e.id))
            .cloned()
            .collect();
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(error) => return Transacted::Outage(InboxError::database(error)),
        };
        // A handler in sequence's events first take their aggregates'
        // places: those that come before their predecessor are held, and
        // get no dedup row (not applied yet, a copy published again must not
        // count as a duplicate). A copy of an event applied before only
        // finds its place passed, and is then found a duplicate below.
        let sorted = if self.handler.in_sequence() {
            match self.sort_out(&mut tx, &candidates, raw).await {
                Ok((sorted, apply)) => {
                    candidates = apply;
                    Some(sorted)
                }
                Err(error) => return refused_or_outage(error),
            }
        } else {
            None
        };
        // Held events that follow what this transaction applies come along.
        let along = crate::follow::along(
            &mut tx,
            self.name(),
            sorted.as_ref(),
            follow,
            &mut candidates,
        );
        let (following, release) = match along.await {
            Ok(along) => along,
            Err(error) => return refused_or_outage(error),
        };
        *followed = !following.is_empty();
        let mut ids: Vec<Uuid> = candidates.iter().map(|e| e.id).collect();
        // Sorted, so two batches sharing ids cannot deadlock.
        ids.sort_unstable();
        let inserted = if ids.is_empty() {
            Ok(Vec::new())
        } else {
            sqlx::query_scalar(
                "INSERT INTO processed_messages (consumer, transaction_id) \
                 SELECT $1, id FROM unnest($2::uuid[]) AS t(id) \
                 ON CONFLICT DO NOTHING RETURNING transaction_id",
            )
            .bind(self.name())
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
        };
        let new: HashSet<Uuid> = match inserted {
            Ok(new) => new.into_iter().collect(),
            Err(error) => return refused_or_outage(error),
        };
        let applied_following = following.iter().filter(|id| new.contains(id)).count() as u64;
        let new_events: Vec<Event<H::Event>> = candidates
            .into_iter()
            .filter(|e| new.contains(&e.id))
            .collect();
        if !new_events.is_empty() {
            let handled = AssertUnwindSafe(self.handler.handle(&mut tx, &new_events))
                .catch_unwind()
                .await;
            match handled {
                Ok(Ok(())) => {}
                // Dropping `tx` rolls back the dedup rows with the effect.
                Ok(Err(error @ HandlerError::Refused { .. })) => {
                    return Transacted::Refused {
                        reason: report(&error),
                    };
                }
                Ok(Err(error @ HandlerError::Outage { .. })) => {
                    return Transacted::Outage(InboxError::Handler(Arc::new(error)));
                }
                Err(panic) => {
                    let reason = format!("the handler panicked: {}", panic_text(&*panic));
                    tracing::error!(consumer = self.name(), %reason);
                    return Transacted::Refused { reason };
                }
            }
        }
        // A handler that swallowed an error of its own statement returns Ok
        // on an aborted transaction, whose COMMIT Postgres answers with a
        // rollback and no error: a statement after it fails there (25P02,
        // an outage), so the deliveries wait for a fixed handler instead of
        // being acked unapplied.
        if !new_events.is_empty()
            && let Err(error) = sqlx::query("SELECT 1").execute(&mut *tx).await
        {
            return Transacted::Outage(InboxError::database(error));
        }
        if let Err(error) = tx.commit().await {
            return refused_or_outage(error);
        }
        self.metrics.transactions.inc();
        if !new_events.is_empty() {
            self.wakes.iter().for_each(Wake::notify);
        }
        let held: HashSet<Uuid> = sorted.iter().flat_map(|s| s.hold.iter().copied()).collect();
        if applied_following > 0 {
            self.metrics.processed.inc_by(applied_following);
        }
        if !release.is_empty() {
            // Held events of these aggregates may go after what was applied now.
            self.to_release
                .lock()
                .expect("never poisoned")
                .extend(release);
            self.release.notify_one();
        }
        Transacted::Committed { new, held }
    }
}

fn applied(fresh: bool, held: bool) -> Applied {
    match (fresh, held) {
        (_, true) => Applied::Held,
        (true, false) => Applied::Committed,
        (false, false) => Applied::Duplicate,
    }
}

/// A Postgres error of the framework's own statements: a refusal of the data
/// (a deferred constraint at commit, say) refuses the events; anything else
/// is an outage.
fn refused_or_outage(error: sqlx::Error) -> Transacted {
    match classify(&error) {
        ErrorKind::Refused => Transacted::Refused {
            reason: error.to_string(),
        },
        _ => Transacted::Outage(InboxError::database(error)),
    }
}
