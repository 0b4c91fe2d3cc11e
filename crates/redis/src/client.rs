//! The fred clients and Redis liveness: how the two clients are built
//! (URL forms, TLS, failover), the pinger that keeps `up` current, the
//! fail-fast guard every engine call uses, and `/health`.
//!
//! Every URL form of the contract goes through fred's `Config::from_url`:
//! one server, Redis Cluster (`redis-cluster://`: fred routes each command,
//! script and `SSUBSCRIBE` by the slot of its first key or channel) and
//! Sentinel (`redis-sentinel://`: fred asks the sentinels for the master
//! and asks again on every reconnect). A failover is a reconnect to fred:
//! it announces each new connection on `reconnect_rx`, where the pump
//! re-subscribes the node's rooms and fills the gap from the room logs.
//!
//! TLS (`rediss…://`) is rustls with the CA bundle and client certificate of
//! [`RedisTls`]; there is no plaintext fallback, and a server that does not
//! complete a handshake at start is a start-up error.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_engine::{EngineError, EngineHealth};
use fred::prelude::*;
use fred::types::config::{ReconnectError, TlsConfig, TlsConnector, TlsHostMapping};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{RedisEngine, RedisSettings, RedisTls};

/// How long the start-up TLS check waits for a connection and a handshake.
const TLS_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

fn config_error(message: impl std::fmt::Display) -> EngineError {
    EngineError(format!("REDIS_URL: {message}"))
}

/// The fred configuration of `s.url`, with this node's TLS material in
/// place of fred's default (system roots, no client certificate).
pub(crate) fn config(s: &RedisSettings) -> Result<Config, EngineError> {
    let mut config = Config::from_url(&s.url).map_err(config_error)?;
    let tls_url = s.url.starts_with("rediss") || s.url.starts_with("valkeys");
    let has_material =
        s.tls.ca_file.is_some() || s.tls.client_cert.is_some() || s.tls.client_key.is_some();
    if tls_url {
        config.tls = Some(TlsConfig {
            connector: TlsConnector::from(rustls_config(&s.tls)?),
            // The name checked is the host the client dials: the URL's,
            // or the address a cluster reports for its nodes (so their
            // certificates name those, as ElastiCache's do).
            hostnames: TlsHostMapping::None,
        });
    } else if has_material {
        return Err(config_error(
            "TLS certificates are configured but the URL is not rediss://",
        ));
    }
    Ok(config)
}

/// A rustls client configuration: the CA bundle (or the system roots) and
/// an optional client certificate. The ring provider is named explicitly
/// so that no process-wide default provider has to be installed.
fn rustls_config(tls: &RedisTls) -> Result<rustls::ClientConfig, EngineError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_error(format!("CA file {}: {e}", path.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| config_error(format!("CA file {}: {e}", path.display())))?;
            }
        }
        None => {
            let native = fred::rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(config_error(
            "no CA certificate to verify the server with (set FLOWGATE_REDIS_CA_FILE)",
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(config_error)?
    .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_error(format!("client certificate {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| config_error(format!("client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| config_error(format!("client certificate: {e}")))
        }
        _ => Err(config_error(
            "a client certificate needs both its certificate and its key",
        )),
    }
}

/// For a TLS URL, completes one handshake with the first configured host
/// that accepts a TCP connection. A host that accepts TCP but not the
/// handshake (a plaintext server, a certificate that does not verify) is
/// a configuration error: refusing to start says so at once, where a
/// client retrying in the background would only show a 503. No host
/// reachable at all is not an error: the node starts degraded, as without
/// TLS.
pub(crate) async fn check_tls(config: &Config) -> Result<(), EngineError> {
    let Some(tls) = &config.tls else {
        return Ok(());
    };
    let TlsConnector::Rustls(connector) = &tls.connector;
    for server in config.server.hosts() {
        let addr = (server.host.to_string(), server.port);
        let tcp =
            match tokio::time::timeout(TLS_CHECK_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(tcp)) => tcp,
                _ => continue,
            };
        let name = server
            .tls_server_name
            .as_ref()
            .unwrap_or(&server.host)
            .to_string();
        let name = ServerName::try_from(name).map_err(config_error)?;
        return match tokio::time::timeout(TLS_CHECK_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(config_error(format!(
                "TLS handshake with {}:{} failed: {e} (no plaintext fallback)",
                server.host, server.port
            ))),
            Err(_) => Err(config_error(format!(
                "{}:{} accepted a connection but completed no TLS handshake in {TLS_CHECK_TIMEOUT:?} (no plaintext fallback)",
                server.host, server.port
            ))),
        };
    }
    warn!("no Redis host reachable yet for the TLS check; starting degraded");
    Ok(())
}

pub(crate) fn build_client(
    config: &Config,
    s: &RedisSettings,
    broadcast: usize,
) -> Result<Client, Error> {
    let mut config = config.clone();
    // Start even if Redis is down: the node serves degraded (503 on
    // /health) and connects when Redis appears.
    config.fail_fast = false;
    Builder::from_config(config)
        .with_performance_config(|p| {
            p.default_command_timeout = s.command_timeout;
            p.broadcast_channel_capacity = broadcast;
        })
        .with_connection_config(connection_config)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2))
        .build()
}

