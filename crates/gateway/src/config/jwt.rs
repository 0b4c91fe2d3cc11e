//! User tokens: which key checks them, the one algorithm accepted, and the
//! claims required, read from the `JWT_*` variables.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::{err, get, parse, ConfigError};

/// How a user JWT is checked.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// `JWT_ACCESS_TOKEN_SECRET`: the old gateway's shared HS256 secret.
    Secret(Vec<u8>),
    /// `JWT_PUBLIC_KEY_FILE`: a PEM public key (RS256/ES256 family).
    PublicKeyPem(Vec<u8>),
}

/// Everything about user tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The verification key.
    pub key: JwtKey,
    /// The one algorithm accepted (pinned: `alg` in the token must match).
    pub algorithm: jsonwebtoken::Algorithm,
    /// Clock-skew allowance for `exp` / `nbf`.
    pub leeway: Duration,
    /// `iss` to require, when set.
    pub issuer: Option<String>,
    /// Accepted `aud` values, when set.
    pub audience: Option<Vec<String>>,
    /// Whether a token without `exp` is refused (one with `exp` is always
    /// held to it).
    pub require_exp: bool,
}

impl JwtConfig {
    /// Builds the verification key for the pinned algorithm; a malformed
    /// PEM is an error.
    pub fn decoding_key(&self) -> Result<DecodingKey, jsonwebtoken::errors::Error> {
        use jsonwebtoken::Algorithm::*;
        Ok(match (&self.key, self.algorithm) {
            (JwtKey::Secret(s), _) => DecodingKey::from_secret(s),
            (JwtKey::PublicKeyPem(pem), ES256 | ES384) => DecodingKey::from_ec_pem(pem)?,
            (JwtKey::PublicKeyPem(pem), _) => DecodingKey::from_rsa_pem(pem)?,
        })
    }

    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let secret = get(vars, "JWT_ACCESS_TOKEN_SECRET");
        let key_file = get(vars, "JWT_PUBLIC_KEY_FILE");
        let alg_name = get(vars, "JWT_ALGORITHM");
        let (key, algorithm) = match (secret, key_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "JWT_PUBLIC_KEY_FILE",
                    "set either JWT_ACCESS_TOKEN_SECRET or JWT_PUBLIC_KEY_FILE, not both",
                ))
            }
            (None, None) => {
                return Err(err(
                    "JWT_ACCESS_TOKEN_SECRET",
                    "not set: user tokens cannot be checked (or set JWT_PUBLIC_KEY_FILE and JWT_ALGORITHM)",
                ))
            }
            (Some(secret), None) => {
                let alg = match alg_name {
                    None | Some("HS256") => Algorithm::HS256,
                    Some("HS384") => Algorithm::HS384,
                    Some("HS512") => Algorithm::HS512,
                    Some(other) => {
                        return Err(err(
                            "JWT_ALGORITHM",
                            format!("{other:?} does not go with a shared secret (HS256, HS384, HS512)"),
                        ))
                    }
                };
                (JwtKey::Secret(secret.as_bytes().to_vec()), alg)
            }
            (None, Some(path)) => {
                let alg = match alg_name {
                    None | Some("RS256") => Algorithm::RS256,
                    Some("RS384") => Algorithm::RS384,
                    Some("RS512") => Algorithm::RS512,
                    Some("PS256") => Algorithm::PS256,
                    Some("ES256") => Algorithm::ES256,
                    Some("ES384") => Algorithm::ES384,
                    Some(other) => {
                        return Err(err(
                            "JWT_ALGORITHM",
                            format!("{other:?} does not go with a public key (RS256, RS384, RS512, PS256, ES256, ES384)"),
                        ))
                    }
                };
                let pem = std::fs::read(path)
                    .map_err(|e| err("JWT_PUBLIC_KEY_FILE", format!("cannot read {path}: {e}")))?;
                (JwtKey::PublicKeyPem(pem), alg)
            }
        };
        let jwt = JwtConfig {
            key,
            algorithm,
            leeway: Duration::from_secs(super::within(
                "JWT_LEEWAY_SECS",
                parse(vars, "JWT_LEEWAY_SECS", 5)?,
                0,
                3600,
            )?),
            issuer: get(vars, "JWT_ISSUER").map(str::to_owned),
            audience: get(vars, "JWT_AUDIENCE")
                .map(|v| v.split(',').map(|a| a.trim().to_owned()).collect()),
            // Off by default: the old gateway's `jsonwebtoken.verify`
            // accepted a token without `exp` (and checked it when present),
            // and the contract keeps its tokens working.
            require_exp: parse(vars, "JWT_REQUIRE_EXP", false)?,
        };
        // Building the key now turns a bad PEM into a start-up error.
        jwt.decoding_key().map_err(|e| {
            err(
                if secret.is_some() {
                    "JWT_ACCESS_TOKEN_SECRET"
                } else {
                    "JWT_PUBLIC_KEY_FILE"
                },
                e.to_string(),
            )
        })?;
        Ok(jwt)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{vars, Config};

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_vars(&vars(&[])).unwrap_err();
        assert_eq!(e.var, "JWT_ACCESS_TOKEN_SECRET");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("JWT_ALGORITHM", "RS256"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "JWT_ALGORITHM");
        let e = Config::from_vars(&vars(&[("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")]))
            .unwrap_err();
        assert_eq!(e.var, "JWT_PUBLIC_KEY_FILE");
    }
}
