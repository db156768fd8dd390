//! The start probe of the SMTP server: one connection, as a send makes it
//! (greeting, EHLO, STARTTLS or implicit TLS, AUTH), so that a server that
//! can never take the mailer's settings (an untrusted certificate, no
//! STARTTLS under `tls=required`, a refused login) stops the role at start
//! with one line, instead of every mail being retried for ever.
//!
//! A server only not reachable yet (refused, reset, silent, 4xx) is not
//! waited for: the mails wait in `mail_outbox`, and the e-mail consumer
//! must consume meanwhile.

use std::time::Duration;

use lettre::transport::smtp::Error;
use lettre::transport::smtp::response::Category;

use super::{MailConfigError, settings};
use crate::config::{MailConfig, redact_url};

/// What the probe found out, short of a stop.
#[derive(Debug, PartialEq, Eq)]
pub enum Probed {
    /// No `SMTP_URL`: no mailer runs.
    NoMailer,
    /// Connected, encrypted as asked, and logged in.
    Ready,
    /// Not reachable (or not answering in time): the mails wait.
    Unreachable(String),
}

/// Connects once to the server of `config.smtp_url`, bounded by
/// `SMTP_TIMEOUT_MS` as a whole, and logs in if the URL has credentials.
/// `Err` names `SMTP_URL` (never the password) when the server refuses the
/// settings for good: a failed TLS handshake (an untrusted certificate, a
/// name it does not hold), no STARTTLS under `tls=required`, no AUTH
/// mechanism in common, any 5xx (a refused login: 535, 534, 530). A refused
/// or reset connection, a timeout, a name that does not resolve or a 4xx is
/// [`Probed::Unreachable`], logged as a warning.
pub async fn probe(config: &MailConfig) -> Result<Probed, MailConfigError> {
    let Some(url) = config.smtp_url.as_ref() else {
        return Ok(Probed::NoMailer);
    };
    let (parsed, _) = settings(config, url.expose())?;
    let transport = parsed.builder.build();
    let timeout = Duration::from_millis(config.smtp_timeout_ms);
    let result = tokio::time::timeout(timeout, transport.test_connection()).await;
    // Closes the pooled connection now rather than when the pool's task
    // gets to it.
    lettre::AsyncTransport::shutdown(&transport).await;
    let refused = |reason: String| MailConfigError::Refused {
        url: redact_url(url.expose()),
        reason,
    };
    let unreachable = match result {
        Ok(Ok(true)) => {
            tracing::info!(server.address = %parsed.address, "SMTP server accepts the mailer's settings");
            return Ok(Probed::Ready);
        }
        Ok(Ok(false)) => "the connection broke after the login".to_owned(),
        Ok(Err(error)) => match classify(&error) {
            Verdict::Permanent(reason) => return Err(refused(reason)),
            Verdict::Transient => error.to_string(),
        },
        Err(_) => format!(
            "no answer within SMTP_TIMEOUT_MS={}",
            config.smtp_timeout_ms
        ),
    };
    tracing::warn!(
        server.address = %parsed.address,
        error = %unreachable,
        "SMTP server not reachable at start; mails wait"
    );
    Ok(Probed::Unreachable(unreachable))
}

/// Whether waiting could fix an error of the probe.
#[derive(Debug)]
enum Verdict {
    /// Never: the reason, for the stop line.
    Permanent(String),
    Transient,
}

/// Sorts a lettre error by its kind and code (never its text). lettre
/// reports a failed TLS handshake as a connection error whose source is
/// the `io::Error` tokio-rustls wraps the `rustls::Error` in: that error
/// is found down the source chain.
fn classify(error: &Error) -> Verdict {
    if let Some(tls) = rustls_error(error) {
        let hint = match tls {
            rustls::Error::InvalidCertificate(_) => {
                " (trust the CA that signed it with SMTP_CA_FILE, or fix the host name)"
            }
            _ => "",
        };
        return Verdict::Permanent(format!("TLS handshake failed: {tls}{hint}"));
    }
    if error.is_tls() {
        return Verdict::Permanent(format!("TLS failed: {}", source_of(error)));
    }
    if error.is_client() {
        // STARTTLS not offered under tls=required, no AUTH mechanism in
        // common: the server cannot take these settings.
        return Verdict::Permanent(source_of(error));
    }
    if let (true, Some(code)) = (error.is_permanent(), error.status()) {
        // x3z replies answer AUTH (530, 534, 535, 538).
        let what = if code.category == Category::Unspecified3 {
            "the server refused the login"
        } else {
            "the server refused the connection"
        };
        return Verdict::Permanent(format!("{what}: {code} {}", source_of(error)));
    }
    Verdict::Transient
}

/// The `rustls::Error` an error was caused by, if any.
fn rustls_error(error: &Error) -> Option<&rustls::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps: look at it directly.
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        cause = current.source();
    }
    None
}

/// The text of an error's cause without lettre's kind prefix.
fn source_of(error: &Error) -> String {
    std::error::Error::source(error)
        .map(ToString::to_string)
        .unwrap_or_else(|| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretUrl;

    #[tokio::test]
    async fn no_smtp_url_is_no_mailer_and_a_closed_port_is_unreachable() {
        let config = MailConfig::default();
        assert_eq!(probe(&config).await.ok(), Some(Probed::NoMailer));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = MailConfig {
            smtp_url: Some(SecretUrl::new(format!(
                "smtps://u:secret-pw@127.0.0.1:{port}"
            ))),
            smtp_timeout_ms: 2_000,
            ..MailConfig::default()
        };
        let probed = probe(&config).await;
        assert!(
            matches!(probed, Ok(Probed::Unreachable(ref why)) if !why.contains("secret-pw")),
            "{probed:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_unreachable_within_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let port = listener.local_addr().expect("an address").port();
        let config = MailConfig {
            smtp_url: Some(SecretUrl::new(format!("smtp://127.0.0.1:{port}"))),
            smtp_timeout_ms: 300,
            ..MailConfig::default()
        };
        let started = std::time::Instant::now();
        let probed = probe(&config).await;
        drop(listener);
        assert!(matches!(probed, Ok(Probed::Unreachable(_))), "{probed:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
