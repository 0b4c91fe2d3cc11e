//! Node configuration, read from environment variables and checked once at
//! start. The variable names of CONTRACT.md's "Operating" section are fixed;
//! the `FLOWGATE_*` tunables below keep sane defaults.
//!
//! Parsing goes through [`Config::from_vars`] over any map, so tests feed a
//! map and never touch the process environment. Every error names the
//! variable at fault.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

/// A variable that is missing, malformed or inconsistent with another.
#[derive(Debug, Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// What is wrong with it, for a human.
    pub message: String,
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

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
    /// Whether a token without `exp` is refused.
    pub require_exp: bool,
}

/// Who may join which flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessPolicy {
    /// Any authenticated user may join any flow (the old gateway's behaviour).
    Open,
    /// The token's claim (named by `FLOWGATE_FLOWS_CLAIM`) lists the flows,
    /// or is `"*"`.
    Claims {
        /// Claim name.
        claim: String,
    },
    /// A membership row in Postgres decides (needs `DATABASE_URL`).
    Members,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The whole node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST` + `PORT`.
    pub listen: SocketAddr,
    /// `FLOWGATE_NODE_ID`, generated when unset.
    pub node_id: String,
    /// `REDIS_URL`; `None` runs the embedded in-memory engine.
    pub redis_url: Option<String>,
    /// `DATABASE_URL` (through PgBouncer).
    pub database_url: Option<String>,
    /// `DATABASE_DIRECT_URL` (migrations).
    pub database_direct_url: Option<String>,
    /// User token checks.
    pub jwt: JwtConfig,
    /// `FLOWGATE_SERVICE_TOKEN`: bearer token of the server API; the API
    /// answers 503 when unset.
    pub service_token: Option<String>,
    /// `FLOWGATE_ACCESS_POLICY`.
    pub access: AccessPolicy,
    /// `FRONTEND_URL`: allowed browser origins; empty allows any.
    pub allowed_origins: Vec<String>,
    /// `FLOWGATE_EVENTS_FILE`: relay table; the contract's table when unset.
    pub events_file: Option<PathBuf>,
    /// `FLOWGATE_PING_INTERVAL_MS` (25 000).
    pub ping_interval: Duration,
    /// `FLOWGATE_PING_TIMEOUT_MS` (60 000).
    pub ping_timeout: Duration,
    /// `FLOWGATE_CONNECT_TIMEOUT_MS` (45 000): time to send a CONNECT.
    pub connect_timeout: Duration,
    /// `FLOWGATE_MAX_PAYLOAD` (1 000 000 bytes): largest inbound frame.
    pub max_payload: usize,
    /// `FLOWGATE_MAX_ATTACHMENTS` (10): binary frames one packet may announce.
    pub max_attachments: usize,
    /// `FLOWGATE_RATE_LIMIT_PER_SEC` (20).
    pub rate_per_sec: u32,
    /// `FLOWGATE_RATE_LIMIT_BURST` (20).
    pub rate_burst: u32,
    /// `FLOWGATE_OUTBOUND_QUEUE` (1024 frames per connection).
    pub outbound_queue: usize,
    /// `FLOWGATE_SLOW_CONSUMER_MS` (5 000): how long a queue may stay full
    /// (dropping volatile events) before the client is disconnected.
    pub slow_consumer_grace: Duration,
    /// `FLOWGATE_MAX_CONNECTIONS` (100 000 per node).
    pub max_connections: usize,
    /// `FLOWGATE_DRAIN_NOTICE_MS` (5 000): how long `/health` says 503
    /// before sockets are closed, so the load balancer notices first.
    pub drain_notice: Duration,
    /// `FLOWGATE_DRAIN_WINDOW_MS` (10 000): sockets are closed spread over
    /// this window, so their reconnects do not arrive as one storm.
    pub drain_window: Duration,
    /// `FLOWGATE_SHUTDOWN_DEADLINE_MS` (30 000): the process exits by then.
    pub shutdown_deadline: Duration,
    /// `FLOWGATE_LOG_FORMAT`: `text` (default) or `json`.
    pub log_format: LogFormat,
    /// `FLOWGATE_NODE_HEARTBEAT_MS` (1 000): heartbeat and dead-node scan
    /// interval (Redis engine).
    pub node_heartbeat: Duration,
    /// `FLOWGATE_NODE_DEAD_AFTER_MS` (5 000): a node silent this long is
    /// dead; its sessions are removed with `user:left`.
    pub node_dead_after: Duration,
    /// `FLOWGATE_PRESENCE_REFRESH_MS` (5 000): how often a node extends its
    /// sessions in Redis.
    pub presence_refresh: Duration,
    /// `FLOWGATE_SESSION_TTL_MS` (20 000): a session not refreshed for this
    /// long is no longer listed.
    pub session_ttl: Duration,
    /// `FLOWGATE_REDIS_TIMEOUT_MS` (1 000): per-command timeout.
    pub redis_timeout: Duration,
    /// `FLOWGATE_ROOM_LOG_LEN` (1 000): events kept per room stream.
    pub room_log_len: u64,
    /// `FLOWGATE_ROOM_LOG_TTL_SECS` (86 400): idle room streams expire.
    pub room_log_ttl: Duration,
    /// `FLOWGATE_DB_POOL_SIZE` (16): Postgres connections per node.
    pub db_pool_size: usize,
    /// `FLOWGATE_DB_CONNECT_TIMEOUT_MS` (5 000): wait for a pooled connection.
    pub db_connect_timeout: Duration,
    /// `FLOWGATE_DB_QUERY_TIMEOUT_MS` (30 000): client-side query bound.
    pub db_query_timeout: Duration,
    /// `FLOWGATE_DB_STATEMENT_TIMEOUT_MS` (30 000): server-side bound.
    pub db_statement_timeout: Duration,
    /// `FLOWGATE_DB_SLOW_QUERY_MS` (1 000): slower queries are logged.
    pub db_slow_query: Duration,
    /// `FLOWGATE_ACCESS_CACHE_SECS` (60): access decisions cached in Redis.
    pub access_cache_ttl: Duration,
    /// `FLOWGATE_EVENT_RETENTION_MONTHS` (12): older event-log partitions
    /// are dropped; 0 keeps everything.
    pub event_retention_months: u32,
    /// `FLOWGATE_EVENTLOG_BATCH` (500): events per write.
    pub eventlog_batch: usize,
}

fn get<'a>(vars: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    vars.get(name)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

fn parse<T: FromStr>(
    vars: &HashMap<String, String>,
    name: &'static str,
    default: T,
) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match get(vars, name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| err(name, format!("cannot parse {v:?}: {e}"))),
    }
}

fn millis(
    vars: &HashMap<String, String>,
    name: &'static str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    parse(vars, name, default_ms).map(Duration::from_millis)
}

fn positive<T: PartialOrd + Default + Copy>(name: &'static str, v: T) -> Result<T, ConfigError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(err(name, "must be greater than zero"))
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads any map of variables.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let host: IpAddr = parse(vars, "HOST", IpAddr::from([0, 0, 0, 0]))?;
        let port: u16 = parse(vars, "PORT", 8080)?;
        let node_id = match get(vars, "FLOWGATE_NODE_ID") {
            Some(id) => id.to_owned(),
            None => format!("node-{}", crate::ids::random_id(8)),
        };
        let redis_url = get(vars, "REDIS_URL").map(str::to_owned);
        if let Some(url) = &redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(err("REDIS_URL", "must start with redis:// or rediss://"));
            }
        }
        let database_url = get(vars, "DATABASE_URL").map(str::to_owned);
        let database_direct_url = get(vars, "DATABASE_DIRECT_URL").map(str::to_owned);

        let jwt = Self::jwt(vars)?;

        let access = match get(vars, "FLOWGATE_ACCESS_POLICY") {
            None if database_url.is_some() => AccessPolicy::Members,
            None | Some("open") => AccessPolicy::Open,
            Some("claims") => AccessPolicy::Claims {
                claim: get(vars, "FLOWGATE_FLOWS_CLAIM")
                    .unwrap_or("flows")
                    .to_owned(),
            },
            Some("members") => AccessPolicy::Members,
            Some(other) => {
                return Err(err(
                    "FLOWGATE_ACCESS_POLICY",
                    format!("{other:?} is not one of members, open, claims"),
                ))
            }
        };
        if access == AccessPolicy::Members && database_url.is_none() {
            return Err(err(
                "FLOWGATE_ACCESS_POLICY",
                "the members policy reads memberships from Postgres: set DATABASE_URL, or choose open or claims",
            ));
        }
        if database_url.is_some() && redis_url.is_none() {
            return Err(err(
                "DATABASE_URL",
                "the durable event log is fed from a queue in Redis: set REDIS_URL too",
            ));
        }

        let allowed_origins = get(vars, "FRONTEND_URL")
            .map(|v| {
                v.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            })
            .unwrap_or_default();

        let events_file = get(vars, "FLOWGATE_EVENTS_FILE").map(PathBuf::from);
        if let Some(path) = &events_file {
            if !path.is_file() {
                return Err(err(
                    "FLOWGATE_EVENTS_FILE",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }

        let log_format = match get(vars, "FLOWGATE_LOG_FORMAT") {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(err(
                    "FLOWGATE_LOG_FORMAT",
                    format!("{other:?} is not text or json"),
                ))
            }
        };

        let max_payload: usize = positive(
            "FLOWGATE_MAX_PAYLOAD",
            parse(vars, "FLOWGATE_MAX_PAYLOAD", 1_000_000)?,
        )?;
        let ping_interval = millis(vars, "FLOWGATE_PING_INTERVAL_MS", 25_000)?;
        let ping_timeout = millis(vars, "FLOWGATE_PING_TIMEOUT_MS", 60_000)?;
        positive("FLOWGATE_PING_INTERVAL_MS", ping_interval)?;
        positive("FLOWGATE_PING_TIMEOUT_MS", ping_timeout)?;

        let drain_notice = millis(vars, "FLOWGATE_DRAIN_NOTICE_MS", 5_000)?;
        let drain_window = millis(vars, "FLOWGATE_DRAIN_WINDOW_MS", 10_000)?;
        let shutdown_deadline = millis(vars, "FLOWGATE_SHUTDOWN_DEADLINE_MS", 30_000)?;
        if drain_notice + drain_window >= shutdown_deadline {
            return Err(err(
                "FLOWGATE_SHUTDOWN_DEADLINE_MS",
                format!(
                    "must exceed FLOWGATE_DRAIN_NOTICE_MS + FLOWGATE_DRAIN_WINDOW_MS ({} ms), or sockets are cut before they are drained",
                    (drain_notice + drain_window).as_millis()
                ),
            ));
        }

        Ok(Config {
            listen: SocketAddr::new(host, port),
            node_id,
            redis_url,
            database_url,
            database_direct_url,
            jwt,
            service_token: get(vars, "FLOWGATE_SERVICE_TOKEN").map(str::to_owned),
            access,
            allowed_origins,
            events_file,
            ping_interval,
            ping_timeout,
            connect_timeout: positive(
                "FLOWGATE_CONNECT_TIMEOUT_MS",
                millis(vars, "FLOWGATE_CONNECT_TIMEOUT_MS", 45_000)?,
            )?,
            max_payload,
            max_attachments: parse(vars, "FLOWGATE_MAX_ATTACHMENTS", 10)?,
            rate_per_sec: positive(
                "FLOWGATE_RATE_LIMIT_PER_SEC",
                parse(vars, "FLOWGATE_RATE_LIMIT_PER_SEC", 20)?,
            )?,
            rate_burst: positive(
                "FLOWGATE_RATE_LIMIT_BURST",
                parse(vars, "FLOWGATE_RATE_LIMIT_BURST", 20)?,
            )?,
            outbound_queue: positive(
                "FLOWGATE_OUTBOUND_QUEUE",
                parse(vars, "FLOWGATE_OUTBOUND_QUEUE", 1024)?,
            )?,
            slow_consumer_grace: millis(vars, "FLOWGATE_SLOW_CONSUMER_MS", 5_000)?,
            max_connections: positive(
                "FLOWGATE_MAX_CONNECTIONS",
                parse(vars, "FLOWGATE_MAX_CONNECTIONS", 100_000)?,
            )?,
            drain_notice,
            drain_window,
            shutdown_deadline,
            log_format,
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
            redis_timeout: positive(
                "FLOWGATE_REDIS_TIMEOUT_MS",
                millis(vars, "FLOWGATE_REDIS_TIMEOUT_MS", 1_000)?,
            )?,
            room_log_len: positive(
                "FLOWGATE_ROOM_LOG_LEN",
                parse(vars, "FLOWGATE_ROOM_LOG_LEN", 1_000)?,
            )?,
            db_pool_size: positive(
                "FLOWGATE_DB_POOL_SIZE",
                parse(vars, "FLOWGATE_DB_POOL_SIZE", 16)?,
            )?,
            db_connect_timeout: positive(
                "FLOWGATE_DB_CONNECT_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_CONNECT_TIMEOUT_MS", 5_000)?,
            )?,
            db_query_timeout: positive(
                "FLOWGATE_DB_QUERY_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_QUERY_TIMEOUT_MS", 30_000)?,
            )?,
            db_statement_timeout: positive(
                "FLOWGATE_DB_STATEMENT_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_STATEMENT_TIMEOUT_MS", 30_000)?,
            )?,
            db_slow_query: millis(vars, "FLOWGATE_DB_SLOW_QUERY_MS", 1_000)?,
            access_cache_ttl: Duration::from_secs(parse(vars, "FLOWGATE_ACCESS_CACHE_SECS", 60)?),
            event_retention_months: parse(vars, "FLOWGATE_EVENT_RETENTION_MONTHS", 12)?,
            eventlog_batch: positive(
                "FLOWGATE_EVENTLOG_BATCH",
                parse(vars, "FLOWGATE_EVENTLOG_BATCH", 500)?,
            )?,
            room_log_ttl: Duration::from_secs(positive(
                "FLOWGATE_ROOM_LOG_TTL_SECS",
                parse(vars, "FLOWGATE_ROOM_LOG_TTL_SECS", 86_400)?,
            )?),
        })
    }

    fn jwt(vars: &HashMap<String, String>) -> Result<JwtConfig, ConfigError> {
        use jsonwebtoken::Algorithm;
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
            leeway: Duration::from_secs(parse(vars, "JWT_LEEWAY_SECS", 5)?),
            issuer: get(vars, "JWT_ISSUER").map(str::to_owned),
            audience: get(vars, "JWT_AUDIENCE")
                .map(|v| v.split(',').map(|a| a.trim().to_owned()).collect()),
            require_exp: parse(vars, "JWT_REQUIRE_EXP", true)?,
        };
        // Building the key now turns a bad PEM into a start-up error.
        crate::auth::TokenVerifier::new(&jwt).map_err(|e| {
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
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_with_a_secret() {
        let c = Config::from_vars(&vars(&[("JWT_ACCESS_TOKEN_SECRET", "s")])).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.ping_timeout, Duration::from_secs(60));
        assert_eq!(c.max_payload, 1_000_000);
        assert_eq!(c.rate_per_sec, 20);
        assert_eq!(c.access, AccessPolicy::Open);
        assert!(c.redis_url.is_none());
    }

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_vars(&vars(&[])).unwrap_err();
        assert_eq!(e.var, "JWT_ACCESS_TOKEN_SECRET");
        let e = Config::from_vars(&vars(&[("JWT_ACCESS_TOKEN_SECRET", "s"), ("PORT", "http")]))
            .unwrap_err();
        assert_eq!(e.var, "PORT");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_ACCESS_POLICY", "members"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_ACCESS_POLICY");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("JWT_ALGORITHM", "RS256"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "JWT_ALGORITHM");
        let e = Config::from_vars(&vars(&[("JWT_PUBLIC_KEY_FILE", "/nonexistent/key.pem")]))
            .unwrap_err();
        assert_eq!(e.var, "JWT_PUBLIC_KEY_FILE");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_MAX_PAYLOAD", "0"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_MAX_PAYLOAD");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_SHUTDOWN_DEADLINE_MS", "1000"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_SHUTDOWN_DEADLINE_MS");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("DATABASE_URL", "postgres://x@127.0.0.1/db"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
    }

    #[test]
    fn origins_are_split_and_trimmed() {
        let c = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FRONTEND_URL", "https://a.example/, https://b.example"),
        ]))
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }
}
