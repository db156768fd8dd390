//! The SMTP transport from `SMTP_URL` and `SMTP_CA_FILE`: lettre's URL forms
//! (`smtp://`, `smtp://...?tls=required|opportunistic`, `smtps://`), checked
//! at start so that a password never travels without TLS and a bad setting
//! stops the process with one line naming it (never the password).

use std::path::Path;
use std::time::Duration;

use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, Tokio1Executor};

use super::MailConfigError;
use crate::config::redact_url;

/// The URL forms `SMTP_URL` takes, for error messages.
const FORMS: &str = "smtp://host[:port] (plain), \
     smtp://user:password@host:587?tls=required (STARTTLS), \
     smtps://user:password@host:465 (implicit TLS), ?tls=opportunistic (no credentials)";

/// How the connection is secured, from the URL's scheme and `tls` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `smtp://host`: plain text, for a relay on a trusted network.
    None,
    /// `smtp://host?tls=opportunistic`: STARTTLS if the server offers it,
    /// plain text if not.
    Opportunistic,
    /// `smtp://host?tls=required`: STARTTLS, or no connection at all.
    Required,
    /// `smtps://host`: TLS from the first byte.
    Wrapper,
}

impl TlsMode {
    /// Whether every byte after the greeting (AUTH included) is encrypted, or
    /// the connection fails: lettre falls back to plain text under
    /// `Opportunistic` when the server offers no STARTTLS, and still sends
    /// AUTH, so only these two may carry credentials.
    fn always_encrypted(self) -> bool {
        matches!(self, Self::Required | Self::Wrapper)
    }

    /// lettre's default port for the mode (as its `from_url` picks it).
    fn default_port(self) -> u16 {
        match self {
            Self::None => 25,
            Self::Opportunistic | Self::Required => 587,
            Self::Wrapper => 465,
        }
    }
}

/// A transport to build, and what the mailer shows of it.
pub struct Parsed {
    pub builder: lettre::transport::smtp::AsyncSmtpTransportBuilder,
    /// `host:port`, for the send span's `server.address`.
    pub address: String,
    pub tls: TlsMode,
}

/// The transport for `url` (lettre's own `from_url`, which also reads the
/// credentials, percent-decoded, and an EHLO name from the path), with TLS
/// that also trusts the CA in `ca_file`, and every exchange bounded by
/// `timeout`. The connection pool keeps lettre's defaults.
pub fn parse(
    url: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Parsed, MailConfigError> {
    let bad = |reason: String| MailConfigError::Url {
        url: redact_url(url),
        reason,
    };
    let malformed = |reason: String| bad(format!("{reason} (forms: {FORMS})"));
    let parts = Parts::of(url).ok_or_else(|| malformed("not scheme://host".into()))?;
    let tls = match (parts.scheme.to_ascii_lowercase().as_str(), parts.tls) {
        ("smtp", None) => TlsMode::None,
        ("smtp", Some("required")) => TlsMode::Required,
        ("smtp", Some("opportunistic")) => TlsMode::Opportunistic,
        ("smtps", None) => TlsMode::Wrapper,
        ("smtps", Some(_)) => return Err(malformed("smtps:// is TLS already: drop tls=".into())),
        ("smtp", Some(other)) => {
            return Err(malformed(format!(
                "tls={other:?}: use required or opportunistic"
            )));
        }
        (scheme, _) => return Err(malformed(format!("unknown scheme {scheme:?}"))),
    };
    if parts.host.is_empty() {
        return Err(malformed("no host".into()));
    }
    match parts.user_info {
        // lettre would silently connect without AUTH.
        Some(info) if !info.contains(':') => {
            return Err(bad("a user without a password".into()));
        }
        Some(_) if !tls.always_encrypted() => {
            return Err(bad(match tls {
                TlsMode::Opportunistic => "credentials with tls=opportunistic would be sent \
                     in the clear to a server that offers no STARTTLS: use tls=required or smtps://"
                    .into(),
                _ => "credentials need TLS (AUTH would send the password in the clear): \
                     use ?tls=required or smtps://"
                    .into(),
            }));
        }
        _ => {}
    }
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| malformed(e.to_string()))?
        .timeout(Some(timeout));
    let parameters = || tls_parameters(parts.host, ca_file);
    builder = match tls {
        TlsMode::None if ca_file.is_some() => {
            return Err(MailConfigError::CaWithoutTls(redact_url(url)));
        }
        TlsMode::None => builder,
        TlsMode::Opportunistic => builder.tls(Tls::Opportunistic(parameters()?)),
        TlsMode::Required => builder.tls(Tls::Required(parameters()?)),
        TlsMode::Wrapper => builder.tls(Tls::Wrapper(parameters()?)),
    };
    let port = parts.port.unwrap_or(tls.default_port());
    Ok(Parsed {
        builder,
        address: format!("{}:{port}", parts.host),
        tls,
    })
}

