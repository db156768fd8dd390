//! The mailer's settings.

use std::time::Duration;

use super::{SecretUrl, WEEK_SECS};

/// The mailer: SMTP delivery of the e-mail outbox.
#[derive(Debug, Clone, clap::Args)]
pub struct MailConfig {
    /// SMTP server, `smtp://host:port` (plain SMTP; this build links no TLS).
    /// Unset: the mailer is off and notifications are only recorded.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<SecretUrl>,
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
            email_from: "order-service <orders@example.com>".into(),
            email_recipient_domain: "example.com".into(),
            mailer_concurrency: 8,
            smtp_timeout_ms: 10_000,
            mail_retention_secs: WEEK_SECS,
        }
    }
}
