//! One node's `AMQP_URL`, read as RabbitMQ's URI spec writes it: lapin's
//! parser takes the connection parameters (`heartbeat`, `frame_max`, ...),
//! and the TLS parameters it does not know (`cacertfile`, `certfile`,
//! `keyfile`, `verify`, `server_name_indication`) are taken out here, before
//! the URL reaches it.

use std::path::PathBuf;

use lapin::uri::{AMQPScheme, AMQPUri};

use super::tls::{TlsOptions, Verify};
use crate::secret::redact_url;

/// The query parameters lapin reads itself; they are passed on to it.
const LAPIN_PARAMS: [&str; 5] = [
    "heartbeat",
    "frame_max",
    "channel_max",
    "connection_timeout",
    "auth_mechanism",
];

/// A node's URL, parsed: what lapin connects to, and how TLS is set up.
#[derive(Clone)]
pub struct NodeUrl {
    /// The URL without the TLS parameters, parsed by lapin.
    pub uri: AMQPUri,
    /// `Some` exactly for `amqps://`: such a URL never connects without TLS.
    pub tls: Option<TlsOptions>,
    /// The URL as given, password replaced, for messages.
    pub redacted: String,
}

/// The URL redacted: the parsed one holds the password.
impl std::fmt::Debug for NodeUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeUrl")
            .field("url", &self.redacted)
            .field("tls", &self.tls)
            .finish()
    }
}

impl NodeUrl {
    /// Parses one URL of the list. The error names the URL (redacted) and
    /// the parameter at fault, never the password.
    pub fn parse(url: &str) -> Result<Self, String> {
        let redacted = redact_url(url);
        let fail = |why: String| format!("{redacted}: {why}");
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut passed = Vec::new();
        let mut tls = TlsOptions::default();
        let mut tls_params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            if LAPIN_PARAMS.contains(&key) {
                passed.push(pair);
                continue;
            }
            let value = percent_decode(raw).map_err(|why| fail(format!("{key}: {why}")))?;
            match key {
                "cacertfile" => tls.cacertfile = Some(PathBuf::from(value)),
                "certfile" => tls.certfile = Some(PathBuf::from(value)),
                "keyfile" => tls.keyfile = Some(PathBuf::from(value)),
                "verify" => {
                    tls.verify = match value.as_str() {
                        "verify_peer" => Verify::Peer,
                        "verify_none" => Verify::None,
                        other => {
                            return Err(fail(format!(
                                "verify={other}: use verify_peer (the default) or verify_none"
                            )));
                        }
                    }
                }
                "server_name_indication" if value == "disable" => tls.no_sni = true,
                "server_name_indication" => tls.server_name = Some(value),
                "password" | "depth" | "fail_if_no_peer_cert" => {
                    return Err(fail(format!(
                        "{key} is not supported (encrypted keys and a chain depth limit are \
                         not; fail_if_no_peer_cert is a server setting)"
                    )));
                }
                other => return Err(fail(format!("unknown query parameter {other:?}"))),
            }
            tls_params.push(key);
        }
        if tls.certfile.is_some() != tls.keyfile.is_some() {
            return Err(fail("certfile and keyfile go together".into()));
        }
        let lapin_url = match passed.is_empty() {
            true => base.to_owned(),
            false => format!("{base}?{}", passed.join("&")),
        };
        // lapin's error may quote the URL, password and all: not repeated.
        let uri: AMQPUri = lapin_url.parse().map_err(|error: String| {
            let why = if error.contains(base) || error.contains("://") {
                "not an amqp:// or amqps:// URL".to_owned()
            } else {
                format!("not an amqp:// or amqps:// URL ({error})")
            };
            fail(why)
        })?;
        let tls = match uri.scheme {
            AMQPScheme::AMQPS => Some(tls),
            AMQPScheme::AMQP if tls_params.is_empty() => None,
            AMQPScheme::AMQP => {
                return Err(fail(format!(
                    "TLS parameters on an amqp:// URL ({}): use amqps:// (amqp:// is not \
                     encrypted)",
                    tls_params.join(", ")
                )));
            }
        };
        Ok(Self { uri, tls, redacted })
    }
}

/// Decodes `%XX` escapes (a path may be written `%2Fetc%2Fssl%2Fca.pem`).
/// A `%` not followed by two hex digits is kept as it is, as browsers do.
fn percent_decode(raw: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|value| value.into_owned())
        .map_err(|_| "not UTF-8 once decoded".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_the_rest_passed_to_lapin() {
        let node = NodeUrl::parse(
            "amqps://app:s3cret@mq.example.com:5671/events?heartbeat=30&cacertfile=%2Fetc%2Fca.pem\
             &certfile=/c.pem&keyfile=/k.pem&verify=verify_none&server_name_indication=mq",
        )
        .unwrap();
        assert_eq!(node.uri.authority.host, "mq.example.com");
        assert_eq!(node.uri.authority.port, 5671);
        assert_eq!(node.uri.vhost, "events");
        assert_eq!(node.uri.query.heartbeat, Some(30));
        let tls = node.tls.unwrap();
        assert_eq!(tls.cacertfile, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.certfile, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.keyfile, Some(PathBuf::from("/k.pem")));
        assert_eq!(tls.verify, Verify::None);
        assert_eq!(tls.server_name.as_deref(), Some("mq"));
        assert!(!node.redacted.contains("s3cret"));
    }

    #[test]
    fn amqps_always_means_tls_and_amqp_never_takes_tls_parameters() {
        let node = NodeUrl::parse("amqps://u:p@h/v").unwrap();
        assert_eq!(node.tls.unwrap().verify, Verify::Peer);
        assert_eq!(node.uri.authority.port, 5671);
        assert!(NodeUrl::parse("amqp://u:p@h/v").unwrap().tls.is_none());
        let no_sni = NodeUrl::parse("amqps://u:p@h/v?server_name_indication=disable").unwrap();
        assert!(no_sni.tls.unwrap().no_sni);
        let error = NodeUrl::parse("amqp://u:s3cret@h/v?cacertfile=/ca.pem").unwrap_err();
        assert!(
            error.contains("TLS parameters on an amqp:// URL (cacertfile)"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn unsupported_or_unknown_parameters_are_refused_by_name() {
        for (url, says) in [
            (
                "amqps://u:s3cret@h/v?verify=verify_maybe",
                "verify=verify_maybe",
            ),
            (
                "amqps://u:s3cret@h/v?password=x",
                "password is not supported",
            ),
            (
                "amqps://u:s3cret@h/v?cacertfle=/ca.pem",
                "unknown query parameter",
            ),
            (
                "amqps://u:s3cret@h/v?certfile=/c.pem",
                "certfile and keyfile",
            ),
            ("http://u:s3cret@h/v", "not an amqp:// or amqps:// URL"),
            (
                "amqps://u:s3cret@h/v?cacertfile=%FF",
                "cacertfile: not UTF-8",
            ),
        ] {
            let error = NodeUrl::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
            assert!(!error.contains("s3cret"), "{url}: {error}");
        }
    }
}
