//! Why a consumer left deliveries for redelivery: [`InboxError`], each
//! variant with the error that caused it as its source.

use std::error::Error;
use std::sync::Arc;

use uuid::Uuid;

use crate::handler::HandlerError;
use crate::message::BrokerCallError;

/// An infrastructure failure while handling deliveries (Postgres, the
/// broker, a handler's outage): the deliveries are left for redelivery
/// without using up an attempt. Cheap to clone: one failure of a batch's
/// transaction is the result of each of its events.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InboxError {
    /// Postgres failed a statement of the inbox's own (BEGIN, the dedup
    /// insert, the check before COMMIT, COMMIT).
    #[error("outage: database")]
    Database(#[source] Arc<sqlx::Error>),
    /// The handler reported an outage ([`HandlerError::Outage`], or a
    /// Postgres error that is not a refusal of the data).
    #[error(transparent)]
    Handler(Arc<HandlerError>),
    /// The broker failed an ack, or a forward to a delay queue or the
    /// dead-letter queue.
    #[error("broker")]
    Broker(#[source] Arc<BrokerCallError>),
    /// The batch's transaction reported nothing for this event id (a bug of
    /// the inbox's own; the delivery is kept rather than guessed at).
    #[error("outage: no result for event {0}")]
    NoResult(Uuid),
}

impl InboxError {
    pub(crate) fn database(error: sqlx::Error) -> Self {
        Self::Database(Arc::new(error))
    }

    pub(crate) fn broker(error: BrokerCallError) -> Self {
        Self::Broker(Arc::new(error))
    }
}

/// `error` and its sources, joined by `: `: the text logged and written into
/// a dead letter's error header, where the cause must travel as text.
pub(crate) fn report(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_the_failure_then_its_causes() {
        let error = InboxError::database(sqlx::Error::PoolTimedOut);
        assert_eq!(
            report(&error),
            format!("outage: database: {}", sqlx::Error::PoolTimedOut)
        );
        let refused = HandlerError::refused("card declined");
        assert_eq!(report(&refused), "card declined");
        let outage = InboxError::Handler(Arc::new(HandlerError::outage("gateway down")));
        assert_eq!(report(&outage), "outage: gateway down");
    }
}
