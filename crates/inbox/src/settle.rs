//! Settling deliveries: parse each, run the batch's dedup transaction, then
//! ack, retry or dead-letter each delivery by its own event id's result.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use futures_util::future::join_all;
use lapin::Channel;
use lapin::message::Delivery;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::report;
use crate::handler::{Event, Handler};
use crate::hold::Deliveries;
use crate::message::{self, ParseError, Parsed};
use crate::sequence::Sequence;
use crate::transact::Applied;
use crate::{Consumer, InboxError};
use outbox_common::amqp::headers::WRITTEN_AT_HEADER;
use outbox_common::propagation;

/// What became of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Side effect applied and committed, then acked.
    Processed,
    /// Seen before: acked without doing anything.
    Duplicate,
    /// Came before its predecessor: held in Postgres, then acked.
    Held,
    /// Refused; sent to the delay queue for attempt `attempt`.
    Retried {
        /// The attempt the delay queue hands it back for (1 for the first
        /// retry).
        attempt: u32,
    },
    /// Sent to `<queue>.dlq` (unparseable, or out of attempts).
    DeadLettered {
        /// Why, as written into the letter's error header.
        reason: String,
    },
}

/// One delivery's result; `Err` leaves it for redelivery.
pub type Settled = Result<Outcome, InboxError>;

/// What the batch decided for one delivery, before it is settled.
#[derive(Debug)]
enum Verdict {
    /// The delivery did not parse: it goes to the dead-letter queue.
    Unparseable(ParseError),
    /// The transaction gave its event's id this result; `attempt` counts the
    /// event's failed attempts before this one.
    Applied { attempt: u32, applied: Applied },
    /// An outage left its event's id without a result: it waits for
    /// redelivery.
    Outage(InboxError),
}

