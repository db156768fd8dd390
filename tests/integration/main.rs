//! Integration tests against a real Postgres and a real RabbitMQ. Each test
//! has its own database and its own exchange and queue names.

mod api;
mod auth;
mod auth_settings;
mod binary;
#[path = "../common/mod.rs"]
mod common;
mod consumers;
mod custom_event;
mod dispatch;
mod e2e;
mod helpers;
mod in_sequence;
mod openapi;
mod probes;
mod proxy;
mod relay;
mod retention;
mod sequences;
mod shipped_sql;
mod topology;
mod wal;
