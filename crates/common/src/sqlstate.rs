//! The one SQLSTATE classifier of the outbox, the inbox and the service
//! built on them: what a Postgres error means for the work that met it.
//! Never matches message text.

/// What a Postgres error means for the work that met it: used by the relay, the inbox
/// and the service's own writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Postgres refused the data (SQLSTATE classes 22 data exception, 23
    /// integrity constraint, 54 program limit such as a value too large for
    /// an index, P0 raised by a trigger): trying again fails again.
    Refused,
    /// The connection broke, or the server is shutting down or restarting
    /// (I/O, 08xxx, 57Pxx): the work can be retried on another connection.
    ConnectionLost,
    /// No connection could be had from the pool in time, or it is closed.
    Unavailable,
    /// Anything else (a read-only or full database, a deadlock, a bug in a
    /// statement): not the data's fault, so an outage to wait out.
    Other,
}

/// Classifies `error`; see [`ErrorKind`].
pub fn classify(error: &sqlx::Error) -> ErrorKind {
    match error {
        sqlx::Error::Io(_) => ErrorKind::ConnectionLost,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => ErrorKind::Unavailable,
        sqlx::Error::Database(db) => match db.code() {
            Some(c) if ["22", "23", "54", "P0"].iter().any(|k| c.starts_with(k)) => {
                ErrorKind::Refused
            }
            Some(c) if c.starts_with("08") || c.starts_with("57P") => ErrorKind::ConnectionLost,
            _ => ErrorKind::Other,
        },
        _ => ErrorKind::Other,
    }
}

/// Whether Postgres refused a new connection for a reason that waiting
/// cannot change: no such database (3D000), the login refused (class 28: a
/// wrong password, no `pg_hba.conf` entry, say for a connection without
/// TLS, an unknown role), or no right to connect (42501). A server starting
/// up (57P03) or out of connection slots (53300) is not such a refusal.
pub fn refuses_login(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c == "3D000" || c == "42501" || c.starts_with("28")),
        _ => false,
    }
}
