//! The loyalty service against a real Postgres and RabbitMQ, each test in a
//! database and under broker names of its own: an award and its event
//! written together, published, credited once under a duplicate delivery,
//! retried after a refusal, dead-lettered when refused to the end; and the
//! demo run whole.

mod delivery;
mod demo;
mod fixture;
mod writer;
