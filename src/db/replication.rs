//! The WAL relay's replication connection, from the same `DATABASE_URL`:
//! host, port, user, password and database, and libpq's TLS parameters as
//! [`super::options`] reads them (`verify-ca` refused, `require` with a
//! root certificate verified as `verify-full`).

use std::path::PathBuf;

use outbox::wal::{ReplicationConfig, SslMode, TlsConfig};
use sqlx::postgres::PgSslMode;

use super::StartError;
use super::options::{self, CLIENT_CERT, CLIENT_KEY, ROOT_CERT};
use crate::config::SecretUrl;

/// The replication settings of `url` for `slot` and `publication`.
pub fn replication_config(
    url: &SecretUrl,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig, StartError> {
    let read = options::connect_options(url)?;
    let connect = &read.connect;
    let query = options::query_pairs(url.expose());
    let password = password(url.expose())
        .or_else(|| std::env::var("PGPASSWORD").ok())
        .unwrap_or_default();
    let root = ROOT_CERT.file(&query).map(PathBuf::from);
    let mut tls = match connect.get_ssl_mode() {
        PgSslMode::Disable | PgSslMode::Allow => TlsConfig::disabled(),
        PgSslMode::Prefer => TlsConfig {
            mode: SslMode::Prefer,
            ..TlsConfig::default()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => TlsConfig::verify_full(root),
    };
    if let (Some(cert), Some(key)) = (CLIENT_CERT.file(&query), CLIENT_KEY.file(&query)) {
        tls = tls.with_client_cert(cert, key);
    }
    Ok(ReplicationConfig::new(
        connect.get_host(),
        connect.get_username(),
        password,
        connect.get_database().unwrap_or(connect.get_username()),
        slot,
        publication,
    )
    .with_port(connect.get_port())
    .with_tls(tls))
}

/// The URL's password, percent-decoded.
fn password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let password = userinfo.split_once(':')?.1;
    Some(
        percent_encoding::percent_decode_str(password)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_gives_the_replication_connection() {
        let url = SecretUrl::new("postgres://app:p%40ss@db.example:6543/orders?sslmode=require");
        let config = replication_config(&url, "relay_slot", "relay_pub").unwrap();
        assert_eq!(config.host, "db.example");
        assert_eq!(config.port, 6543);
        assert_eq!(config.user, "app");
        assert_eq!(config.password, "p@ss");
        assert_eq!(config.database, "orders");
        assert_eq!(config.slot, "relay_slot");
        assert_eq!(config.tls.mode, SslMode::Require);
    }

    #[test]
    fn without_a_password_there_is_none() {
        assert_eq!(password("postgres://app@db/orders"), None);
        assert_eq!(password("postgres://db/orders"), None);
        assert_eq!(password("postgres://a:b@db/x?u=c@d").as_deref(), Some("b"));
    }
}