impl<H: Handler> Consumer<H> {
    /// Handles deliveries to the end, their database work in ONE transaction:
    /// commit, then ack each; or retry/dead-letter and ack. Results by
    /// delivery tag; an `Err` is an outage, and that delivery is left unacked
    /// for the caller to requeue.
    pub async fn process_batch(
        &self,
        deliveries: &[Delivery],
        publish: &Channel,
    ) -> HashMap<u64, Settled> {
        let started = Instant::now();
        let parsed: Vec<_> = deliveries
            .iter()
            .map(|delivery| {
                let (parsed, span) = self.parse(delivery);
                (delivery, parsed, span)
            })
            .collect();
        let events: Vec<Event<H::Event>> = parsed
            .iter()
            .filter_map(|(_, event, _)| event.as_ref().ok().cloned())
            .collect();
        let raw: Deliveries<'_> = if self.handler.in_sequence() {
            parsed
                .iter()
                .filter_map(|(delivery, event, _)| Some((event.as_ref().ok()?.id, *delivery)))
                .collect()
        } else {
            HashMap::new()
        };
        let results = self.apply_batch_holding(&events, &raw).await;
        // A second copy of an id in the batch found its effect committed by
        // the first: it is a duplicate.
        let mut seen = HashSet::new();
        let settles = parsed.into_iter().map(|(delivery, event, span)| {
            let verdict = match event {
                Err(error) => Verdict::Unparseable(error),
                Ok(e) => {
                    let first = seen.insert(e.id);
                    match result_for(&results, e.id) {
                        Ok(Applied::Committed) if !first => Verdict::Applied {
                            attempt: e.attempt,
                            applied: Applied::Duplicate,
                        },
                        Ok(applied) => Verdict::Applied {
                            attempt: e.attempt,
                            applied,
                        },
                        Err(error) => Verdict::Outage(error),
                    }
                }
            };
            async move {
                let outcome = self
                    .settle(delivery, publish, verdict)
                    .instrument(span.clone())
                    .await;
                self.record(&outcome, &span);
                (delivery.delivery_tag, outcome)
            }
        });
        let settled: HashMap<u64, Settled> = join_all(settles).await.into_iter().collect();
        for _ in 0..settled.len() {
            self.metrics
                .handling
                .observe(outbox_common::metrics::seconds(started.elapsed()));
        }
        settled
    }

    /// Parses a delivery and opens its CONSUMER span.
    fn parse(&self, delivery: &Delivery) -> (Result<Event<H::Event>, ParseError>, tracing::Span) {
        let parsed: Result<Parsed<H::Event>, ParseError> = message::parse(delivery);
        let (attempt, conversation) = match &parsed {
            Ok(p) => (p.attempt, self.handler.conversation_id(&p.body)),
            Err(_) => (message::attempt(delivery), None),
        };
        let span = message::process_span(&self.queues.main, delivery, attempt, conversation);
        let sequence = if self.handler.in_sequence() {
            let keys = self.handler.subscription().routing_keys;
            Sequence::read(delivery.properties.headers().as_ref(), keys)
        } else {
            None
        };
        let event = parsed.map(|p| Event {
            id: p.id,
            event_type: p.event_type,
            body: p.body,
            attempt: p.attempt,
            trace_headers: propagation::span_context_headers(&span),
            sequence,
        });
        (event, span)
    }

    fn record(&self, outcome: &Settled, span: &tracing::Span) {
        let m = &self.metrics;
        match outcome {
            Ok(o) => {
                span.record("outcome", format!("{o:?}"));
                match o {
                    Outcome::Processed => {
                        m.processed.inc();
                    }
                    Outcome::Duplicate => {
                        m.duplicates.inc();
                    }
                    Outcome::Held => {
                        m.held.inc();
                    }
                    Outcome::Retried { .. } => {
                        m.retried.inc();
                    }
                    Outcome::DeadLettered { .. } => {
                        span.record("otel.status_code", "ERROR");
                        m.dead_lettered.inc();
                    }
                }
            }
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                m.requeued.inc();
                let error = report(error);
                tracing::warn!(parent: span, %error, "delivery left for redelivery");
            }
        }
    }

    /// Acks a delivery whose database work is done, or forwards it to a
    /// delay queue or the DLQ first, by its `verdict`.
    async fn settle(&self, delivery: &Delivery, publish: &Channel, verdict: Verdict) -> Settled {
        let (attempt, applied) = match verdict {
            Verdict::Applied { attempt, applied } => (attempt, applied),
            Verdict::Outage(error) => return Err(error),
            Verdict::Unparseable(error) => {
                let reason = format!("unparseable message: {error}");
                let attempt = message::attempt(delivery);
                self.forward(delivery, publish, &self.queues.dlq, attempt, &reason)
                    .await?;
                return Ok(Outcome::DeadLettered { reason });
            }
        };
        match applied {
            Applied::Committed => {
                self.observe_event_age(delivery);
                self.ack(delivery, Outcome::Processed).await
            }
            Applied::Duplicate => self.ack(delivery, Outcome::Duplicate).await,
            Applied::Held => self.ack(delivery, Outcome::Held).await,
            Applied::Refused(reason) => {
                self.retry_or_dead_letter(delivery, publish, attempt, reason)
                    .await
            }
        }
    }

    /// A refused event: the next delay queue, or the DLQ once out of attempts.
    async fn retry_or_dead_letter(
        &self,
        delivery: &Delivery,
        publish: &Channel,
        attempt: u32,
        reason: String,
    ) -> Settled {
        match self.queues.retries.get(attempt as usize) {
            Some((retry_queue, _)) => {
                tracing::info!(%reason, attempt = attempt + 1, queue = %retry_queue, "event refused; retrying later");
                self.forward(delivery, publish, retry_queue, attempt, &reason)
                    .await?;
                Ok(Outcome::Retried {
                    attempt: attempt + 1,
                })
            }
            None => {
                tracing::warn!(%reason, attempts = attempt + 1, "event refused; dead-lettering");
                self.forward(delivery, publish, &self.queues.dlq, attempt, &reason)
                    .await?;
                Ok(Outcome::DeadLettered { reason })
            }
        }
    }

    /// Copies the delivery to `queue` with attempt `attempt + 1`, waits for
    /// the broker's confirm, and only then acks the original.
    async fn forward(
        &self,
        delivery: &Delivery,
        publish: &Channel,
        queue: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<(), InboxError> {
        // One forward at a time on the shared publish channel: lapin hands a
        // returned message to whichever confirm completes next, so with two
        // in flight one's return could ride on the other's ack, and the
        // original would be acked although its copy went nowhere.
        let _one_at_a_time = self.forwarding.lock().await;
        message::forward(publish, delivery, queue, attempt + 1, reason)
            .await
            .map_err(InboxError::broker)?;
        message::ack(delivery).await.map_err(InboxError::broker)
    }

    /// How long the event took from its outbox write to this commit.
    fn observe_event_age(&self, delivery: &Delivery) {
        let headers = delivery.properties.headers().as_ref();
        let written =
            message::header_str(headers, WRITTEN_AT_HEADER).and_then(|v| v.parse::<i64>().ok());
        if let Some(written) = written {
            let age_ms = (chrono::Utc::now().timestamp_millis() - written).max(0);
            self.metrics.event_age.observe(age_ms as f64 / 1000.0);
        }
    }

    async fn ack(&self, delivery: &Delivery, outcome: Outcome) -> Settled {
        message::ack(delivery).await.map_err(InboxError::broker)?;
        Ok(outcome)
    }
}

/// The result of `id`, which the transaction reported for every id it got.
fn result_for(results: &super::transact::Results, id: Uuid) -> Result<Applied, InboxError> {
    results
        .get(&id)
        .cloned()
        .unwrap_or(Err(InboxError::NoResult(id)))
}
