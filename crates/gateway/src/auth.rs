//! User authentication: where the JWT comes from, how it is checked, and the
//! CONNECT_ERROR codes a failure maps to (CONTRACT.md, "Authentication").

use jsonwebtoken::{errors::ErrorKind, DecodingKey, Validation};
use serde_json::Value;
use thiserror::Error;

use crate::config::{JwtConfig, JwtKey};

/// Why a token was refused; each maps to a contract error code.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the auth payload, header or query.
    #[error("Authentication token required")]
    NoToken,
    /// The token does not verify (signature, algorithm, expiry, claims).
    #[error("{0}")]
    InvalidToken(String),
    /// The token verifies but is unusable (no user id).
    #[error("{0}")]
    AuthError(String),
}

impl AuthError {
    /// The contract's `data.code`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::NoToken => "NO_TOKEN",
            AuthError::InvalidToken(_) => "INVALID_TOKEN",
            AuthError::AuthError(_) => "AUTH_ERROR",
        }
    }
}

/// What flowgate keeps of a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `userId`, else `sub`.
    pub user_id: String,
    /// `exp` in seconds since the epoch, when present.
    pub expires_at: Option<u64>,
    /// The claim the `claims` access policy reads (no other claim is
    /// kept).
    pub claims: serde_json::Map<String, Value>,
}

/// Verifies user tokens with one pinned algorithm.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
    /// The one claim the access policy reads, if any: the rest of a
    /// token's claims are not kept for the connection's life.
    keep_claim: Option<String>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Builds the key; a malformed PEM is an error here, at start.
    pub fn new(cfg: &JwtConfig) -> Result<Self, jsonwebtoken::errors::Error> {
        use jsonwebtoken::Algorithm::*;
        let key = match (&cfg.key, cfg.algorithm) {
            (JwtKey::Secret(s), _) => DecodingKey::from_secret(s),
            (JwtKey::PublicKeyPem(pem), ES256 | ES384) => DecodingKey::from_ec_pem(pem)?,
            (JwtKey::PublicKeyPem(pem), _) => DecodingKey::from_rsa_pem(pem)?,
        };
        // One algorithm only: a token whose header names another (`none`,
        // or HS256 signed with the RSA public key as secret) is refused.
        let mut validation = Validation::new(cfg.algorithm);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        let mut required: Vec<&str> = Vec::new();
        if cfg.require_exp {
            required.push("exp");
        }
        match &cfg.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(aud);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(TokenVerifier {
            key,
            validation,
            keep_claim: None,
        })
    }

    /// Keeps `claim` (the `claims` access policy's) in identities; every
    /// other claim is dropped once the user id and expiry are read.
    pub fn keeping_claim(mut self, claim: Option<String>) -> Self {
        self.keep_claim = claim;
        self
    }

    /// Verifies a token and extracts the identity.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| {
            AuthError::InvalidToken(match e.kind() {
                ErrorKind::ExpiredSignature => "Token expired".to_owned(),
                ErrorKind::ImmatureSignature => "Token not yet valid".to_owned(),
                ErrorKind::InvalidAlgorithm => "Token algorithm not accepted".to_owned(),
                ErrorKind::InvalidIssuer => "Token issuer not accepted".to_owned(),
                ErrorKind::InvalidAudience => "Token audience not accepted".to_owned(),
                ErrorKind::MissingRequiredClaim(c) => format!("Token lacks the {c} claim"),
                _ => "Invalid token".to_owned(),
            })
        })?;
        let mut claims = data.claims;
        let user_id = [claims.get("userId"), claims.get("sub")]
            .into_iter()
            .flatten()
            .find_map(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .ok_or_else(|| AuthError::AuthError("Token has no userId or sub claim".to_owned()))?;
        let expires_at = claims.get("exp").and_then(numeric_date);
        // A new map, not `retain`: a `BTreeMap` emptied in place keeps its
        // root node (~630 bytes held by every connection for nothing).
        let mut kept = serde_json::Map::new();
        if let Some((k, v)) = self
            .keep_claim
            .as_deref()
            .and_then(|k| claims.remove_entry(k))
        {
            kept.insert(k, v);
        }
        let claims = kept;
        Ok(Identity {
            user_id,
            expires_at,
            claims,
        })
    }
}

/// A JWT NumericDate in whole seconds, whatever its JSON form: RFC 7519
/// allows fractional seconds, and `1.7e9` or `1700000000.5` must expire
/// like `1700000000` (jsonwebtoken validates them the same way). Rounded
/// down, so a fractional `exp` never lives longer than it says.
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f.floor() as u64)
    })
}

