//! A loyalty-points service built only on the core crates (`outbox`,
//! `inbox`, `outbox-common`): the example of using them in a service of
//! your own, in another domain than orders.
//!
//! - [`awards`]: the writer. An award is a row of `awards` and a
//!   `points.awarded` event in the `loyalty_outbox` table, written in ONE
//!   transaction with [`outbox::Table::insert`].
//! - [`balances`]: the consumer. [`Balances`] is an [`inbox::Handler`]
//!   that credits a user's balance inside the inbox's dedup transaction, so
//!   a redelivered award is credited once; it refuses an award of negative
//!   points, which the inbox retries through the delay queues and then
//!   dead-letters.
//! - [`schema`]: the tables, from the SQL the core crates ship plus the
//!   service's own.
//! - [`service`]: the wiring: an [`outbox::Relay`] of `loyalty_outbox` to
//!   the service's own exchange, and an [`inbox::Consumer`] of the
//!   balances' queue, on one task tracker.
//! - [`scratch`]: a database and a broker topology of a run's own, removed
//!   after it (the demo's and the tests').
//! - [`demo`]: `loyalty-example demo`, the run CI makes.

pub mod awards;
pub mod balances;
pub mod demo;
pub mod schema;
pub mod scratch;
pub mod service;

pub use awards::{OUTBOX, POINTS_AWARDED, PointsAwarded};
pub use balances::{BALANCES, Balances};
pub use service::{Running, Service};
