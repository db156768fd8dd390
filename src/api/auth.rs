//! Bearer-token (JWT) authentication of the order routes, off by default.
//! [`Authenticator`] is built once at start from [`AuthConfig`] (a bad key
//! stops the process there); the [`Caller`] extractor checks the
//! `Authorization` header of each request that asks for it.

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::error::{ApiError, Unauthorized};
use crate::config::AuthConfig;
use crate::orders::MAX_ID_CHARS;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// RFC 7518 §3.2: an HS256 key has at least as many bits as the hash.
const MIN_SECRET_BYTES: usize = 32;

/// Why the authentication settings cannot be used. Each message names the
/// setting and never carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "AUTH_JWT_SECRET and AUTH_JWT_PUBLIC_KEY_FILE are both set: set one (the secret for HS256, the key file for RS256 or ES256)"
    )]
    Both,
    #[error("AUTH_JWT_SECRET: must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret,
    #[error("AUTH_JWT_PUBLIC_KEY_FILE: cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("AUTH_JWT_PUBLIC_KEY_FILE: {path} holds no RSA or EC (P-256, P-384) public key in PEM")]
    NotAKey { path: String },
}

/// Checks bearer tokens, or nothing when authentication is off.
#[derive(Clone, Default)]
pub struct Authenticator(Option<Arc<Verifier>>);

struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    /// Authentication off: every caller may act for any user.
    pub fn off() -> Self {
        Self(None)
    }

    /// Reads the secret or the key file. Off when neither is set.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let (key, algorithm) = match (&config.auth_jwt_secret, &config.auth_jwt_public_key_file) {
            (None, None) => return Ok(Self::off()),
            (Some(_), Some(_)) => return Err(AuthConfigError::Both),
            (Some(secret), None) => {
                let secret = secret.expose_secret().as_bytes();
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(AuthConfigError::ShortSecret);
                }
                let key =
                    DecodingKey::from_secret(secret).map_err(|_| AuthConfigError::ShortSecret)?;
                (key, Algorithm::HS256)
            }
            (None, Some(path)) => public_key(path)?,
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(issuer) = &config.auth_jwt_issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        // Without a configured audience, a token's `aud` is not checked.
        validation.validate_aud = config.auth_jwt_audience.is_some();
        if let Some(audience) = &config.auth_jwt_audience {
            validation.set_audience(&[audience]);
            // jsonwebtoken accepts a token without `aud` unless it is
            // required, even with an audience to check.
            validation.required_spec_claims.insert("aud".into());
        }
        Ok(Self(Some(Arc::new(Verifier { key, validation }))))
    }
}

impl Verifier {
    /// The user (`sub`) of a valid token.
    fn verify(&self, token: &str) -> Result<String, Unauthorized> {
        #[derive(Deserialize)]
        struct Claims {
            sub: String,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| Unauthorized::Invalid(reason(error.kind())))?;
        let sub = data.claims.sub;
        // `sub` becomes the order's userId: it must pass the same checks.
        let valid = !sub.trim().is_empty()
            && sub.chars().count() <= MAX_ID_CHARS
            && !sub.chars().any(char::is_control);
        if valid {
            Ok(sub)
        } else {
            Err(Unauthorized::Invalid(
                "the token's sub is not a valid user id",
            ))
        }
    }
}

/// The algorithm follows the key: RSA is RS256, EC on P-256 ES256 (and on
/// P-384 ES384).
fn public_key(path: &std::path::Path) -> Result<(DecodingKey, Algorithm), AuthConfigError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| AuthConfigError::Unreadable {
        path: shown.clone(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    let not_a_key = || AuthConfigError::NotAKey {
        path: shown.clone(),
    };
    let key = DecodingKey::from_ec_pem(&pem).map_err(|_| not_a_key())?;
    // The key is the uncompressed point: 0x04, then x and y.
    let algorithm = match key.try_get_as_bytes().map(<[u8]>::len) {
        Ok(65) => Algorithm::ES256,
        Ok(97) => Algorithm::ES384,
        _ => return Err(not_a_key()),
    };
    Ok((key, algorithm))
}

/// What a client is told about a refused token (RFC 6750's
/// `error_description` material; never the key or the token).
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::InvalidIssuer => "the token has the wrong issuer",
        ErrorKind::InvalidAudience => "the token has the wrong audience",
        ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidAlgorithm => "the token is signed with another algorithm",
        _ => "the token is malformed",
    }
}

/// Who is asking, for the routes that need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: the caller may act for any user.
    Anyone,
    /// The `sub` of a valid bearer token.
    User(String),
}

impl Caller {
    /// The authenticated user, if authentication is on.
    pub fn user(&self) -> Option<&str> {
        match self {
            Self::Anyone => None,
            Self::User(user) => Some(user),
        }
    }

    /// May this caller see or act for `user_id`?
    pub fn may_act_for(&self, user_id: &str) -> bool {
        self.user().is_none_or(|user| user == user_id)
    }
}

impl<S> FromRequestParts<S> for Caller
where
    Authenticator: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let authenticator = Authenticator::from_ref(state);
        let Some(verifier) = &authenticator.0 else {
            return Ok(Self::Anyone);
        };
        let user = bearer_token(parts).and_then(|token| verifier.verify(token));
        user.map(Self::User).map_err(ApiError::Unauthorized)
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer_token(parts: &Parts) -> Result<&str, Unauthorized> {
    let malformed = Unauthorized::Invalid("the token is malformed");
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(Unauthorized::Missing);
    };
    let value = value.to_str().map_err(|_| malformed.clone())?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    match (scheme.eq_ignore_ascii_case("bearer"), token.trim()) {
        (true, "") => Err(malformed),
        (true, token) => Ok(token),
        // Another scheme (Basic, ...) carries no token of ours.
        _ => Err(Unauthorized::Missing),
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    /// A public key in a PEM file of its own, removed on drop.
    struct KeyFile(std::path::PathBuf);

    impl KeyFile {
        fn of(pair: &rcgen::KeyPair) -> Self {
            let name = format!("jwt-unit-{}.pem", uuid::Uuid::new_v4());
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, pair.public_key_pem()).unwrap();
            Self(path)
        }
    }

    impl Drop for KeyFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn the_algorithm_follows_the_key_and_other_keys_are_refused() {
        let claims = serde_json::json!({"sub": "u", "exp": 4_102_444_800_u64});
        for (kind, algorithm) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Algorithm::ES384),
        ] {
            let pair = rcgen::KeyPair::generate_for(kind).unwrap();
            let file = KeyFile::of(&pair);
            let auth = Authenticator::from_config(&AuthConfig::public_key_file(&file.0)).unwrap();
            let signing = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
            let token = jsonwebtoken::encode(&Header::new(algorithm), &claims, &signing).unwrap();
            let verifier = auth.0.expect("on");
            assert_eq!(verifier.verify(&token).unwrap(), "u", "{algorithm:?}");
        }
        let ed25519 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let file = KeyFile::of(&ed25519);
        let refused = Authenticator::from_config(&AuthConfig::public_key_file(&file.0));
        assert!(matches!(refused, Err(AuthConfigError::NotAKey { .. })));
    }
}