/// Picks the token in the contract's order: CONNECT auth payload, then the
/// upgrade request's `Authorization: Bearer`, then the `token` query
/// parameter.
pub fn pick_token<'a>(
    auth_payload: Option<&'a Value>,
    bearer: Option<&'a str>,
    query: Option<&'a str>,
) -> Option<&'a str> {
    auth_payload
        .and_then(|a| a.get("token"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .or(bearer.filter(|t| !t.is_empty()))
        .or(query.filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::json;
    use std::time::Duration;

    fn cfg() -> JwtConfig {
        JwtConfig {
            key: JwtKey::Secret(b"secret".to_vec()),
            algorithm: Algorithm::HS256,
            leeway: Duration::from_secs(0),
            issuer: None,
            audience: None,
            require_exp: true,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn sign(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn only_the_access_policys_claim_is_kept() {
        let token = sign(
            json!({"userId": "u", "flows": ["a"], "name": "x", "exp": now() + 60}),
            b"secret",
        );
        let v = TokenVerifier::new(&cfg()).unwrap();
        assert!(v.verify(&token).unwrap().claims.is_empty());
        let v = v.keeping_claim(Some("flows".into()));
        let id = v.verify(&token).unwrap();
        assert_eq!(id.claims.len(), 1);
        assert_eq!(id.claims["flows"], json!(["a"]));
        assert_eq!(id.expires_at, Some(now() + 60));
    }

    #[test]
    fn user_id_then_sub() {
        let v = TokenVerifier::new(&cfg()).unwrap();
        let id = v
            .verify(&sign(
                json!({"userId": "u1", "sub": "s", "exp": now() + 60}),
                b"secret",
            ))
            .unwrap();
        assert_eq!(id.user_id, "u1");
        let id = v
            .verify(&sign(json!({"sub": "s", "exp": now() + 60}), b"secret"))
            .unwrap();
        assert_eq!(id.user_id, "s");
        let id = v
            .verify(&sign(json!({"userId": 42, "exp": now() + 60}), b"secret"))
            .unwrap();
        assert_eq!(id.user_id, "42");
    }

    #[test]
    fn refusals_map_to_codes() {
        let v = TokenVerifier::new(&cfg()).unwrap();
        let e = v
            .verify(&sign(json!({"userId": "u", "exp": now() - 60}), b"secret"))
            .unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            ("INVALID_TOKEN", "Token expired")
        );
        let e = v
            .verify(&sign(json!({"userId": "u", "exp": now() + 60}), b"other"))
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_TOKEN");
        let e = v
            .verify(&sign(json!({"exp": now() + 60}), b"secret"))
            .unwrap_err();
        assert_eq!(e.code(), "AUTH_ERROR");
        let e = v
            .verify(&sign(json!({"userId": "u"}), b"secret"))
            .unwrap_err();
        assert_eq!(e.code(), "INVALID_TOKEN");
        let e = v.verify("not.a.jwt").unwrap_err();
        assert_eq!(e.code(), "INVALID_TOKEN");
    }

    #[test]
    fn alg_none_is_refused() {
        let v = TokenVerifier::new(&cfg()).unwrap();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(json!({"userId": "u", "exp": now() + 60}).to_string());
        let e = v.verify(&format!("{header}.{body}.")).unwrap_err();
        assert_eq!(e.code(), "INVALID_TOKEN");
    }

    #[test]
    fn token_order() {
        let auth = json!({"token": "a"});
        assert_eq!(pick_token(Some(&auth), Some("b"), Some("c")), Some("a"));
        assert_eq!(
            pick_token(Some(&json!({})), Some("b"), Some("c")),
            Some("b")
        );
        assert_eq!(pick_token(None, None, Some("c")), Some("c"));
        assert_eq!(pick_token(None, Some(""), None), None);
    }

    #[test]
    fn a_fractional_exp_still_expires() {
        let v = TokenVerifier::new(&cfg()).unwrap();
        let exp = now() as f64 + 60.75;
        let id = v
            .verify(&sign(json!({"userId": "u", "exp": exp}), b"secret"))
            .unwrap();
        assert_eq!(id.expires_at, Some(exp.floor() as u64));
        let past = now() as f64 - 10.5;
        assert!(v
            .verify(&sign(json!({"userId": "u", "exp": past}), b"secret"))
            .is_err());
        assert_eq!(numeric_date(&json!(1.7e9)), Some(1_700_000_000));
        assert_eq!(numeric_date(&json!(-1.0)), None);
        assert_eq!(numeric_date(&json!("1")), None);
    }
}
