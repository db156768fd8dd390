//! The first connection of a process: a Postgres that is only not up yet
//! (connection refused, starting up) is waited for; a refusal that waiting
//! cannot change (no such database, a refused password, a TLS mode the
//! server cannot meet, an untrusted certificate) stops the start at once,
//! with one line naming `DATABASE_URL` and the cause.

use std::sync::Mutex;
use std::time::Duration;

use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use super::options::Options;
use outbox_common::shutdown::{WaitError, wait_for};

/// One connection attempt may take this long (a host that drops packets
/// answers nothing, so the attempt would otherwise never end). Shorter than
/// an operator's patience ([`super::COMMAND_PATIENCE`]), so that a command
/// that gives up has seen at least one attempt end, and names its cause.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const _: () = assert!(ATTEMPT_TIMEOUT.as_secs() < super::COMMAND_PATIENCE.as_secs());

/// Why the service could not start on its database. Each message names
/// `DATABASE_URL`, redacted, and never carries its password.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `DATABASE_URL` itself is wrong: not a Postgres URL, an unknown
    /// `sslmode`, a TLS file that cannot be read.
    #[error("DATABASE_URL ({url}): {reason}")]
    Config { url: String, reason: String },
    /// Postgres (or the TLS handshake) refused the connection for a reason
    /// waiting cannot change.
    #[error("DATABASE_URL ({url}): {reason}")]
    Refused { url: String, reason: String },
    /// Still not reachable when the caller's patience ran out (operator
    /// commands; the roles wait as long as it takes).
    #[error("DATABASE_URL ({url}): Postgres not reachable within {}s: {last}", .waited.as_secs())]
    Unreachable {
        url: String,
        waited: Duration,
        last: String,
    },
    /// SIGTERM or Ctrl-C while waiting.
    #[error("DATABASE_URL ({url}): stopped while waiting for Postgres")]
    Cancelled { url: String },
}

/// Connects once with `options` (and closes again) until it works, waiting
/// with backoff on an outage, for at most `patience` if one is given.
pub(super) async fn wait_until_up(
    options: &Options,
    url: String,
    cancel: &CancellationToken,
    patience: Option<Duration>,
) -> Result<(), StartError> {
    let last = Mutex::new(None::<String>);
    let last_error = &last;
    let attempt = move || async move {
        let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, options.connect.connect()).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            // An I/O error as sqlx's own are, so that it is waited out like
            // any other outage (never permanent: no rustls error in it).
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
            ))),
        };
        if let Err(error) = &result {
            *last_error.lock().expect("not poisoned") = Some(error.to_string());
        }
        result
    };
    let waited = wait_for("Postgres", cancel, attempt, is_permanent);
    let result = match patience {
        None => waited.await,
        Some(patience) => match tokio::time::timeout(patience, waited).await {
            Ok(result) => result,
            Err(_) => {
                // An attempt ends within ATTEMPT_TIMEOUT, shorter than any
                // patience: none ended only if the machine stalled.
                let last = last.lock().expect("not poisoned").take();
                let last = last.unwrap_or_else(|| "no attempt ended".into());
                return Err(StartError::Unreachable {
                    url,
                    waited: patience,
                    last,
                });
            }
        },
    };
    match result {
        Ok(()) => Ok(()),
        Err(WaitError::Cancelled(_)) => Err(StartError::Cancelled { url }),
        Err(WaitError::Permanent(error)) => Err(StartError::Refused {
            reason: describe(&error, options.sslmode),
            url,
        }),
    }
}

/// Whether waiting cannot help: Postgres refused the login
/// ([`super::refuses_login`], by SQLSTATE), the TLS the URL asks for
/// cannot be had (sqlx's TLS errors, among them "server does not support
/// TLS" under `sslmode=require` or stronger, and a handshake rustls
/// rejected, such as an untrusted certificate), or the options are wrong.
fn is_permanent(error: &sqlx::Error) -> bool {
    super::refuses_login(error)
        || rustls_error(error).is_some()
        || matches!(
            error,
            sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) | sqlx::Error::InvalidArgument(_)
        )
}

/// The rustls error of a failed handshake: sqlx passes it on as an I/O
/// error (rustls reports it as `InvalidData` wrapping its own error).
fn rustls_error(error: &sqlx::Error) -> Option<&rustls::Error> {
    match error {
        sqlx::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
    }
}

/// The cause of a permanent failure, for the operator.
fn describe(error: &sqlx::Error, mode: &str) -> String {
    if let Some(tls) = rustls_error(error) {
        let hint = match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                "; sslrootcert must name the CA that signed the server's certificate"
            }
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            ) => "; the host in the URL must be one the certificate names",
            _ => "",
        };
        return format!("TLS handshake refused (sslmode={mode}): {tls}{hint}");
    }
    match error {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        sqlx::Error::Tls(tls) => format!("TLS (sslmode={mode}): {tls}"),
        sqlx::Error::Configuration(e) => format!("{e}"),
        other => other.to_string(),
    }
}
