//! The transactional outbox, generic over event types: rows written in the
//! same transaction as the change they describe ([`store`]), the [`relay`]
//! that publishes them with confirms, and the [`wake`]-up; pruning is
//! [`crate::retention::published`].
//! An outbox can also have another sink ([`dispatch`]: SMTP for the mails).
//! It knows event types and JSON payloads, never a domain.

pub mod batch;
pub mod confirms;
pub mod dispatch;
pub mod publisher;
pub mod relay;
pub mod scheduler;
pub mod store;
pub mod wake;

pub use batch::{BatchOutcome, PublishedBatch};
pub use publisher::Publisher;
pub use relay::{Drained, Relay, RelayError};
pub use wake::{NOTIFY_CHANNEL, Wake, forward_wakes_as_notify};
