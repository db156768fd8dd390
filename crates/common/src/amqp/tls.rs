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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

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
    /// `server_name_indication=disable`: no name sent (the URL's host is
    /// still the one verified).
    pub no_sni: bool,
}

impl TlsOptions {
    /// Builds the TLS client, reading the files now (so a renewed
    /// certificate is picked up at the next connection). The error names the
    /// parameter and the file.
    fn client(&self) -> Result<Client, String> {
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("setting up TLS: {e}"))?;
        let builder = match self.verify {
            Verify::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(provider))),
            Verify::Peer => builder.with_root_certificates(self.roots()?),
        };
        let cert_wanted = Arc::new(AtomicBool::new(false));
        let mut config = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => {
                let key = crate::tls::pem_private_key(key).map_err(|e| format!("keyfile {e}"))?;
                let chain =
                    crate::tls::pem_certificates(cert).map_err(|e| format!("certfile {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("certfile and keyfile: {e}"))?
            }
            _ => builder.with_client_cert_resolver(Arc::new(NoClientCert(cert_wanted.clone()))),
        };
        config.enable_sni = !self.no_sni;
        Ok(Client {
            connector: RustlsConnector::from(config),
            cert_wanted,
        })
    }

    /// The `cacertfile` CAs only, as RabbitMQ's clients read it; else the
    /// system's roots.
    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.cacertfile {
            Some(ca) => {
                let certs =
                    crate::tls::pem_certificates(ca).map_err(|e| format!("cacertfile {e}"))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| format!("cacertfile {}: {e}", ca.display()))?;
                }
            }
            None => {
                roots.add_parsable_certificates(crate::tls::system_roots().iter().cloned());
                if roots.is_empty() {
                    return Err("no cacertfile, and no CA roots on this system".into());
                }
            }
        }
        Ok(roots)
    }
}

/// A TLS client, and whether the server asked it for a certificate it did
/// not have (then a connection that fails may have been refused for that).
struct Client {
    connector: RustlsConnector,
    cert_wanted: Arc<AtomicBool>,
}

/// Connects to `uri` over TLS with `options`: TCP, then the handshake, then
/// AMQP. Never without TLS: a server that does not speak it fails the
/// handshake.
pub async fn connect(
    uri: AMQPUri,
    options: &TlsOptions,
    properties: ConnectionProperties,
) -> Result<Connection, ConnectFailure> {
    let Client {
        connector,
        cert_wanted,
    } = options.client().map_err(ConnectFailure::Config)?;
    let server_name = options
        .server_name
        .clone()
        .unwrap_or_else(|| uri.authority.host.clone());
    let runtime = lapin::runtime::default_runtime().map_err(ConnectFailure::Lapin)?;
    let result = Connection::connector(
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
    .await;
    result.map_err(|error| match cert_wanted.load(Ordering::Relaxed) {
        true => refused_for_no_cert(error),
        false => ConnectFailure::Lapin(error),
    })
}

/// A connection that failed after the server asked for a client certificate
/// and none was sent. An alert of the server's that refuses the client is
/// the refusal. A connection only closed or reset may be that refusal too,
/// but may as well be a node restarting: RabbitMQ asks for a certificate
/// even when it is optional. (RabbitMQ 3.10 on OTP 25 refuses with the
/// alert `handshake_failure` in TLS 1.2, and `certificate_required` after
/// a TLS 1.3 handshake, then closes: a client already writing its AMQP
/// header may see only the reset, so both happen.)
fn refused_for_no_cert(error: lapin::Error) -> ConnectFailure {
    use rustls::AlertDescription::{
        AccessDenied, BadCertificate, CertificateRequired, CertificateUnknown, HandshakeFailure,
    };
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return ConnectFailure::Lapin(error);
    };
    let tls = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::AlertReceived(alert)) = tls
        && matches!(
            alert,
            CertificateRequired
                | HandshakeFailure
                | BadCertificate
                | CertificateUnknown
                | AccessDenied
        )
    {
        return ConnectFailure::ClientCertRefused(error);
    }
    match io.kind() {
        ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe => {
            ConnectFailure::ClientCertWanted(error)
        }
        _ => ConnectFailure::Lapin(error),
    }
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// The TLS parameters themselves (a file, a bad key).
    Config(String),
    /// The server asked for a client certificate, none was configured, and
    /// it refused the connection with an alert.
    ClientCertRefused(lapin::Error),
    /// The server asked for a client certificate, none was configured, and
    /// the connection was then closed or reset: a refusal, or an outage.
    ClientCertWanted(lapin::Error),
    /// The connection, TLS or AMQP.
    Lapin(lapin::Error),
}

/// Has no certificate to give, and notes that the server asked for one.
#[derive(Debug)]
struct NoClientCert(Arc<AtomicBool>);

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        // So that rustls asks `resolve`, which notes the request.
        true
    }
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
