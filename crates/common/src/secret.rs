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
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(SecretString::from(url.into()))
    }

    /// The real URL, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The URL with any password replaced by `***` (each URL of a
    /// comma-separated list): [`redact_url`].
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
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
/// `password=` query parameter (which libpq and sqlx accept), with `***`;
/// in each URL of a comma-separated list.
///
/// A password is whatever lies between the first `:` after `://` and the
/// last `@` before the query, so a password with a raw `/`, `,`, `:` or `@`
/// (not percent-encoded, as a user may well write it) is still replaced.
pub fn redact_url(url: &str) -> String {
    split_list(url)
        .into_iter()
        .map(|one| redact_query(&redact_userinfo(one)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The URLs of a comma-separated list. A comma starts a new URL only where
/// a `scheme://` follows it: a comma inside a password, a path or a query
/// stays in its URL.
pub fn split_list(list: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (comma, _) in list.match_indices(',') {
        if begins_with_scheme(list[comma + 1..].trim_start()) {
            urls.push(&list[start..comma]);
            start = comma + 1;
        }
    }
    urls.push(&list[start..]);
    urls
}

/// Whether `text` begins with `scheme://` (RFC 3986: a letter, then
/// letters, digits, `+`, `-` or `.`).
fn begins_with_scheme(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
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
    let Some(at) = userinfo_end(rest) else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Where the userinfo of `rest` (the URL after `://`) ends: the last `@`
/// before the query or fragment. Failing that, a `?` or `#` may be part of
/// the password (`app:a?b@db`): then the last `@` of the URL, if what
/// follows the first `:` is no port (digits up to `/`, `?`, `#` or the end).
fn userinfo_end(rest: &str) -> Option<usize> {
    let query = rest.find(['?', '#']).unwrap_or(rest.len());
    if let Some(at) = rest[..query].rfind('@') {
        return Some(at);
    }
    let at = rest.rfind('@')?;
    let colon = rest[..at].find(':')?;
    let after = &rest[colon + 1..];
    let port = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
    let is_port = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (!is_port).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/app"),
            "postgres://app:***@db:5432/app"
        );
        assert_eq!(
            redact_url("amqp://guest:p@ss@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
        assert_eq!(
            redact_url("postgres://app@db/app?sslmode=disable&password=hunter2"),
            "postgres://app@db/app?sslmode=disable&password=***"
        );
        let s = SecretUrl::new("postgres://u:topsecret@h/d");
        assert!(!format!("{s:?} {s}").contains("topsecret"));
        let cluster = SecretUrl::new("amqp://u:one@a:5672/%2f,amqp://u:two@b:5672/%2f");
        assert_eq!(
            cluster.redacted(),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
    }

    #[test]
    fn a_password_with_a_comma_is_redacted_whole() {
        let url = SecretUrl::new("postgres://app:a,b@db/o");
        assert_eq!(url.redacted(), "postgres://app:***@db/o");
        assert_eq!(
            redact_url("postgres://app:a,b@db/o"),
            "postgres://app:***@db/o"
        );
        let cluster = SecretUrl::new("amqp://u:x,y@a/%2f,amqps://u:,z,@b/%2f?verify=verify_peer");
        assert_eq!(
            cluster.redacted(),
            "amqp://u:***@a/%2f,amqps://u:***@b/%2f?verify=verify_peer"
        );
    }

    #[test]
    fn a_cluster_list_splits_only_before_a_new_url() {
        assert_eq!(
            split_list("amqp://u:x,y@a/%2f, amqps://u:p@b/%2f"),
            vec!["amqp://u:x,y@a/%2f", " amqps://u:p@b/%2f"]
        );
        let config = crate::amqp::AmqpConfig::new("amqp://u:x,y@a/%2f, amqp://u:p@b/%2f");
        assert_eq!(
            config.urls(),
            vec!["amqp://u:x,y@a/%2f", "amqp://u:p@b/%2f"]
        );
    }

    #[test]
    fn a_password_with_a_slash_colon_or_at_is_redacted_whole() {
        for (url, redacted) in [
            ("postgres://app:ab/cd@db/o", "postgres://app:***@db/o"),
            (
                "postgres://app:a/b@c/d@db:5432/o",
                "postgres://app:***@db:5432/o",
            ),
            (
                "postgres://app:a:b@db/o?sslmode=require",
                "postgres://app:***@db/o?sslmode=require",
            ),
            ("postgres://app:a?b@db/o", "postgres://app:***@db/o"),
            ("postgres://app:a#b@db/o", "postgres://app:***@db/o"),
        ] {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn what_is_no_password_is_left_alone() {
        for url in [
            "postgres://db:5432/o?application_name=a@b",
            "postgres://app@db/o?options=-c%20x=y",
            "postgres://db/o?sslrootcert=/etc/ssl/a,b.pem",
            "not a url, at all",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }
}
