//! The node's shared state, built once from the configuration and handed to
//! every handler as a cheap `Arc`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Context;
use flowgate_redis::{RedisEngine, RedisSettings};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::drain::Drain;
use crate::engine::memory::MemoryHub;
use crate::engine::Engine;
use crate::events::RelayTable;
use crate::metrics::Metrics;
use crate::rooms::{Fanout, Rooms};

/// Everything a handler or connection needs.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// User token checks.
    pub verifier: TokenVerifier,
    /// Which client events are relayed, and how.
    pub table: RelayTable,
    /// Bus, presence and limiter.
    pub engine: Engine,
    /// Local room membership and subscriptions.
    pub rooms: Rooms,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Drain state and connection tracking.
    pub drain: Drain,
    /// Open connections, against `max_connections`.
    pub connections: AtomicUsize,
    /// Background tasks (engine maintenance) and their stop signal.
    pub background: (TaskTracker, CancellationToken),
}

impl App {
    /// Builds a node. `hub` shares an in-memory engine between in-process
    /// nodes (tests); `None` gives the node its own.
    pub async fn new(config: Config, hub: Option<Arc<MemoryHub>>) -> anyhow::Result<Arc<Self>> {
        let table = match &config.events_file {
            Some(path) => RelayTable::load(path)
                .map_err(|e| anyhow::anyhow!("FLOWGATE_EVENTS_FILE: {}: {e}", path.display()))?,
            None => RelayTable::contract_default(),
        };
        let metrics = Metrics::new(
            table
                .rules()
                .flat_map(|r| [r.event.as_str(), r.emit.as_str()]),
        );
        let verifier = TokenVerifier::new(&config.jwt).context("JWT key")?;
        let fanout = Arc::new(Fanout::new(metrics.clone()));
        let background = (TaskTracker::new(), CancellationToken::new());
        let engine = match &config.redis_url {
            None => hub.unwrap_or_default().engine(
                &config.node_id,
                fanout.clone(),
                config.rate_per_sec,
                config.rate_burst,
            ),
            Some(url) => RedisEngine::start(
                RedisSettings {
                    url: url.clone(),
                    node_id: config.node_id.clone(),
                    rate_per_sec: config.rate_per_sec,
                    burst: config.rate_burst,
                    heartbeat: config.node_heartbeat,
                    dead_after: config.node_dead_after,
                    presence_refresh: config.presence_refresh,
                    session_ttl: config.session_ttl,
                    command_timeout: config.redis_timeout,
                    log_len: config.room_log_len,
                    log_ttl: config.room_log_ttl,
                },
                fanout.clone(),
                metrics.registry(),
                &background.0,
                background.1.clone(),
            )
            .await
            .context("REDIS_URL")?,
        };
        let rooms = Rooms::new(fanout, engine.bus.clone());
        Ok(Arc::new(App {
            drain: Drain::new(config.drain_window),
            config: Arc::new(config),
            verifier,
            table,
            engine,
            rooms,
            metrics,
            connections: AtomicUsize::new(0),
            background,
        }))
    }
}
