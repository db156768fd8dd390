//! TLS for `amqps://`: the rustls client a node's URL asks for, and the
//! connection made through it.
//!
//! lapin's own TLS setup adds a CA file to the system's roots, verifies the
//! URL's host and always verifies; RabbitMQ's URI spec means more: the
//! `cacertfile` CAs are the only ones trusted, `server_name_indication` names
//! the host to verify and `verify=verify_none` turns verification off. So
//! the connection is made here, through lapin's `Connection::connector`: a
//! plain TCP connection, then the TLS handshake with our own client. Without
//! `cacertfile`, the system's roots are trusted (a managed broker's public
//! CA).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Whether the server's certificate is verified (`verify=` in the URL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verify {
    /// Against the trusted CAs and the host name (the default).
    #[default]
    Peer,
    /// Not at all: the connection is encrypted, but to whoever answers.
    None,
}

/// The TLS parameters of an `amqps://` URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// The CAs to trust, PEM; the system's roots when unset.
    pub cacertfile: Option<PathBuf>,
    /// A client certificate (chain), PEM, with its key in `keyfile`.
    pub certfile: Option<PathBuf>,
    /// The client certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
    pub verify: Verify,
    /// The host name to send and verify, instead of the URL's host.
    pub server_name: Option<String>,
}

impl TlsOptions {
    /// Builds the TLS client, reading the files now (so a renewed
    /// certificate is picked up at the next connection). The error names the
    /// parameter and the file.
    pub fn connector(&self) -> Result<RustlsConnector, String> {
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => Some((
                certificates("certfile", cert)?,
                PrivateKeyDer::from_pem_slice(&read("keyfile", key)?)
                    .map_err(|e| format!("keyfile {}: no private key: {e}", key.display()))?,
            )),
            _ => None,
        };
        if self.verify == Verify::None {
            return unverified(identity);
        }
        let roots = match &self.cacertfile {
            Some(ca) => RustlsConnectorConfig::default()
                .with_parsable_certificates(certificates("cacertfile", ca)?),
            None => RustlsConnectorConfig::new_with_native_certs()
                .map_err(|e| format!("no cacertfile, and the system's CA roots: {e}"))?,
        };
        let connector = match identity {
            Some((certs, key)) => roots.connector_with_single_cert(certs, key),
            None => roots.connector_with_no_client_auth(),
        };
        connector.map_err(|e| format!("setting up TLS: {e}"))
    }
}

/// Connects to `uri` over TLS with `options`: TCP, then the handshake, then
/// AMQP. Never without TLS: a server that does not speak it fails the
/// handshake.
pub async fn connect(
    uri: AMQPUri,
    options: &TlsOptions,
    properties: ConnectionProperties,
) -> Result<Connection, ConnectFailure> {
    let connector = options.connector().map_err(ConnectFailure::Config)?;
    let server_name = options
        .server_name
        .clone()
        .unwrap_or_else(|| uri.authority.host.clone());
    let runtime = lapin::runtime::default_runtime().map_err(ConnectFailure::Lapin)?;
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let plain = AMQPUri {
                scheme: AMQPScheme::AMQP,
                ..uri
            };
            let tcp = plain.connect_async(&runtime).await?;
            Ok(tcp.into_rustls(&connector, &server_name).await?)
        },
        properties,
    )
    .await
    .map_err(ConnectFailure::Lapin)
}

/// Why [`connect`] failed: the TLS parameters themselves, or the connection.
#[derive(Debug)]
pub enum ConnectFailure {
    Config(String),
    Lapin(lapin::Error),
}

fn read(param: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{param} {}: {e}", path.display()))
}

/// Every certificate of a PEM file; at least one.
fn certificates(param: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(param, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{param} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{param} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A client that accepts any server certificate (`verify=verify_none`).
fn unverified(
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<RustlsConnector, String> {
    // ring, the crate's one provider (see `cli::main`).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("setting up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("certfile and keyfile: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(RustlsConnector::from(config))
}

/// Accepts any certificate, but still checks the handshake's signatures
/// (the server holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