/// How every connection to Redis behaves (one function, so a test can
/// check what the guarantees rest on).
fn connection_config(c: &mut fred::types::config::ConnectionConfig) {
    c.connection_timeout = Duration::from_secs(2);
    // fred leaves Nagle's algorithm on by default. A node writes
    // its next call (a lease, another group's publish) while one
    // is in flight: with Nagle it waits for the ACK of the first,
    // which Redis's reply carries — a network round trip added to
    // the second call (not seen on loopback, where ACKs are
    // immediate). Calls are written whole, so Nagle gains nothing.
    c.tcp = fred::types::config::TcpConfig {
        nodelay: Some(true),
        ..Default::default()
    };
    // One attempt: a script retried after a dropped connection may
    // already have run (a room event published twice). Callers
    // refuse the one operation instead; the client retries.
    c.max_command_attempts = 1;
    // Replies that mean "this is not the master (any more)": a
    // master demoted without dropping its connections (a Sentinel
    // or manual failover) answers READONLY, a shard mid-failover
    // CLUSTERDOWN or MASTERDOWN. Each makes fred reconnect, so it
    // asks the sentinels or the cluster again for the master.
    c.reconnect_errors = vec![
        ReconnectError::ClusterDown,
        ReconnectError::Loading,
        ReconnectError::MasterDown,
        ReconnectError::ReadOnly,
    ];
}

impl RedisEngine {
    pub(crate) fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// The Redis time (ms) by which a command sent now must have run: past
    /// it, the caller has given up on the command (or soon will), so a
    /// script that reaches Redis late (a stalled link) must not act. Three
    /// quarters of the command timeout leave the reply time to arrive
    /// before the caller's own timeout fires.
    pub(crate) fn deadline_ms(&self) -> i64 {
        let local_ms = flowgate_engine::now_us() as i64 / 1000;
        local_ms
            + self.0.clock_offset_ms.load(Ordering::Relaxed)
            + self.0.settings.command_timeout.as_millis() as i64 * 3 / 4
    }

    pub(crate) fn ensure_up(&self) -> Result<(), EngineError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(EngineError("Redis is unreachable".into()))
        }
    }

    /// One `TIME` round trip: liveness, latency, and the offset between
    /// Redis time and this node's clock (for publish deadlines).
    pub(crate) async fn ping_once(&self) -> bool {
        let started = Instant::now();
        let before_ms = flowgate_engine::now_us() as i64 / 1000;
        let reply = tokio::time::timeout(
            self.0.settings.command_timeout,
            self.0
                .client
                .custom::<Vec<String>, String>(fred::cmd!("TIME"), Vec::new()),
        )
        .await;
        let ok = matches!(reply, Ok(Ok(_)));
        if let Ok(Ok(t)) = reply {
            let rtt = started.elapsed();
            self.0
                .latency_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            if let (Some(Ok(secs)), Some(Ok(us))) = (
                t.first().map(|s| s.parse::<i64>()),
                t.get(1).map(|s| s.parse::<i64>()),
            ) {
                let redis_ms = secs * 1000 + us / 1000;
                let local_ms = before_ms + rtt.as_millis() as i64 / 2;
                self.0
                    .clock_offset_ms
                    .store(redis_ms - local_ms, Ordering::Relaxed);
            }
        }
        let was = self.0.up.swap(ok, Ordering::Relaxed);
        self.0.metrics.up.set(ok as i64);
        match (was, ok) {
            (true, false) => {
                self.0.metrics.outages.inc();
                warn!("Redis unreachable: /health reports 503, rate limits fall back to per-node");
            }
            (false, true) => info!("Redis reachable"),
            _ => {}
        }
        ok
    }

    /// Keeps `up` current; on recovery, re-registers presence at once.
    pub(crate) async fn pinger(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let was = self.is_up();
            if self.ping_once().await && !was {
                self.hold_reaping();
                self.0.repair_node_set.store(true, Ordering::Relaxed);
                self.heartbeat().await;
                self.verify_presence().await;
            }
        }
    }
}

#[async_trait]
impl EngineHealth for RedisEngine {
    async fn ping(&self) -> Result<Duration, EngineError> {
        // The pinger keeps this current, so a load balancer hitting
        // /health every second costs Redis nothing.
        self.ensure_up()?;
        Ok(Duration::from_micros(
            self.0.latency_us.load(Ordering::Relaxed),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_send_each_call_at_once_and_never_retry_one() {
        let mut c = fred::types::config::ConnectionConfig::default();
        assert_ne!(c.tcp.nodelay, Some(true), "fred's default keeps Nagle");
        connection_config(&mut c);
        assert_eq!(c.tcp.nodelay, Some(true));
        // A retried script may already have run: a room event published
        // twice.
        assert_eq!(c.max_command_attempts, 1);
    }
}
