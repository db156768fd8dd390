//! What a consumer plugs into the inbox: a [`Handler`], Rust code that runs
//! inside the dedup transaction on the events it has not seen before.

use std::future::Future;

use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::sequence::Sequence;
use outbox_common::amqp::Subscription;
use outbox_common::sqlstate::{ErrorKind, classify};

/// One event handed to a handler, deserialized from the message body.
#[derive(Debug, Clone)]
pub struct Event<E> {
    /// The dedup key: the message's `message_id` (the outbox row's
    /// `transaction_id`), or the body's `transactionId` for publishers that
    /// set none.
    pub id: Uuid,
    /// The AMQP `type`, or the routing key where the publisher set none.
    pub event_type: String,
    /// The body.
    pub body: E,
    /// Failed attempts before this one (0 on first delivery).
    pub attempt: u32,
    /// The W3C trace context of this delivery's CONSUMER span, as
    /// `outbox.headers` stores it: an outbox row written for this event with
    /// these headers joins the same trace.
    pub trace_headers: serde_json::Value,
    /// Its place in its aggregate's history, when its outbox numbers its
    /// events: what a handler in sequence's events are applied by.
    pub sequence: Option<Sequence>,
}

/// A handler's error, with whatever caused it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a handler did not apply its events. The framework rolls the
/// transaction back (the dedup rows with it) in both cases.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The events themselves are refused (a constraint, a bad value, a
    /// business rule): retried through the delay queues, then dead-lettered
    /// with this error's text (its sources included). In a batch, the
    /// events are tried again one by one, so only the refused ones are
    /// retried.
    #[error("{reason}")]
    Refused {
        /// Why, in a few words.
        reason: String,
        /// What refused them, if an error did.
        #[source]
        source: Option<BoxError>,
    },
    /// Something the handler depends on is down (Postgres, another
    /// service): the deliveries go back to their queue without using up an
    /// attempt, and come back once it is up.
    #[error("outage: {reason}")]
    Outage {
        /// What is down.
        reason: String,
        /// The error it failed with, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl HandlerError {
    /// A refusal of the events, for `reason`.
    pub fn refused(reason: impl std::fmt::Display) -> Self {
        Self::Refused {
            reason: reason.to_string(),
            source: None,
        }
    }

    /// An outage of something the handler depends on, named by `reason`.
    pub fn outage(reason: impl std::fmt::Display) -> Self {
        Self::Outage {
            reason: reason.to_string(),
            source: None,
        }
    }

    /// The same error, caused by `source`.
    ///
    /// ```
    /// use inbox::HandlerError;
    ///
    /// let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
    /// let error = HandlerError::outage("the points service").with_source(io);
    /// assert_eq!(error.to_string(), "outage: the points service");
    /// assert!(std::error::Error::source(&error).is_some());
    /// ```
    pub fn with_source(self, source: impl Into<BoxError>) -> Self {
        let source = Some(source.into());
        match self {
            Self::Refused { reason, .. } => Self::Refused { reason, source },
            Self::Outage { reason, .. } => Self::Outage { reason, source },
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    /// Only a refusal of the data ([`ErrorKind::Refused`]) refuses the
    /// events; any other Postgres error is an outage, so a handler bug or a
    /// read-only database leaves messages in their queue, not in the DLQ.
    fn from(error: sqlx::Error) -> Self {
        match classify(&error) {
            ErrorKind::Refused => Self::refused("Postgres refused the events"),
            _ => Self::outage("database"),
        }
        .with_source(error)
    }
}

/// A consumer's side effect, run by the inbox inside ONE Postgres
/// transaction that already holds the dedup rows of `events`: whatever it
/// writes on `tx` (rows of its own, outbox rows with the `outbox` crate's
/// `Table::insert_many`) commits with them, or not at all. The framework
/// owns BEGIN, COMMIT and the ack.
///
/// A handler that keeps an audit trail of redeemed rewards, one row per
/// event, and names each event's member as its conversation:
///
/// ```
/// use inbox::{Event, Handler, HandlerError, Subscription};
/// use sqlx::PgConnection;
///
/// #[derive(Debug, Clone, serde::Deserialize)]
/// struct RewardRedeemed {
///     member_id: String,
///     reward: String,
/// }
///
/// struct RedemptionAudit;
///
/// impl Handler for RedemptionAudit {
///     type Event = RewardRedeemed;
///
///     fn subscription(&self) -> Subscription {
///         Subscription {
///             consumer: "redemption_audit",
///             routing_keys: &["reward.redeemed"],
///         }
///     }
///
///     fn conversation_id(&self, event: &RewardRedeemed) -> Option<String> {
///         Some(event.member_id.clone())
///     }
///
///     async fn handle(
///         &self,
///         tx: &mut PgConnection,
///         events: &[Event<RewardRedeemed>],
///     ) -> Result<(), HandlerError> {
///         for event in events {
///             sqlx::query("INSERT INTO redemptions (event_id, member_id, reward) VALUES ($1, $2, $3)")
///                 .bind(event.id)
///                 .bind(&event.body.member_id)
///                 .bind(&event.body.reward)
///                 .execute(&mut *tx)
///                 .await?;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The message body, deserialized with serde. A body that does not
    /// deserialize goes straight to the dead-letter queue.
    type Event: DeserializeOwned + Clone + Send + Sync + 'static;

    /// The consumer's name (its dedup key and queue base name) and the
    /// routing keys its queue is bound to.
    fn subscription(&self) -> Subscription;

    /// What conversation an event belongs to (an account's id, say), recorded
    /// as `messaging.message.conversation_id` on its CONSUMER span.
    fn conversation_id(&self, _event: &Self::Event) -> Option<String> {
        None
    }

    /// Whether this handler applies one aggregate's events in sequence
    /// (the outbox must number them: `outbox::Table::with_sequences`): an
    /// event that arrives before its predecessor (the latest earlier event
    /// of its aggregate of a type this consumer takes) is held in Postgres
    /// until that one is applied; other aggregates flow meanwhile. `false`
    /// by default: events are applied as they arrive, at the fastest.
    fn in_sequence(&self) -> bool {
        false
    }

    /// Applies `events`: one or more, each seen for the first time by this
    /// consumer, in the sequence they were delivered. A `?` on a
    /// `sqlx::Error` classifies it ([`HandlerError::from`]). A panic counts
    /// as a refusal of the events.
    fn handle(
        &self,
        tx: &mut PgConnection,
        events: &[Event<Self::Event>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}
