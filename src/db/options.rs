//! `DATABASE_URL` read into sqlx's connect options, checked before the first
//! connection: libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`) as close to libpq's meaning as sqlx allows (no `verify-ca`: see
//! [`NO_VERIFY_CA`]), and the TLS files readable, so a typo is a clear stop
//! at start rather than an error sqlx reports as a lost connection at every
//! attempt.

use std::path::Path;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::StartError;
use crate::config::{SecretUrl, redact_url};
use outbox_common::tls::{self, PemFileError};

/// Every statement of the service is bounded in time: a silent network
/// partition or a lock queue (behind an `ALTER`, say) fails the work, which
/// is then retried as an outage, instead of holding it forever.
const STATEMENT_TIMEOUT: &str = "30s";
const LOCK_TIMEOUT: &str = "10s";

/// Why `sslmode=verify-ca` is refused. sqlx adds `sslrootcert` to the
/// system's roots rather than trusting it alone as libpq does, and skips
/// the host-name check under `verify-ca`: a private CA's `verify-ca` would
/// accept any publicly trusted certificate, for any name.
const NO_VERIFY_CA: &str = "sslmode=verify-ca is not supported by this build: its root store \
    also holds the system's roots, so without the host-name check any public certificate would \
    pass; use verify-full";

/// The `sslmode` of a URL: the parameter and sqlx's alias of it, and
/// libpq's environment variable that sqlx reads when it is absent.
const SSL_MODE: Param = Param {
    name: "sslmode",
    aliases: &["sslmode", "ssl-mode"],
    env: "PGSSLMODE",
};
/// The TLS files `DATABASE_URL` may name, likewise.
pub(super) const ROOT_CERT: Param = Param {
    name: "sslrootcert",
    aliases: &["sslrootcert", "ssl-root-cert", "ssl-ca"],
    env: "PGSSLROOTCERT",
};
pub(super) const CLIENT_CERT: Param = Param {
    name: "sslcert",
    aliases: &["sslcert", "ssl-cert"],
    env: "PGSSLCERT",
};
pub(super) const CLIENT_KEY: Param = Param {
    name: "sslkey",
    aliases: &["sslkey", "ssl-key"],
    env: "PGSSLKEY",
};

pub(super) struct Param {
    name: &'static str,
    aliases: &'static [&'static str],
    env: &'static str,
}

/// `DATABASE_URL` read: sqlx's options, and the `sslmode` they verify the
/// server with, as messages name it.
pub(super) struct Options {
    pub connect: PgConnectOptions,
    pub sslmode: &'static str,
}

/// The connection options of `url`, with the time limits above. An error
/// names `DATABASE_URL` (redacted) and never echoes the password.
pub(super) fn connect_options(url: &SecretUrl) -> Result<Options, StartError> {
    let config_error = |reason: String| StartError::Config {
        url: url.redacted(),
        reason,
    };
    let mut options: PgConnectOptions = url
        .expose()
        .parse()
        .map_err(|e: sqlx::Error| config_error(redact_url(&e.to_string())))?;

    let query = query_pairs(url.expose());
    let mut sslmode = mode_name(options.get_ssl_mode());
    match options.get_ssl_mode() {
        PgSslMode::VerifyCa => {
            let from_env = SSL_MODE.in_url(&query).is_none();
            let origin = if from_env { " (from PGSSLMODE)" } else { "" };
            return Err(config_error(format!("{NO_VERIFY_CA}{origin}")));
        }
        // libpq: "if a root CA file exists, the behavior of sslmode=require
        // will be the same as that of verify-ca". sqlx never verifies under
        // `require`, so a CA the user names would go unused; and its
        // verify-ca is unsafe (above), so the check is verify-full's.
        PgSslMode::Require if ROOT_CERT.given(&query) => {
            options = options.ssl_mode(PgSslMode::VerifyFull);
            sslmode = "require with sslrootcert, verified as verify-full";
        }
        _ => {}
    }

    if let Some(path) = ROOT_CERT.file(&query) {
        tls::pem_certificates(Path::new(&path))
            .map_err(|e| config_error(file_error(ROOT_CERT.name, e)))?;
    }
    match (CLIENT_CERT.file(&query), CLIENT_KEY.file(&query)) {
        (Some(cert), Some(key)) => {
            tls::pem_certificates(Path::new(&cert))
                .map_err(|e| config_error(file_error(CLIENT_CERT.name, e)))?;
            tls::pem_private_key(Path::new(&key))
                .map_err(|e| config_error(file_error(CLIENT_KEY.name, e)))?;
        }
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            return Err(config_error(
                "sslcert and sslkey go together: give both, or neither".into(),
            ));
        }
    }

    Ok(Options {
        connect: options.options([
            ("statement_timeout", STATEMENT_TIMEOUT),
            ("lock_timeout", LOCK_TIMEOUT),
        ]),
        sslmode,
    })
}

/// A TLS file's error with the parameter that names it.
fn file_error(param: &str, error: PemFileError) -> String {
    match error {
        PemFileError::Read { path, source } => format!("{param} {path} cannot be read: {source}"),
        content @ PemFileError::Content { .. } => format!("{param} {content}"),
    }
}

/// The name of `mode` as libpq spells it, for messages.
fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

impl Param {
    /// The URL's value (the last one, as sqlx reads them in order).
    fn in_url(&self, query: &[(String, String)]) -> Option<String> {
        query
            .iter()
            .rev()
            .find(|(key, _)| self.aliases.contains(&key.as_str()))
            .map(|(_, value)| value.clone())
    }

    /// Whether the URL or the environment gives a value.
    fn given(&self, query: &[(String, String)]) -> bool {
        self.in_url(query).is_some() || std::env::var_os(self.env).is_some()
    }

    /// The file this parameter names: the URL's, else the environment's.
    /// An inline PEM in the environment (which sqlx accepts) is no file to
    /// check.
    pub(super) fn file(&self, query: &[(String, String)]) -> Option<String> {
        self.in_url(query).or_else(|| {
            std::env::var(self.env)
                .ok()
                .filter(|v| !v.trim_start().starts_with("-----BEGIN"))
        })
    }
}

/// The query of `url` as decoded key/value pairs (form encoding, as sqlx's
/// URL parser reads it). By hand because the `url` crate is not a direct
/// dependency; sqlx parses the same URL, this only finds the file names.
pub(super) fn query_pairs(url: &str) -> Vec<(String, String)> {
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

/// Form decoding, as sqlx's URL parser reads a query: `+` is a space, then
/// `%XX` escapes (so `%2B` stays a `+`).
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests;
