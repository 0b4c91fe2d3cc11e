//! Node configuration, read from environment variables and checked once at
//! start. The variable names of CONTRACT.md's "Operating" section are fixed;
//! the `FLOWGATE_*` tunables below keep sane defaults.
//!
//! Parsing goes through [`Config::from_vars`] over any map, so tests feed a
//! map and never touch the process environment. Every error names the
//! variable at fault.
//!
//! One submodule per concern parses its own variables into a part; this
//! file assembles [`Config`] from the parts, checks what crosses parts, and
//! holds the helpers every part reads variables through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

mod access;
mod database;
mod drain;
mod eventlog;
mod http;
mod jwt;
mod limits;
mod logging;
mod recovery;
mod redis;
mod server;
mod socketio;
mod transport;

pub use access::AccessPolicy;
pub use eventlog::EventLogConfig;
pub use jwt::{JwtConfig, JwtKey};
pub use logging::LogFormat;

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

/// The whole node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST` + `PORT`.
    pub listen: SocketAddr,
    /// `FLOWGATE_NODE_ID`, generated when unset.
    pub node_id: String,
    /// `REDIS_URL`; `None` runs the embedded in-memory engine.
    pub redis_url: Option<String>,
    /// `FLOWGATE_REDIS_CA_FILE`: PEM CA bundle for a TLS `REDIS_URL`
    /// (the system roots when unset).
    pub redis_ca_file: Option<PathBuf>,
    /// `FLOWGATE_REDIS_CLIENT_CERT`: PEM client certificate chain.
    pub redis_client_cert: Option<PathBuf>,
    /// `FLOWGATE_REDIS_CLIENT_KEY`: its PEM private key.
    pub redis_client_key: Option<PathBuf>,
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
    /// `FLOWGATE_DEMO` (off): serve the demo canvas and the ops view, which
    /// mint development tokens for anyone.
    pub demo: bool,
    /// `FLOWGATE_WORKER_THREADS` (one per core): the runtime's workers.
    pub worker_threads: Option<usize>,
    /// `FLOWGATE_EVENTS_FILE`: relay table; the contract's table when unset.
    pub events_file: Option<PathBuf>,
    /// `FLOWGATE_PING_INTERVAL_MS` (25 000).
    pub ping_interval: Duration,
    /// `FLOWGATE_PING_TIMEOUT_MS` (60 000).
    pub ping_timeout: Duration,
    /// `FLOWGATE_CONNECT_TIMEOUT_MS` (10 000): time to send a CONNECT.
    pub connect_timeout: Duration,
    /// `FLOWGATE_MAX_CONNECTIONS_PER_USER` (100): authenticated sockets one
    /// user may hold on one node; more get CONNECT_ERROR
    /// `TOO_MANY_CONNECTIONS`.
    pub max_connections_per_user: usize,
    /// `FLOWGATE_ADMIN_PORT` (unset): serve `/health` and `/metrics` on
    /// this port too (0 picks a free one), for load balancers and
    /// Prometheus, apart from the client port.
    pub admin_port: Option<u16>,
    /// `FLOWGATE_HTTP_HEADER_TIMEOUT_MS` (10 000): time to send a request's
    /// headers, also between requests of a kept-alive connection.
    pub http_header_timeout: Duration,
    /// `FLOWGATE_HTTP_BODY_TIMEOUT_MS` (30 000): time to send a polling
    /// POST's body once its headers are in (408 beyond).
    pub http_body_timeout: Duration,
    /// `FLOWGATE_MAX_HTTP_CONNECTIONS` (max connections + 1 024): open TCP
    /// connections on the client port, WebSockets included.
    pub max_http_connections: usize,
    /// `FLOWGATE_MAX_UNAUTHENTICATED_PER_IP` (1024): connections from one
    /// address that have not completed CONNECT yet.
    pub max_unauthenticated_per_ip: usize,
    /// `FLOWGATE_MAX_PAYLOAD` (1 000 000 bytes): largest inbound frame.
    pub max_payload: usize,
    /// `FLOWGATE_MAX_PAYLOAD_BEFORE_CONNECT` (65 536 bytes): most a
    /// WebSocket may hold of unfinished frames before its CONNECT is
    /// accepted (at most the max payload).
    pub max_payload_before_connect: usize,
    /// `FLOWGATE_READ_BUDGET_BYTES` (256 MiB): most all connections
    /// together may hold of unfinished frames.
    pub read_budget: usize,
    /// `FLOWGATE_MAX_ATTACHMENTS` (10): binary frames one packet may announce.
    pub max_attachments: usize,
    /// `FLOWGATE_RATE_LIMIT_PER_SEC` (20).
    pub rate_per_sec: u32,
    /// `FLOWGATE_RATE_LIMIT_BURST` (20).
    pub rate_burst: u32,
    /// Tokens of the shared budget a node takes per limiter call.
    pub rate_lease: u32,
    /// How long a node may spend the tokens it took.
    pub rate_lease_for: Duration,
    /// `FLOWGATE_OUTBOUND_QUEUE` (1024 frames per connection).
    pub outbound_queue: usize,
    /// `FLOWGATE_OUTBOUND_QUEUE_BYTES` (2 MiB per connection): the byte
    /// bound of the same queue.
    pub outbound_queue_bytes: usize,
    /// `FLOWGATE_RECOVERY_WINDOW_MS` (120 000): how long a lost session
    /// may be recovered on any node.
    pub recovery_window: Duration,
    /// `FLOWGATE_RECOVERY_MAX_BYTES` (8 MiB): the largest replay one
    /// recovery may queue; beyond it the client starts a new session.
    pub recovery_max_bytes: usize,
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
    /// `FLOWGATE_PRESENCE_REFRESH_MS` (5 000): how often a connection
    /// extends its pod-lock holder entries (and the node prunes its
    /// limiter state).
    pub presence_refresh: Duration,
    /// `FLOWGATE_SESSION_TTL_MS` (20 000): a lock holder not refreshed for
    /// this long loses its locks.
    pub session_ttl: Duration,
    /// `FLOWGATE_PRESENCE_VERIFY_MS` (300 000): how often a node verifies
    /// its presence entries when nothing asked for it sooner; a session's
    /// liveness is its node's heartbeat.
    pub presence_verify: Duration,
    /// `FLOWGATE_REDIS_TIMEOUT_MS` (1 000): per-command timeout.
    pub redis_timeout: Duration,
    /// `FLOWGATE_ROOM_LOG_LEN` (1 000): events kept per room stream.
    pub room_log_len: u64,
    /// `FLOWGATE_ROOM_LOG_TTL_SECS` (86 400): idle room streams expire.
    pub room_log_ttl: Duration,
    /// `FLOWGATE_BUS_FORMAT=json`: publish room messages in the first
    /// releases' JSON (for a rolling upgrade from them); default `binary`.
    pub bus_json: bool,
    /// `FLOWGATE_PUBLISH_LINGER_US` (1 000): a node's publish calls per
    /// Redis server (per room on a cluster) are at least this far apart;
    /// events that come in between go together in the next call. 0: only
    /// while a call is in flight.
    pub publish_linger: Duration,
    /// `FLOWGATE_DB_POOL_SIZE` (16): Postgres connections per node.
    pub db_pool_size: usize,
    /// `FLOWGATE_DB_CONNECT_TIMEOUT_MS` (5 000): wait for a pooled connection.
    pub db_connect_timeout: Duration,
    /// `FLOWGATE_DB_QUERY_TIMEOUT_MS` (30 000): client-side query bound.
    pub db_query_timeout: Duration,
    /// `FLOWGATE_ACCESS_CHECK_TIMEOUT_MS` (5 000): a membership read on a
    /// join, recovery or history request gives up after this (the client
    /// gets `UNAVAILABLE` within a front end's ack timeout, not after 30 s
    /// of a stalled database).
    pub access_check_timeout: Duration,
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
    /// `FLOWGATE_ADVERTISE_URL`: how other nodes reach this one to forward
    /// polling requests; `http://<HOST, or 127.0.0.1 when unspecified>:<bound
    /// port>` when unset.
    pub advertise_url: Option<String>,
    /// `FLOWGATE_UPGRADE_TIMEOUT_MS` (10 000): how long a polling session's
    /// WebSocket probe may take to complete the upgrade.
    pub upgrade_timeout: Duration,
    /// The event-log queue's cap and enqueue grace.
    pub eventlog: EventLogConfig,
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

