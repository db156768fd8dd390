//! `DATABASE_URL` read into sqlx's connect options, checked before the first
//! connection: libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`) as libpq means them, and the TLS files readable, so a typo is a
//! clear stop at start rather than an error sqlx reports as a lost
//! connection at every attempt.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::StartError;
use crate::config::SecretUrl;

/// Every statement of the service is bounded in time: a silent network
/// partition or a lock queue (behind an `ALTER`, say) fails the work, which
/// is then retried as an outage, instead of holding it forever.
const STATEMENT_TIMEOUT: &str = "30s";
const LOCK_TIMEOUT: &str = "10s";

/// The TLS files `DATABASE_URL` may name: the parameter, sqlx's aliases of
/// it, and libpq's environment variable that sqlx reads when it is absent.
const ROOT_CERT: TlsFile = TlsFile {
    param: "sslrootcert",
    aliases: &["sslrootcert", "ssl-root-cert", "ssl-ca"],
    env: "PGSSLROOTCERT",
};
const CLIENT_CERT: TlsFile = TlsFile {
    param: "sslcert",
    aliases: &["sslcert", "ssl-cert"],
    env: "PGSSLCERT",
};
const CLIENT_KEY: TlsFile = TlsFile {
    param: "sslkey",
    aliases: &["sslkey", "ssl-key"],
    env: "PGSSLKEY",
};

struct TlsFile {
    param: &'static str,
    aliases: &'static [&'static str],
    env: &'static str,
}

/// The connection options of `url`, with the time limits above. An error
/// names `DATABASE_URL` (redacted) and never echoes the password.
pub(super) fn connect_options(url: &SecretUrl) -> Result<PgConnectOptions, StartError> {
    let config_error = |reason: String| StartError::Config {
        url: url.redacted(),
        reason,
    };
    let mut options: PgConnectOptions = url
        .expose()
        .parse()
        .map_err(|e: sqlx::Error| config_error(scrub(&e.to_string(), url)))?;

    let query = query_pairs(url.expose());
    let root_cert = ROOT_CERT.value(&query);
    // libpq: "if a root CA file exists, the behavior of sslmode=require will
    // be the same as that of verify-ca". sqlx documents the same but never
    // verifies under `require`, so a CA the user names would go unused.
    if matches!(options.get_ssl_mode(), PgSslMode::Require) && root_cert.is_some() {
        options = options.ssl_mode(PgSslMode::VerifyCa);
    }

    if let Some(path) = &root_cert {
        check_certificates(ROOT_CERT.param, path).map_err(config_error)?;
    }
    match (CLIENT_CERT.value(&query), CLIENT_KEY.value(&query)) {
        (Some(cert), Some(key)) => {
            check_certificates(CLIENT_CERT.param, &cert).map_err(config_error)?;
            check_key(CLIENT_KEY.param, &key).map_err(config_error)?;
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(config_error(
                "sslcert and sslkey go together: give both, or neither".into(),
            ));
        }
    }

    Ok(options.options([
        ("statement_timeout", STATEMENT_TIMEOUT),
        ("lock_timeout", LOCK_TIMEOUT),
    ]))
}

/// The name of `mode` as libpq spells it, for messages.
pub(super) fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

impl TlsFile {
    /// The file this parameter names: the URL's (the last one, as sqlx
    /// reads them in order), else the environment's. An inline PEM in the
    /// environment (which sqlx accepts) is no file to check.
    fn value(&self, query: &[(String, String)]) -> Option<String> {
        let from_url = query
            .iter()
            .rev()
            .find(|(key, _)| self.aliases.contains(&key.as_str()))
            .map(|(_, value)| value.clone());
        from_url.or_else(|| {
            std::env::var(self.env)
                .ok()
                .filter(|v| !v.trim_start().starts_with("-----BEGIN"))
        })
    }
}

fn read(param: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("{param} {path} cannot be read: {e}"))
}

/// `path` holds at least one PEM certificate.
fn check_certificates(param: &str, path: &str) -> Result<(), String> {
    let pem = read(param, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{param} {path} is not valid PEM: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("{param} {path} holds no PEM certificate"));
    }
    Ok(())
}

/// `path` holds a PEM private key.
fn check_key(param: &str, path: &str) -> Result<(), String> {
    let pem = read(param, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map(|_| ())
        .map_err(|e| format!("{param} {path} holds no usable PEM private key: {e}"))
}

/// The query of `url` as decoded key/value pairs (form encoding, as sqlx's
/// URL parser reads it). By hand because the `url` crate is not a direct
/// dependency; sqlx parses the same URL, this only finds the file names.
fn query_pairs(url: &str) -> Vec<(String, String)> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], escaped) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (other, _) => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `message` without the URL's password, should a parser ever echo it.
fn scrub(message: &str, url: &SecretUrl) -> String {
    let password = url
        .expose()
        .split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(password) => message.replace(password, "***"),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_decoded_as_sqlx_reads_it() {
        let pairs =
            query_pairs("postgres://u:p@h/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fa+b.pem");
        assert_eq!(
            pairs,
            vec![
                ("sslmode".into(), "verify-full".into()),
                ("sslrootcert".into(), "/etc/a b.pem".into()),
            ]
        );
    }

    #[test]
    fn require_with_a_root_certificate_verifies_it_as_libpq_does() {
        let ca = std::env::temp_dir().join(format!("os-ca-{}.pem", uuid::Uuid::new_v4()));
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let url = SecretUrl::new(format!(
            "postgres://u:p@h/d?sslmode=require&sslrootcert={}",
            ca.display()
        ));
        let mode = connect_options(&url).map(|o| o.get_ssl_mode());
        std::fs::remove_file(&ca).unwrap();
        assert!(matches!(mode, Ok(PgSslMode::VerifyCa)), "{mode:?}");
    }

    #[test]
    fn an_unreadable_tls_file_names_the_parameter_and_not_the_password() {
        let url =
            SecretUrl::new("postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=/nope/ca.pem");
        let error = connect_options(&url).unwrap_err().to_string();
        assert!(error.starts_with("DATABASE_URL"), "{error}");
        assert!(
            error.contains("sslrootcert /nope/ca.pem cannot be read"),
            "{error}"
        );
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn a_bad_sslmode_is_a_configuration_error() {
        let url = SecretUrl::new("postgres://u:hunter2@h/d?sslmode=verify_full");
        let error = connect_options(&url).unwrap_err().to_string();
        assert!(error.contains("verify_full"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
