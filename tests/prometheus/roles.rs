//! The real binary's roles, each a process of its own as docker compose runs
//! them, each with its own HTTP_ADDR, run by the shared [`Processes`]
//! (killed when dropped; their logs kept if the test fails or
//! `PROM_TEST_KEEP_LOGS` is set). Here: their settings, and the targets
//! they make for Prometheus.

use std::net::SocketAddr;
use std::path::Path;

use order_service::config::AmqpConfig;

use crate::common::processes::Processes;
pub use crate::common::roles::Role;

/// This test's roles: the shared harness.
pub type Roles = Processes;

/// Applies the migrations (`order-service migrate`), then starts every role
/// (without waiting); each logs to `<log_dir>/<role>.log`.
pub fn start(db_url: &str, amqp: &AmqpConfig, log_dir: &Path) -> Roles {
    // Made first, so that its guard keeps the logs whatever fails next.
    let mut roles = Processes::new(db_url, amqp, log_dir, "PROM_TEST_RUST_LOG")
        .env("DATABASE_POOL_SIZE", "5")
        .remove_logs_unless("PROM_TEST_KEEP_LOGS");
    roles.migrate();
    roles.spawn_all();
    roles
}

/// (role label, address) of each role, for Prometheus' targets.
pub fn targets(roles: &Roles) -> Vec<(&'static str, SocketAddr)> {
    Role::ALL
        .into_iter()
        .map(|role| (role.label(), roles.addr(role)))
        .collect()
}
