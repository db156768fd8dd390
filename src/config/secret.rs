//! Connection URLs that may carry a password: never printed as they are.

use std::fmt;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};

/// A connection URL that may carry a password, kept in a
/// [`secrecy::SecretString`] (zeroed on drop, never printed). `Debug` and
/// `Display` print it with the password replaced, so it can never reach a
/// log by accident.
#[derive(Clone)]
pub struct SecretUrl(SecretString);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(SecretString::from(url.into()))
    }

    /// The real URL, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with any password replaced by `***` (each URL of a
    /// comma-separated list).
    pub fn redacted(&self) -> String {
        self.expose()
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl PartialEq for SecretUrl {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of `scheme://user:password@host/...`, and a
/// `password=` query parameter (which libpq and sqlx accept), with `***`.
pub fn redact_url(url: &str) -> String {
    redact_query(&redact_userinfo(url))
}

fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
        assert_eq!(
            redact_url("amqp://guest:p@ss@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("postgres://db/orders"), "postgres://db/orders");
        assert_eq!(
            redact_url("postgres://app@db/orders?sslmode=disable&password=hunter2"),
            "postgres://app@db/orders?sslmode=disable&password=***"
        );
        let s = SecretUrl::new("postgres://u:topsecret@h/d");
        assert!(!format!("{s:?} {s}").contains("topsecret"));
        let cluster = SecretUrl::new("amqp://u:one@a:5672/%2f,amqp://u:two@b:5672/%2f");
        assert_eq!(
            cluster.redacted(),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
    }
}
