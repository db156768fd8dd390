//! Connecting to RabbitMQ: once (the operator's tools), at a role's start
//! (waiting for a broker that is only not up yet, stopping on a refusal
//! waiting cannot change), and for a running role's reconnects (retrying
//! everything until cancelled).

use std::time::Duration;

use lapin::{Connection, ConnectionProperties, ErrorKind};
use tokio_util::sync::CancellationToken;

use super::AmqpConfig;
use super::tls::{self, ConnectFailure};
use super::url::NodeUrl;
use crate::shutdown::{WaitError, wait_for};

/// How long one connection attempt to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no node of `AMQP_URL` could be connected to. Each names the node's
/// URL with its password replaced.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL cannot be used as written: a bad URL or parameter, an
    /// unreadable or unparsable certificate or key file.
    #[error("{0}")]
    Config(String),
    /// The broker (or its TLS endpoint) answered with a refusal that waiting
    /// does not change: refused credentials, a missing vhost, a certificate
    /// the configured CAs do not trust, no TLS on the port.
    #[error("{0}")]
    Refused(String),
    /// Not reachable now: connection refused or reset, no answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// The server asked for a client certificate, none is configured, and
    /// it closed the connection without saying why: the refusal of a broker
    /// that requires one, or a node going down that only offers it.
    #[error("{0}")]
    ClientCertWanted(String),
}

/// Why connecting ended without a connection.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No node could be used, for a reason waiting does not change (or, for
    /// [`connect_once`], none answered).
    #[error("AMQP_URL: {0}")]
    Connect(ConnectError),
    /// `cancel` fired first, while waiting for a broker.
    #[error("stopped while waiting for RabbitMQ at {0}")]
    Cancelled(String),
    /// `cancel` fired during [`connect_once`]'s one try.
    #[error("stopped while connecting to RabbitMQ")]
    Stopped,
}

impl ConnectError {
    /// True unless the broker may yet come up: a misconfiguration to report.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Refused(_))
    }
}

/// How many attempts in a row the start check lets end in
/// [`ConnectError::ClientCertWanted`] before it takes it for the refusal.
/// A node restarting drops a connection once or twice, not for seconds on
/// end (it refuses connections while it is down).
const CERT_WANTED_STOPS_AFTER: u32 = 3;

/// The start check's judgement of a failed attempt: a refusal stops it at
/// once; a connection closed for want of a client certificate only when it
/// is so [`CERT_WANTED_STOPS_AFTER`] times in a row.
#[derive(Debug, Default)]
struct StartCheck {
    cert_wanted_streak: std::cell::Cell<u32>,
}

impl StartCheck {
    fn stops_on(&self, error: &ConnectError) -> bool {
        match error {
            ConnectError::ClientCertWanted(_) => {
                let streak = self.cert_wanted_streak.get() + 1;
                self.cert_wanted_streak.set(streak);
                streak >= CERT_WANTED_STOPS_AFTER
            }
            _ => {
                self.cert_wanted_streak.set(0);
                error.is_permanent()
            }
        }
    }
}

/// Connects, retrying with backoff until a broker answers or `cancel` fires:
/// a running role's (re)connection, which rides out every failure. Each
/// attempt tries every URL of the list once, starting at a random one, so a
/// fleet spreads over a cluster and a lost node is skipped.
pub async fn connect(
    config: &AmqpConfig,
    name: &str,
    cancel: &CancellationToken,
) -> Result<Connection, StartError> {
    wait_for("RabbitMQ", cancel, || connect_any(config, name), |_| false)
        .await
        .map_err(|error| match error {
            WaitError::Permanent(error) => StartError::Connect(error),
            WaitError::Cancelled(_) => StartError::Cancelled(config.url().redacted()),
        })
}

/// The check a role needing RabbitMQ makes before it starts its loops:
/// waits for a broker that is not up yet, and fails at once, naming
/// `AMQP_URL` and the cause, on a misconfiguration.
pub async fn check_at_start(
    config: &AmqpConfig,
    cancel: &CancellationToken,
) -> Result<(), StartError> {
    let check = StartCheck::default();
    let connection = wait_for(
        "RabbitMQ",
        cancel,
        || connect_any(config, "start check"),
        |error| check.stops_on(error),
    )
    .await
    .map_err(|error| match error {
        WaitError::Permanent(error) => StartError::Connect(error),
        WaitError::Cancelled(_) => StartError::Cancelled(config.url().redacted()),
    })?;
    let _ = connection.close(200, "start check done".into()).await;
    Ok(())
}

