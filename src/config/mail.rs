//! The e-mail domain's settings: the mailer's, and the demo's failure rate
//! and poison product.

use std::path::PathBuf;
use std::time::Duration;

use super::{SecretUrl, WEEK_SECS};

/// The e-mail consumer's and the mailer's settings: SMTP delivery of the
/// e-mail outbox, and the share of e-mail events refused in a demo.
#[derive(Debug, Clone, clap::Args)]
pub struct MailConfig {
    /// SMTP server, in lettre's URL forms:
    /// `smtps://user:password@host:465` (implicit TLS),
    /// `smtp://user:password@host:587?tls=required` (STARTTLS, or no
    /// connection), `smtp://host?tls=opportunistic` (STARTTLS if offered,
    /// else plain; no credentials), `smtp://host:port` (plain, for a relay on
    /// a trusted network; no credentials). Credentials only with TLS: AUTH
    /// never goes in the clear. A user or password with `@`, `:` or `/` is
    /// percent-encoded. Unset: the mailer is off and notifications are only
    /// recorded.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<SecretUrl>,
    /// A PEM file of CA certificates to trust for SMTP's TLS, besides the
    /// system's roots (a relay with a private CA or a self-signed
    /// certificate). Unreadable, or without a certificate: the role stops at
    /// start.
    #[arg(long, env = "SMTP_CA_FILE")]
    pub smtp_ca_file: Option<PathBuf>,
    /// The sender of every mail.
    #[arg(
        long,
        env = "EMAIL_FROM",
        default_value = "order-service <orders@example.com>"
    )]
    pub email_from: String,
    /// Mails go to `<userId>@<this domain>`.
    #[arg(long, env = "EMAIL_RECIPIENT_DOMAIN", default_value = "example.com")]
    pub email_recipient_domain: String,
    /// Mails sent at once.
    #[arg(long, env = "MAILER_CONCURRENCY", default_value_t = 8)]
    pub mailer_concurrency: usize,
    /// Longest one SMTP exchange may take (ms).
    #[arg(long, env = "SMTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub smtp_timeout_ms: u64,
    /// Sent mails are deleted from the mails' outbox after this (seconds);
    /// mails given up on (a 5xx) stay for an operator to look at.
    #[arg(long, env = "MAIL_RETENTION_SECS", default_value_t = WEEK_SECS)]
    pub mail_retention_secs: u64,
    /// Share of e-mail events the handler refuses, 0.0 to 1.0, to watch
    /// retries and dead letters in a demo (before any mail is written).
    #[arg(long, env = "EMAIL_FAILURE_RATE", default_value_t = 0.0)]
    pub email_failure_rate: f64,
    /// A product id whose orders' `order.created` the e-mail handler always
    /// refuses: a poison event in a demo or a test, which goes through the
    /// retries to the DLQ while the order's later events are accepted.
    /// Unset: none.
    #[arg(long, env = "EMAIL_POISON_PRODUCT")]
    pub email_poison_product: Option<String>,
    /// Whether the e-mail consumer applies one order's events in sequence
    /// (holding one that comes before its predecessor); `false` applies
    /// them as they arrive (to measure what the order costs).
    #[arg(long, env = "EMAIL_IN_SEQUENCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub email_in_sequence: bool,
}

impl MailConfig {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.mail_retention_secs)
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            smtp_ca_file: None,
            email_from: "order-service <orders@example.com>".into(),
            email_recipient_domain: "example.com".into(),
            mailer_concurrency: 8,
            smtp_timeout_ms: 10_000,
            mail_retention_secs: WEEK_SECS,
            email_failure_rate: 0.0,
            email_poison_product: None,
            email_in_sequence: true,
        }
    }
}
