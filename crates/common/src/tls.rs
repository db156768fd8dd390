//! The one TLS stack of the service: rustls with the ring provider, for
//! Postgres (sqlx), RabbitMQ (lapin), SMTP (lettre) and OTLP (tonic, hyper).
//! ring rather than aws-lc-rs, which needs cmake to build. The one home of
//! the provider, the system's roots and the reading of PEM files.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Makes ring the process's rustls provider, for the clients that ask rustls
/// for the process default. Idempotent: `main` calls it first, and so does
/// each builder of such a client, for the tests that build one without
/// `main`.
pub fn install_provider() {
    let _ = CryptoProvider::install_default(ring());
}

/// The ring provider, built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| Arc::new(ring()));
    PROVIDER.clone()
}

fn ring() -> CryptoProvider {
    // rustls marks ring's provider deprecated only for its lack of
    // post-quantum key exchange.
    #[allow(deprecated)]
    rustls::crypto::ring::default_provider()
}

/// The system's root certificates (`ca-certificates` in the image), read
/// once. A root that does not parse is left out, as browsers do; none at all
/// (a slim image without ca-certificates) leaves only a setting's own CA.
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: LazyLock<Vec<CertificateDer<'static>>> = LazyLock::new(|| {
        rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .filter(|der| rustls::RootCertStore::empty().add(der.clone()).is_ok())
            .collect()
    });
    &ROOTS
}

/// Why a PEM file of a setting cannot be used. The message names the file,
/// never its contents; the caller names the setting.
#[derive(Debug, thiserror::Error)]
pub enum PemFileError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not PEM, or holds nothing of the kind wanted.
    #[error("{path}: {what}")]
    Content {
        /// The file.
        path: String,
        /// What it lacks.
        what: String,
    },
}

/// Every certificate of the PEM file at `path`; at least one.
pub fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemFileError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(content(path, "no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The private key of the PEM file at `path` (PKCS#8, PKCS#1 or SEC1; not
/// encrypted).
pub fn pem_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemFileError> {
    PrivateKeyDer::from_pem_slice(&read(path)?)
        .map_err(|e| content(path, format!("no usable PEM private key: {e}")))
}

fn read(path: &Path) -> Result<Vec<u8>, PemFileError> {
    std::fs::read(path).map_err(|source| PemFileError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn content(path: &Path, what: String) -> PemFileError {
    PemFileError::Content {
        path: path.display().to_string(),
        what,
    }
}

/// A rustls client configuration (ring) that trusts the system's roots and
/// `extra_ca`, a private CA's certificates. The server's name is always
/// verified.
pub fn client_config(
    extra_ca: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    for cert in extra_ca {
        roots.add(cert.clone())?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
