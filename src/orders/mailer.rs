//! The mailer's SMTP side: the sink of the mails' outbox. Each row is one
//! mail; its `transaction_id` (the event's id) becomes the `Message-ID`, so a
//! mail sent again after a crash between the send and the mark is the same
//! mail to every client and provider.

use std::sync::LazyLock;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::MailConfig;
use crate::metrics::Metrics;
use crate::telemetry::propagation;
use outbox::{OutboxRow, Table};
use outbox::{Sink, SinkError};

mod probe;
mod transport;

pub use probe::{Probed, probe};

/// The mails' outbox.
pub static MAILS: LazyLock<Table> = LazyLock::new(|| Table::named("mail_outbox"));

/// The body of a mail outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRow {
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// The `Message-ID` of the mail of event `id`: the same on every resend.
pub fn message_id(id: uuid::Uuid) -> String {
    format!("<{id}@order-service>")
}

/// Why the mailer cannot start: each names its setting, and none shows a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    /// A URL lettre cannot use, or credentials that could go unencrypted.
    #[error("SMTP_URL: {reason}; got {url}")]
    Url {
        /// The URL with its password replaced.
        url: String,
        reason: String,
    },
    /// The CA file cannot be read, or holds no certificate rustls takes.
    #[error("SMTP_CA_FILE {path}: {reason}")]
    CaFile { path: String, reason: String },
    /// The CA file cannot be read, or holds no PEM certificate.
    #[error("SMTP_CA_FILE {0}")]
    CaPem(#[source] outbox_common::tls::PemFileError),
    /// A CA to trust for a connection that has no TLS: a mistake.
    #[error(
        "SMTP_CA_FILE is set, but SMTP_URL {0} asks for no TLS (add ?tls=required or use smtps://)"
    )]
    CaWithoutTls(String),
    /// rustls refused the TLS settings.
    #[error("SMTP_URL: setting up TLS: {0}")]
    Tls(String),
    /// The server refuses the settings for good (found by [`probe`]).
    #[error("SMTP_URL: {reason}; server {url}")]
    Refused {
        /// The URL with its password replaced.
        url: String,
        reason: String,
    },
    /// The sender does not parse as a mailbox.
    #[error("EMAIL_FROM {0:?} is not a mailbox: {1}")]
    From(String, String),
}

/// Checks the mailer's settings without connecting anywhere: called before
/// a role connects to anything, so that a bad `SMTP_URL`, `SMTP_CA_FILE` or
/// `EMAIL_FROM` stops the process at once, even while Postgres is not up.
pub fn check(config: &MailConfig) -> Result<(), MailConfigError> {
    match config.smtp_url.as_ref() {
        Some(url) => settings(config, url.expose()).map(drop),
        None => Ok(()),
    }
}

/// The transport of `url` and the sender, from the settings.
fn settings(
    config: &MailConfig,
    url: &str,
) -> Result<(transport::Parsed, Mailbox), MailConfigError> {
    let parsed = transport::parse(
        url,
        config.smtp_ca_file.as_deref(),
        Duration::from_millis(config.smtp_timeout_ms),
    )?;
    let from = config
        .email_from
        .parse()
        .map_err(|e: lettre::address::AddressError| {
            MailConfigError::From(config.email_from.clone(), e.to_string())
        })?;
    Ok((parsed, from))
}

/// Sends mails over SMTP with lettre.
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// `host:port`, for the send span.
    host: String,
    metrics: std::sync::Arc<Metrics>,
}

