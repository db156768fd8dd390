//! The mailer's SMTP side: the sink of the mails' outbox. Each row is one
//! mail; its `transaction_id` (the event's id) becomes the `Message-ID`, so a
//! mail sent again after a crash between the send and the mark is the same
//! mail to every client and provider.

use std::sync::LazyLock;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::MailConfig;
use crate::metrics::Metrics;
use crate::outbox::dispatch::{Sink, SinkError};
use crate::outbox::store::{OutboxRow, Table};
use crate::telemetry::propagation;

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

/// Why the mailer cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MailConfigError {
    #[error(
        "SMTP_URL must be smtp://[user:password@]host[:port] (this build links no TLS), got {0}"
    )]
    Url(String),
    #[error("EMAIL_FROM {0:?} is not a mailbox: {1}")]
    From(String, String),
}

/// Sends mails over SMTP with lettre.
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    host: String,
    metrics: std::sync::Arc<Metrics>,
}

impl Smtp {
    /// The transport for `config.smtp_url`, which must be set.
    pub fn new(
        config: &MailConfig,
        url: &str,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, MailConfigError> {
        let redacted = || crate::config::redact_url(url);
        let rest = url
            .strip_prefix("smtp://")
            .ok_or_else(|| MailConfigError::Url(redacted()))?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((user_info, host_port)) => {
                let (user, password) = user_info.split_once(':').unwrap_or((user_info, ""));
                (
                    Some(Credentials::new(user.to_owned(), password.to_owned())),
                    host_port,
                )
            }
            None => (None, authority),
        };
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse().map_err(|_| MailConfigError::Url(redacted()))?,
            ),
            None => (host_port, 25),
        };
        if host.is_empty() {
            return Err(MailConfigError::Url(redacted()));
        }
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_millis(config.smtp_timeout_ms)));
        if let Some(credentials) = credentials {
            builder = builder.credentials(credentials);
        }
        let from = config
            .email_from
            .parse()
            .map_err(|e: lettre::address::AddressError| {
                MailConfigError::From(config.email_from.clone(), e.to_string())
            })?;
        Ok(Self {
            transport: builder.build(),
            from,
            host: format!("{host}:{port}"),
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
/// (530/535 authentication, 521, 554 at the greeting)
/// would give up every pending mail: it is retried with backoff instead, and
/// shows in `last_error` and the logs.
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

    fn smtp(url: &str) -> Result<Smtp, MailConfigError> {
        Smtp::new(&MailConfig::default(), url, Default::default())
    }

    // lettre's connection pool needs a runtime to start in.
    #[tokio::test]
    async fn only_plain_smtp_urls_are_accepted_and_a_password_is_never_echoed() {
        assert!(smtp("smtp://127.0.0.1:1025").is_ok());
        assert!(smtp("smtp://mailpit").is_ok());
        assert!(smtp("smtp://user:pw@mailpit:1025").is_ok());
        let error = smtp("smtps://user:hunter2@mail:465")
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("smtp://"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(smtp("smtp://:1025").is_err());
    }

    #[test]
    fn the_message_id_is_the_events_id() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(message_id(id), format!("<{id}@order-service>"));
    }
}
