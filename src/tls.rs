//! The one TLS stack of the service: rustls with the ring provider, for
//! Postgres (sqlx), RabbitMQ (lapin), SMTP (lettre) and OTLP (tonic,
//! reqwest). ring rather than aws-lc-rs, which needs cmake to build.

/// Makes ring the process's rustls provider, for the clients that ask rustls
/// for the process default (reqwest). Idempotent: `main` calls it first, and
/// so does each builder of such a client, for the tests that build one
/// without `main`.
pub fn install_provider() {
    // rustls marks ring's provider deprecated only for its lack of
    // post-quantum key exchange. An error means a provider is set already.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}
