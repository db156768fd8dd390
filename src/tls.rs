//! The one TLS stack of the service: rustls with the ring provider, for
//! Postgres (sqlx), RabbitMQ (lapin), SMTP (lettre) and OTLP (tonic, hyper).
//! ring rather than aws-lc-rs, which needs cmake to build.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Makes ring the process's rustls provider, for the clients that ask rustls
/// for the process default. Idempotent: `main` calls it first, and so does
/// each builder of such a client, for the tests that build one without
/// `main`.
pub fn install_provider() {
    // rustls marks ring's provider deprecated only for its lack of
    // post-quantum key exchange. An error means a provider is set already.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The CA file holds no PEM certificate, or one rustls cannot parse.
    #[error("not a PEM certificate: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// rustls refused the certificate or the settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// A rustls client configuration (ring) that trusts the system's roots and
/// the certificates of `extra_ca_pem`, a private CA's PEM file's contents.
/// The server's name is always verified.
pub fn client_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // A system root that does not parse is skipped, as browsers do; none at
    // all (a slim image without ca-certificates) leaves only the extra CA.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_ca_pem {
        let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>()?;
        if certs.is_empty() {
            return Err(TlsConfigError::Pem(
                rustls::pki_types::pem::Error::NoItemsFound,
            ));
        }
        for cert in certs {
            roots.add(cert)?;
        }
    }
    #[allow(deprecated)] // ring: see install_provider
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
