//! TLS to Postgres and PgBouncer, with libpq's `sslmode` meanings, over
//! rustls.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and
//! no certificate files, so the connection URL is read here first: the
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` parameters are taken
//! out, tokio-postgres gets the rest plus the matching mode, and the
//! rustls connector carries the verification libpq would do:
//!
//! | `sslmode` | encryption | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | if the server offers it | not verified |
//! | `require` | always, or the connection fails | verified against `sslrootcert` if given, else not |
//! | `verify-ca` | always | chain verified (`sslrootcert`, else the system roots) |
//! | `verify-full` | always | chain and host name verified |
//!
//! `require` and stronger never fall back to plaintext: tokio-postgres
//! fails the connection when the server refuses TLS.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// What the TLS parameters of a URL ask for.
#[derive(Debug, Default)]
struct Params {
    mode: Option<Mode>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Params {
    /// Takes `key=value` if it is one of ours; returns whether it was.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, StoreError> {
        match key {
            "sslmode" => {
                self.mode = Some(match value {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(StoreError::Config(format!(
                            "sslmode={other}: expected disable, allow, prefer, require, verify-ca or verify-full"
                        )))
                    }
                })
            }
            "sslrootcert" => self.root_cert = Some(value.into()),
            "sslcert" => self.cert = Some(value.into()),
            "sslkey" => self.key = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Splits the TLS parameters off a URL (`postgres://…?…`) or a key/value
/// string (`host=… sslmode=…`, values without spaces or quotes).
fn split(url: &str) -> Result<(String, Params), StoreError> {
    let mut params = Params::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(url).map_err(|e| StoreError::Config(e.to_string()))?;
        let mut rest = Vec::new();
        for (k, v) in parsed.query_pairs() {
            if !params.take(&k, &v)? {
                rest.push((k.into_owned(), v.into_owned()));
            }
        }
        if rest.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(rest);
        }
        Ok((parsed.to_string(), params))
    } else {
        let mut rest = Vec::new();
        for word in url.split_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            if !params.take(k, v)? {
                rest.push(word);
            }
        }
        Ok((rest.join(" "), params))
    }
}

/// The tokio-postgres configuration and TLS connector of a database URL.
pub(crate) fn connect_config(
    url: &str,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let (rest, params) = split(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
    let mode = params.mode.unwrap_or(Mode::Prefer);
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    Ok((
        config,
        MakeRustlsConnect::new(client_config(mode, &params)?),
    ))
}

fn file_error(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Config(format!("{what} {}: {e}", path.display()))
}

fn client_config(mode: Mode, params: &Params) -> Result<rustls::ClientConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match (&params.root_cert, mode) {
        (Some(path), _) => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| file_error("sslrootcert", path, e))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| file_error("sslrootcert", path, e))?;
            }
            Some(roots)
        }
        (None, Mode::VerifyCa | Mode::VerifyFull) => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            Some(roots)
        }
        // libpq: without a root certificate, prefer and require encrypt
        // but take any certificate.
        (None, _) => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(Verifier {
            webpki: None,
            provider: provider.clone(),
        }),
        Some(roots) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| StoreError::Config(format!("sslrootcert: {e}")))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(Verifier {
                    webpki: Some(webpki),
                    provider: provider.clone(),
                })
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.cert, &params.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| file_error("sslcert", cert, e))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_error("sslkey", key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| StoreError::Config(format!("sslcert: {e}")))
        }
        _ => Err(StoreError::Config(
            "sslcert and sslkey go together".to_owned(),
        )),
    }
}

/// The verifier of `prefer`/`require` (any certificate, `webpki: None`)
/// and of `verify-ca` (the chain, not the name). Handshake signatures are
/// always checked, so the server still proves it holds the certificate's
/// key.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Checks a database URL and its certificate files without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    connect_config(url).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, p) = split(
            "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        assert_eq!(p.mode, Some(Mode::VerifyFull));
        assert_eq!(p.root_cert, Some(PathBuf::from("/ca.pem")));
        let (rest, p) = split("host=db user=u sslmode=require").unwrap();
        assert_eq!(rest, "host=db user=u");
        assert_eq!(p.mode, Some(Mode::Require));
        assert!(split("postgres://db/app?sslmode=maybe").is_err());
    }

    #[test]
    fn modes_map_to_tokio_postgres() {
        let (c, _) = connect_config("postgres://u@db/app?sslmode=verify-ca").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        let (c, _) = connect_config("postgres://u@db/app").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Prefer);
        let (c, _) = connect_config("postgres://u@db/app?sslmode=disable").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
        assert!(
            connect_config("postgres://u@db/app?sslmode=require&sslrootcert=/nonexistent").is_err()
        );
        assert!(connect_config("postgres://u@db/app?sslcert=/a.pem").is_err());
    }
}