/// The parts of an SMTP URL the checks above need, cut where the `url`
/// crate (which lettre's `from_url` parses with) cuts them: the authority
/// ends at the first `/`, `?` or `#`, its user info at the last `@`. Any
/// user info counts as credentials, even where lettre would find none: a
/// disagreement can only refuse a URL, never let a password out.
struct Parts<'a> {
    scheme: &'a str,
    user_info: Option<&'a str>,
    /// As lettre's `host_str()`: an IPv6 address keeps its brackets.
    host: &'a str,
    port: Option<u16>,
    /// The first `tls=` query parameter's value, as lettre reads it.
    tls: Option<&'a str>,
}

impl<'a> Parts<'a> {
    fn of(url: &'a str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (user_info, host_port) = match authority.rsplit_once('@') {
            Some((info, host_port)) => (Some(info), host_port),
            None => (None, authority),
        };
        let (host, port) = match host_port.rfind([':', ']']) {
            Some(i) if host_port[i..].starts_with(':') => (&host_port[..i], &host_port[i + 1..]),
            _ => (host_port, ""),
        };
        let query = tail.split('#').next().and_then(|t| t.split_once('?'));
        let tls = query.and_then(|(_, query)| {
            query.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == "tls").then_some(value)
            })
        });
        Some(Self {
            scheme,
            user_info,
            host,
            port: port.parse().ok(),
            tls,
        })
    }
}

/// TLS to `host` (its name checked against the certificate), trusting the
/// system's roots, as every other connection of the service does (not the
/// webpki-roots bundle lettre would default to), plus the CA certificates
/// in `ca_file`.
fn tls_parameters(host: &str, ca_file: Option<&Path>) -> Result<TlsParameters, MailConfigError> {
    let mut builder =
        TlsParameters::builder(host.to_owned()).certificate_store(CertificateStore::None);
    // The system's roots that rustls takes (one that does not parse is left
    // out, or lettre would refuse the whole set); none at all (an image
    // without ca-certificates) leaves only SMTP_CA_FILE.
    for der in outbox_common::tls::system_roots() {
        let root = Certificate::from_der(der.to_vec())
            .map_err(|e| MailConfigError::Tls(format!("a system root: {e}")))?;
        builder = builder.add_root_certificate(root);
    }
    if let Some(path) = ca_file {
        for certificate in ca_certificates(path)? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| match ca_file {
        Some(path) => MailConfigError::CaFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        },
        None => MailConfigError::Tls(e.to_string()),
    })
}

/// The certificates of `SMTP_CA_FILE` for lettre: at least one (lettre's
/// `Certificate::from_pem` would take a file without any and trust nothing).
fn ca_certificates(path: &Path) -> Result<Vec<Certificate>, MailConfigError> {
    outbox_common::tls::pem_certificates(path)
        .map_err(MailConfigError::CaPem)?
        .into_iter()
        .map(|der| {
            Certificate::from_der(der.to_vec()).map_err(|e| MailConfigError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
