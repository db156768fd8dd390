//! TLS to every dependency, against real TLS endpoints the tests start
//! themselves, with certificates they make (never committed): Postgres
//! (`sslmode`), RabbitMQ (`amqps://`), SMTP (STARTTLS and implicit TLS).
//! Also the clear stop on a permanent misconfiguration at start.

#[path = "common/mod.rs"]
mod common;

#[path = "tls/certs.rs"]
mod certs;

#[path = "tls/postgres.rs"]
mod postgres;

#[path = "tls/rabbitmq.rs"]
mod rabbitmq;