/// The longest duration any setting takes: 30 days. Beyond it a value is a
/// mistake (a unit mix-up), and sums of durations could overflow.
const MAX_MS: u64 = 30 * 24 * 3600 * 1000;

fn millis(
    vars: &HashMap<String, String>,
    name: &'static str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    let ms = parse(vars, name, default_ms)?;
    if ms > MAX_MS {
        return Err(err(name, format!("must be at most {MAX_MS} ms (30 days)")));
    }
    Ok(Duration::from_millis(ms))
}

/// `v` within `min..=max`, else an error naming `name`.
fn within<T: PartialOrd + std::fmt::Display + Copy>(
    name: &'static str,
    v: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if v < min || v > max {
        return Err(err(name, format!("must be between {min} and {max}")));
    }
    Ok(v)
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
        let server::Server {
            listen,
            node_id,
            service_token,
            allowed_origins,
            events_file,
            demo,
            worker_threads,
        } = server::Server::from_vars(vars)?;
        let redis::Redis {
            redis_url,
            redis_ca_file,
            redis_client_cert,
            redis_client_key,
            redis_timeout,
            room_log_len,
            room_log_ttl,
            node_heartbeat,
            node_dead_after,
            presence_refresh,
            session_ttl,
            presence_verify,
            bus_json,
            publish_linger,
        } = redis::Redis::from_vars(vars)?;
        let database::Database {
            database_url,
            database_direct_url,
            db_pool_size,
            db_connect_timeout,
            db_query_timeout,
            access_check_timeout,
            db_statement_timeout,
            db_slow_query,
            event_retention_months,
            eventlog_batch,
        } = database::Database::from_vars(vars)?;
        let jwt = JwtConfig::from_vars(vars)?;
        let access::Access {
            access,
            access_cache_ttl,
        } = access::Access::from_vars(vars, database_url.is_some())?;
        let eventlog = EventLogConfig::from_vars(vars)?;
        let log_format = LogFormat::from_vars(vars)?;
        let socketio::SocketIo {
            ping_interval,
            ping_timeout,
            connect_timeout,
            max_connections_per_user,
        } = socketio::SocketIo::from_vars(vars)?;
        let limits::Limits {
            max_payload,
            max_payload_before_connect,
            read_budget,
            max_attachments,
            rate_per_sec,
            rate_burst,
            rate_lease,
            rate_lease_for,
            outbound_queue,
            outbound_queue_bytes,
            slow_consumer_grace,
            max_connections,
        } = limits::Limits::from_vars(vars)?;
        let max_payload_before_connect = max_payload_before_connect.min(max_payload);
        let http::Http {
            admin_port,
            http_header_timeout,
            http_body_timeout,
            max_http_connections,
            max_unauthenticated_per_ip,
        } = http::Http::from_vars(vars)?;
        let max_http_connections = max_http_connections.unwrap_or(max_connections + 1024);
        let recovery::Recovery {
            recovery_window,
            recovery_max_bytes,
        } = recovery::Recovery::from_vars(vars)?;
        if recovery_window > room_log_ttl {
            return Err(err(
                "FLOWGATE_RECOVERY_WINDOW_MS",
                "must not exceed FLOWGATE_ROOM_LOG_TTL_SECS: the room log would expire before the window",
            ));
        }
        let drain::Drain {
            drain_notice,
            drain_window,
            shutdown_deadline,
        } = drain::Drain::from_vars(vars)?;
        let transport::Transport {
            advertise_url,
            upgrade_timeout,
        } = transport::Transport::from_vars(vars)?;

        Ok(Config {
            listen,
            node_id,
            redis_url,
            redis_ca_file,
            redis_client_cert,
            redis_client_key,
            database_url,
            database_direct_url,
            jwt,
            service_token,
            access,
            allowed_origins,
            events_file,
            demo,
            worker_threads,
            ping_interval,
            ping_timeout,
            connect_timeout,
            max_connections_per_user,
            admin_port,
            http_header_timeout,
            http_body_timeout,
            max_http_connections,
            max_unauthenticated_per_ip,
            max_payload,
            max_payload_before_connect,
            read_budget,
            max_attachments,
            rate_per_sec,
            rate_burst,
            rate_lease,
            rate_lease_for,
            outbound_queue,
            outbound_queue_bytes,
            recovery_window,
            recovery_max_bytes,
            slow_consumer_grace,
            max_connections,
            drain_notice,
            drain_window,
            shutdown_deadline,
            log_format,
            node_heartbeat,
            node_dead_after,
            presence_refresh,
            session_ttl,
            presence_verify,
            redis_timeout,
            room_log_len,
            room_log_ttl,
            bus_json,
            publish_linger,
            db_pool_size,
            db_connect_timeout,
            db_query_timeout,
            access_check_timeout,
            db_statement_timeout,
            db_slow_query,
            access_cache_ttl,
            event_retention_months,
            eventlog_batch,
            advertise_url,
            upgrade_timeout,
            eventlog,
        })
    }
}

/// A map of variables, for the tests of every part.
#[cfg(test)]
fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_MAX_PAYLOAD", "big"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_MAX_PAYLOAD");
    }

    #[test]
    fn a_database_without_redis_is_one_node_with_the_members_policy() {
        let c = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("DATABASE_URL", "postgres://x@127.0.0.1/db"),
        ]))
        .unwrap();
        assert!(c.redis_url.is_none());
        assert_eq!(c.access, AccessPolicy::Members);
    }
}
