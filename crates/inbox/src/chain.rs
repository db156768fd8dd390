//! A batch's events of one aggregate, and where they take its place: the
//! decision the dedup transaction makes for a handler in sequence, and the
//! same decision as the steps its one statement computes in Postgres.

use crate::handler::Event;
use crate::sequence::Sequence;

/// What a batch's events do to their aggregate's place, from wherever it
/// stands: applied in sequence, each while its predecessor is applied.
pub(crate) struct Chain<'a, E> {
    /// The aggregate's events in the batch, in sequence.
    pub events: Vec<&'a Event<E>>,
}

impl<'a, E> Chain<'a, E> {
    /// The chain of `events`, each with a place, put in sequence.
    pub fn new(mut events: Vec<&'a Event<E>>) -> Self {
        events.sort_by_key(|e| Self::place(e).seq);
        Self { events }
    }

    pub fn place(event: &Event<E>) -> &Sequence {
        event.sequence.as_ref().expect("only events with a place")
    }

    /// From place `before`: the place after, and which events apply.
    pub fn run(&self, before: i64) -> (i64, Vec<bool>) {
        let mut now = before;
        let applied = self
            .events
            .iter()
            .map(|event| {
                let place = Self::place(event);
                let applies = place.predecessor <= now;
                if applies {
                    now = now.max(place.seq);
                }
                applies
            })
            .collect();
        (now, applied)
    }

    /// The run from every place, as steps `(from, to, complete)`: from a
    /// place at or past `from` (and short of the next step's), the place
    /// after is `max(place, to)`, and every event applies if `complete`.
    /// From a place short of the first step, none applies. Which events
    /// apply depends only on which predecessors the place has reached, so
    /// one step per distinct predecessor says it all.
    pub fn steps(&self) -> Vec<(i64, i64, bool)> {
        let mut from: Vec<i64> = self
            .events
            .iter()
            .map(|e| Self::place(e).predecessor)
            .collect();
        from.sort_unstable();
        from.dedup();
        from.into_iter()
            .map(|from| {
                let (to, applied) = self.run(from);
                (from, to, applied.iter().all(|a| *a))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, predecessor: i64) -> Event<()> {
        Event {
            id: uuid::Uuid::new_v4(),
            event_type: "cart.changed".into(),
            body: (),
            attempt: 1,
            trace_headers: serde_json::Value::Null,
            sequence: Some(Sequence {
                aggregate_type: "cart".into(),
                aggregate_id: "c-1".into(),
                seq,
                predecessor,
            }),
        }
    }

    /// What the statement computes from place `before` with `steps`.
    fn by_steps(steps: &[(i64, i64, bool)], before: i64) -> (i64, bool) {
        let reached = steps.iter().filter(|(from, _, _)| *from <= before);
        let to = reached.clone().map(|(_, to, _)| *to).max();
        let complete = reached.clone().any(|(_, _, complete)| *complete);
        (to.map_or(before, |to| to.max(before)), complete)
    }

    #[test]
    fn the_steps_give_what_the_run_gives_from_every_place() {
        // Histories with gaps (events the consumer is not bound to), a
        // stale event, two events waiting for one predecessor.
        let batches: Vec<Vec<(i64, i64)>> = vec![
            vec![(1, 0)],
            vec![(2, 1)],
            vec![(1, 0), (2, 1), (4, 2), (5, 4)],
            vec![(4, 2), (5, 4)],
            vec![(2, 1), (5, 4)],
            vec![(3, 1), (4, 1)],
            vec![(1, 0), (3, 2), (6, 3)],
            vec![(7, 5), (2, 0), (5, 2)],
        ];
        for batch in batches {
            let events: Vec<Event<()>> = batch.iter().map(|&(s, p)| event(s, p)).collect();
            let chain = Chain::new(events.iter().collect());
            let steps = chain.steps();
            for before in 0..9 {
                let (now, applied) = chain.run(before);
                assert_eq!(
                    by_steps(&steps, before),
                    (now, applied.iter().all(|a| *a)),
                    "{batch:?} from {before}"
                );
            }
        }
    }

    #[test]
    fn an_event_applies_once_its_predecessor_has() {
        let events = [event(1, 0), event(2, 1), event(4, 2), event(5, 4)];
        let chain = Chain::new(events.iter().collect());
        assert_eq!(chain.run(0), (5, vec![true; 4]));
        let later = [event(4, 2), event(5, 4)];
        let chain = Chain::new(later.iter().collect());
        assert_eq!(chain.run(1), (1, vec![false, false]));
        assert_eq!(chain.run(2), (5, vec![true, true]));
    }
}