/// Tries each URL once (each bounded by `CONNECT_TIMEOUT`, 5 s), or until
/// `cancel` fires: for the operator's commands, which fail rather than wait.
pub async fn connect_once(
    config: &AmqpConfig,
    name: &str,
    cancel: &CancellationToken,
) -> Result<Connection, StartError> {
    tokio::select! {
        result = connect_any(config, name) => result.map_err(StartError::Connect),
        _ = cancel.cancelled() => Err(StartError::Stopped),
    }
}

/// Opens and closes a connection to any node: the readiness check.
pub async fn ping(config: &AmqpConfig) -> Result<(), ConnectError> {
    let connection = connect_any(config, "readiness check").await?;
    let _ = connection.close(200, "readiness check done".into()).await;
    Ok(())
}

/// One attempt over every URL. When none answers, the error is a refusal
/// if any node refused (a misconfiguration to fix, even while another node
/// is down), else a node's want of a client certificate (so the start
/// check sees it on each attempt however the nodes are tried), else the
/// last node's failure.
async fn connect_any(config: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let urls = config.urls();
    if urls.is_empty() {
        return Err(ConnectError::Config("names no broker".into()));
    }
    let start = rand::random_range(0..urls.len());
    let mut failures = Vec::new();
    for i in 0..urls.len() {
        match connect_node(urls[(start + i) % urls.len()], name).await {
            Ok(connection) => return Ok(connection),
            Err(error) => failures.push(error),
        }
    }
    let last = failures.len() - 1;
    let pick = failures
        .iter()
        .position(ConnectError::is_permanent)
        .or_else(|| {
            let wanted = |e: &ConnectError| matches!(e, ConnectError::ClientCertWanted(_));
            failures.iter().position(wanted)
        });
    Err(failures.swap_remove(pick.unwrap_or(last)))
}

/// Connects to one node, `amqps://` through our TLS client.
async fn connect_node(url: &str, name: &str) -> Result<Connection, ConnectError> {
    let node = NodeUrl::parse(url).map_err(ConnectError::Config)?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let attempt = async {
        match &node.tls {
            Some(options) => tls::connect(node.uri.clone(), options, properties).await,
            None => Connection::connect_uri(node.uri.clone(), properties)
                .await
                .map_err(ConnectFailure::Lapin),
        }
    };
    let redacted = &node.redacted;
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(ConnectFailure::Config(why))) => {
            Err(ConnectError::Config(format!("{redacted}: {why}")))
        }
        Ok(Err(ConnectFailure::Lapin(error))) => Err(classify(redacted, &error)),
        Ok(Err(ConnectFailure::ClientCertRefused(error))) => Err(ConnectError::Refused(format!(
            "{redacted}: the server wants a client certificate: set certfile and keyfile \
             ({error})"
        ))),
        Ok(Err(ConnectFailure::ClientCertWanted(error))) => {
            Err(ConnectError::ClientCertWanted(format!(
                "{redacted}: the server asked for a client certificate: set certfile and \
                 keyfile (it closed the connection without one: {error})"
            )))
        }
        Err(_) => Err(ConnectError::Unreachable(format!(
            "{redacted}: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Sorts a failed connection into a refusal or an outage, by the AMQP
/// reply code or the kind of I/O error, and says what it means.
fn classify(url: &str, error: &lapin::Error) -> ConnectError {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let text = format!("{url}: {} ({})", amqp.get_message(), amqp.get_id());
            match amqp.get_id() {
                // ACCESS_REFUSED: the credentials, or the user's rights on
                // the vhost.
                403 => ConnectError::Refused(text),
                // NOT_ALLOWED is also "vhost ... is down", a broker still
                // starting (or recovering) the vhost: only the reply text
                // tells a missing vhost apart.
                530 if amqp.get_message().as_str().contains("not found") => {
                    ConnectError::Refused(text)
                }
                _ => ConnectError::Unreachable(text),
            }
        }
        ErrorKind::IOError(io) => {
            let tls = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
            if tls.is_some() || io.kind() == std::io::ErrorKind::InvalidData {
                // A certificate not trusted or not for this host, a client
                // certificate refused, or no TLS on the port.
                let hint = match tls {
                    // The server answered in something else (plain AMQP).
                    Some(rustls::Error::InvalidMessage(_)) => " (no TLS on this port?)",
                    _ => "",
                };
                ConnectError::Refused(format!("{url}: TLS handshake failed: {io}{hint}"))
            } else {
                ConnectError::Unreachable(format!("{url}: {io}"))
            }
        }
        ErrorKind::InvalidProtocolVersion(_) | ErrorKind::ParsingError(_) => ConnectError::Refused(
            format!("{url}: not an AMQP 0-9-1 server, or TLS expected on the port ({error})"),
        ),
        ErrorKind::AuthProviderError(_) => ConnectError::Refused(format!("{url}: {error}")),
        _ => ConnectError::Unreachable(format!("{url}: {error}")),
    }
}

#[cfg(test)]
mod tests;
