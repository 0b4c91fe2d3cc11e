//! The Redis engine: `REDIS_URL` (one server, Redis Cluster or Sentinel,
//! each plain or TLS) and its certificates, its command timeout, the room
//! streams, and the node heartbeat and presence timings. Without
//! `REDIS_URL` the node runs the embedded in-memory engine and the timings
//! go unused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{err, get, millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Redis {
    pub(super) redis_url: Option<String>,
    pub(super) redis_ca_file: Option<PathBuf>,
    pub(super) redis_client_cert: Option<PathBuf>,
    pub(super) redis_client_key: Option<PathBuf>,
    pub(super) redis_timeout: Duration,
    pub(super) room_log_len: u64,
    pub(super) room_log_ttl: Duration,
    pub(super) node_heartbeat: Duration,
    pub(super) node_dead_after: Duration,
    pub(super) presence_refresh: Duration,
    pub(super) session_ttl: Duration,
    pub(super) presence_verify: Duration,
    pub(super) bus_json: bool,
    pub(super) publish_linger: Duration,
}

impl Redis {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let redis_url = get(vars, "REDIS_URL").map(str::to_owned);
        let tls = match &redis_url {
            Some(url) => check_url(url)?,
            None => false,
        };
        let file = |var: &'static str| -> Result<Option<PathBuf>, ConfigError> {
            let Some(path) = get(vars, var).map(PathBuf::from) else {
                return Ok(None);
            };
            if !tls {
                return Err(err(
                    var,
                    "needs a TLS REDIS_URL (rediss://, rediss-cluster:// or rediss-sentinel://)",
                ));
            }
            if !path.is_file() {
                return Err(err(
                    var,
                    format!("{} is not a readable file", path.display()),
                ));
            }
            Ok(Some(path))
        };
        let redis_ca_file = file("FLOWGATE_REDIS_CA_FILE")?;
        let redis_client_cert = file("FLOWGATE_REDIS_CLIENT_CERT")?;
        let redis_client_key = file("FLOWGATE_REDIS_CLIENT_KEY")?;
        if redis_client_cert.is_some() != redis_client_key.is_some() {
            return Err(err(
                "FLOWGATE_REDIS_CLIENT_CERT",
                "needs FLOWGATE_REDIS_CLIENT_KEY, and the other way round",
            ));
        }
        let r = Redis {
            redis_url,
            redis_ca_file,
            redis_client_cert,
            redis_client_key,
            node_heartbeat: positive(
                "FLOWGATE_NODE_HEARTBEAT_MS",
                millis(vars, "FLOWGATE_NODE_HEARTBEAT_MS", 1_000)?,
            )?,
            node_dead_after: positive(
                "FLOWGATE_NODE_DEAD_AFTER_MS",
                millis(vars, "FLOWGATE_NODE_DEAD_AFTER_MS", 5_000)?,
            )?,
            presence_refresh: positive(
                "FLOWGATE_PRESENCE_REFRESH_MS",
                millis(vars, "FLOWGATE_PRESENCE_REFRESH_MS", 5_000)?,
            )?,
            session_ttl: positive(
                "FLOWGATE_SESSION_TTL_MS",
                millis(vars, "FLOWGATE_SESSION_TTL_MS", 20_000)?,
            )?,
            presence_verify: positive(
                "FLOWGATE_PRESENCE_VERIFY_MS",
                millis(vars, "FLOWGATE_PRESENCE_VERIFY_MS", 300_000)?,
            )?,
            redis_timeout: positive(
                "FLOWGATE_REDIS_TIMEOUT_MS",
                millis(vars, "FLOWGATE_REDIS_TIMEOUT_MS", 1_000)?,
            )?,
            room_log_len: positive(
                "FLOWGATE_ROOM_LOG_LEN",
                parse(vars, "FLOWGATE_ROOM_LOG_LEN", 1_000)?,
            )?,
            room_log_ttl: Duration::from_secs(positive(
                "FLOWGATE_ROOM_LOG_TTL_SECS",
                parse(vars, "FLOWGATE_ROOM_LOG_TTL_SECS", 86_400)?,
            )?)
            .min(Duration::from_secs(365 * 24 * 3600)),
            // The room bus's wire format (`flowgate_engine::wire`): `json`
            // only while nodes of the first releases are still running.
            bus_json: match get(vars, "FLOWGATE_BUS_FORMAT").unwrap_or("binary") {
                "binary" => false,
                "json" => true,
                _ => return Err(err("FLOWGATE_BUS_FORMAT", "must be `binary` or `json`")),
            },
            publish_linger: {
                let us: u64 = parse(vars, "FLOWGATE_PUBLISH_LINGER_US", 1_000)?;
                // Every event of a busy node may wait this long: more than
                // a few milliseconds would be felt by users.
                if us > 100_000 {
                    return Err(err(
                        "FLOWGATE_PUBLISH_LINGER_US",
                        "must be at most 100000 (100 ms)",
                    ));
                }
                Duration::from_micros(us)
            },
        };
        // A node is declared dead only after it missed at least two beats,
        // and a lock holder keeps its locks only while it was refreshed at
        // least once in its TTL: otherwise a live node would be reaped, or
        // a live holder's locks released, by one late tick.
        if r.node_dead_after < r.node_heartbeat * 2 {
            return Err(err(
                "FLOWGATE_NODE_DEAD_AFTER_MS",
                "must be at least twice FLOWGATE_NODE_HEARTBEAT_MS",
            ));
        }
        if r.session_ttl < r.presence_refresh * 2 {
            return Err(err(
                "FLOWGATE_SESSION_TTL_MS",
                "must be at least twice FLOWGATE_PRESENCE_REFRESH_MS",
            ));
        }
        Ok(r)
    }
}