impl Smtp {
    /// The transport for `url` (the value of `config.smtp_url`), trusting
    /// `config.smtp_ca_file` too; see [`MailConfig::smtp_url`] for the forms.
    /// Connects to nothing: the SMTP server need not be up yet.
    pub fn new(
        config: &MailConfig,
        url: &str,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, MailConfigError> {
        let (parsed, from) = settings(config, url)?;
        tracing::info!(server.address = %parsed.address, tls = ?parsed.tls, "SMTP transport");
        Ok(Self {
            transport: parsed.builder.build(),
            from,
            host: parsed.address,
            metrics,
        })
    }

    fn message(&self, row: &OutboxRow, mail: &MailRow) -> Result<Message, SinkError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|e| SinkError::Permanent(format!("bad recipient {:?}: {e}", mail.to)))?;
        Message::builder()
            .message_id(Some(message_id(row.transaction_id)))
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())
            .map_err(|e| SinkError::Permanent(format!("building the mail: {e}")))
    }
}

impl Sink for Smtp {
    async fn deliver(&self, row: &OutboxRow) -> Result<(), SinkError> {
        let span = smtp_span(&self.host, row);
        let result = async {
            let mail: MailRow = serde_json::from_str(&row.payload)
                .map_err(|e| SinkError::Permanent(format!("not a mail row: {e}")))?;
            let message = self.message(row, &mail)?;
            match self.transport.send(message).await {
                Ok(_) => Ok(()),
                Err(error) if refuses_the_mail(&error) => {
                    Err(SinkError::Permanent(error.to_string()))
                }
                Err(error) => Err(SinkError::Temporary(error.to_string())),
            }
        }
        .instrument(span.clone())
        .await;
        match &result {
            Ok(()) => {
                self.metrics.mail_sent.inc();
            }
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                tracing::warn!(parent: &span, %error, "mail not sent");
                self.metrics.mail_failed.inc();
            }
        }
        result
    }
}

/// Whether the server refused this mail for good: a 5xx about the mailbox
/// (550, 551, 552, 553). A 5xx that says the server takes nothing from us
/// (530/535 authentication, 521, 554 at the greeting) would give up every
/// pending mail: it is retried with backoff instead, and shows in
/// `last_error` and the logs. So is every error without an SMTP code: a
/// refused connection, a failed TLS handshake or an untrusted certificate,
/// a server that offers no STARTTLS under `tls=required`, no AUTH mechanism
/// in common.
fn refuses_the_mail(error: &lettre::transport::smtp::Error) -> bool {
    use lettre::transport::smtp::response::{Category, Detail, Severity};
    let Some(code) = error.status() else {
        return false;
    };
    error.is_permanent()
        && code.severity == Severity::PermanentNegativeCompletion
        && code.category == Category::MailSystem
        && matches!(
            code.detail,
            Detail::Zero | Detail::One | Detail::Two | Detail::Three
        )
}

/// The CLIENT span of one SMTP send, in the trace of the event it tells of.
fn smtp_span(host: &str, row: &OutboxRow) -> tracing::Span {
    let span = tracing::info_span!(
        "smtp send",
        otel.name = "smtp send",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        server.address = %host,
        email.message_id = %message_id(row.transaction_id),
        email.event_type = %row.event_type,
        outbox.attempts = row.attempts,
    );
    let _ = span.set_parent(propagation::context_from_json(&row.headers));
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    // lettre's connection pool needs a runtime to start in.
    #[tokio::test]
    async fn a_transport_is_built_for_each_form_without_connecting() {
        let config = MailConfig::default();
        for url in [
            "smtp://127.0.0.1:1",
            "smtp://127.0.0.1:1?tls=opportunistic",
            "smtp://user:pw@127.0.0.1:1?tls=required",
            "smtps://user:pw@127.0.0.1:1",
        ] {
            let smtp = Smtp::new(&config, url, Default::default());
            assert!(smtp.is_ok(), "{url}: {:?}", smtp.err());
        }
        let config = MailConfig {
            email_from: "not a mailbox".into(),
            ..MailConfig::default()
        };
        let error = Smtp::new(&config, "smtp://mail", Default::default()).err();
        assert!(
            matches!(error, Some(MailConfigError::From(..))),
            "{error:?}"
        );
    }

    #[test]
    fn the_message_id_is_the_events_id() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(message_id(id), format!("<{id}@order-service>"));
    }
}
