//! The settings of bearer-token (JWT) authentication of the order routes.
//! Off unless a secret or a public key is given; the key is read and checked
//! at start by `api::auth::Authenticator::from_config`.

use std::path::PathBuf;

use secrecy::SecretString;

/// Who may post and read orders. With neither `AUTH_JWT_SECRET` nor
/// `AUTH_JWT_PUBLIC_KEY_FILE`, anyone may (the default).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthConfig {
    /// HS256 secret (at least 32 bytes) that signs the bearer tokens. Set it,
    /// or AUTH_JWT_PUBLIC_KEY_FILE, to require a token on POST /orders and
    /// GET /orders/{id}.
    #[arg(
        long,
        env = "AUTH_JWT_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub auth_jwt_secret: Option<SecretString>,
    /// PEM file with the public key that verifies the bearer tokens: an RSA
    /// key (RS256) or an EC key on P-256 (ES256) or P-384 (ES384).
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<PathBuf>,
    /// When set, a token's `iss` must be this.
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// When set, a token's `aud` must be (or contain) this.
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
}

impl AuthConfig {
    /// HS256 with `secret`, for tests and benchmarks.
    pub fn hs256(secret: impl Into<String>) -> Self {
        Self {
            auth_jwt_secret: Some(SecretString::from(secret.into())),
            ..Self::default()
        }
    }

    /// RS256 or ES256 with the public key in the PEM file at `path`.
    pub fn public_key_file(path: impl Into<PathBuf>) -> Self {
        Self {
            auth_jwt_public_key_file: Some(path.into()),
            ..Self::default()
        }
    }
}

// secrecy 0.10's SecretString has no FromStr for clap to use.
fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}