/// Checks the scheme of `REDIS_URL`; returns whether it asks for TLS.
fn check_url(url: &str) -> Result<bool, ConfigError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
    let tls = scheme.starts_with("rediss");
    match scheme {
        "redis" | "rediss" | "redis-cluster" | "rediss-cluster" => {}
        "redis-sentinel" | "rediss-sentinel" => {
            // fred needs the name of the master set the sentinels watch.
            if !rest.contains("sentinelServiceName=") {
                return Err(err(
                    "REDIS_URL",
                    "a redis-sentinel:// URL needs ?sentinelServiceName=<master name>",
                ));
            }
        }
        _ => {
            return Err(err(
                "REDIS_URL",
                "must start with redis://, rediss://, redis-cluster://, rediss-cluster://, redis-sentinel:// or rediss-sentinel://",
            ))
        }
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::super::{vars, Config};

    fn with(pairs: &[(&str, &str)]) -> Result<Config, super::ConfigError> {
        let mut all = vec![("JWT_ACCESS_TOKEN_SECRET", "s")];
        all.extend_from_slice(pairs);
        Config::from_vars(&vars(&all))
    }

    #[test]
    fn every_url_form_of_the_contract_is_accepted() {
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://cache.example:6379",
            "redis-cluster://10.0.0.1:6379?node=10.0.0.2:6379&node=10.0.0.3:6379",
            "rediss-cluster://cfg.example:6379",
            "redis-sentinel://10.0.0.1:26379?sentinelServiceName=main&node=10.0.0.2:26379",
        ] {
            assert_eq!(
                with(&[("REDIS_URL", url)]).unwrap().redis_url.as_deref(),
                Some(url)
            );
        }
    }

    #[test]
    fn the_publish_linger_is_bounded_and_named_when_wrong() {
        assert_eq!(with(&[]).unwrap().publish_linger.as_micros(), 1000);
        let c = with(&[("FLOWGATE_PUBLISH_LINGER_US", "0")]).unwrap();
        assert!(c.publish_linger.is_zero());
        for bad in ["100001", "-1", "1ms", ""] {
            let e = with(&[("FLOWGATE_PUBLISH_LINGER_US", bad)]);
            if bad.is_empty() {
                // An empty variable is an unset one (as for every variable).
                assert_eq!(e.unwrap().publish_linger.as_micros(), 1000);
                continue;
            }
            assert_eq!(e.unwrap_err().var, "FLOWGATE_PUBLISH_LINGER_US", "{bad}");
        }
    }

    #[test]
    fn the_presence_verification_defaults_to_five_minutes_and_is_positive() {
        assert_eq!(with(&[]).unwrap().presence_verify.as_secs(), 300);
        let c = with(&[("FLOWGATE_PRESENCE_VERIFY_MS", "2500")]).unwrap();
        assert_eq!(c.presence_verify.as_millis(), 2500);
        for bad in ["0", "-5", "5s"] {
            let e = with(&[("FLOWGATE_PRESENCE_VERIFY_MS", bad)]);
            assert_eq!(e.unwrap_err().var, "FLOWGATE_PRESENCE_VERIFY_MS", "{bad}");
        }
    }

    #[test]
    fn bad_urls_and_tls_files_name_their_variable() {
        let e = with(&[("REDIS_URL", "http://x")]).unwrap_err();
        assert_eq!(e.var, "REDIS_URL");
        let e = with(&[("REDIS_URL", "redis-sentinel://x:26379")]).unwrap_err();
        assert_eq!(e.var, "REDIS_URL");
        // Certificates with a plaintext URL would be silently unused.
        let e = with(&[
            ("REDIS_URL", "redis://x:6379"),
            ("FLOWGATE_REDIS_CA_FILE", "Cargo.toml"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_REDIS_CA_FILE");
        let e = with(&[
            ("REDIS_URL", "rediss://x:6379"),
            ("FLOWGATE_REDIS_CA_FILE", "/nonexistent/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_REDIS_CA_FILE");
        let e = with(&[
            ("REDIS_URL", "rediss://x:6379"),
            ("FLOWGATE_REDIS_CLIENT_CERT", "Cargo.toml"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_REDIS_CLIENT_CERT");
        let c = with(&[
            ("REDIS_URL", "rediss://x:6379"),
            ("FLOWGATE_REDIS_CA_FILE", "Cargo.toml"),
        ])
        .unwrap();
        assert!(c.redis_ca_file.is_some());
    }
}
