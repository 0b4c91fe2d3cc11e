//! The node's shared state, built once from the configuration and handed to
//! every handler as a cheap `Arc`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Context;

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
}

impl App {
    /// Builds a node. `hub` shares an in-memory engine between in-process
    /// nodes (tests); `None` gives the node its own.
    pub fn new(config: Config, hub: Option<Arc<MemoryHub>>) -> anyhow::Result<Arc<Self>> {
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
        let engine = match &config.redis_url {
            None => hub.unwrap_or_default().engine(
                &config.node_id,
                fanout.clone(),
                config.rate_per_sec,
                config.rate_burst,
            ),
            Some(_) => anyhow::bail!(
                "REDIS_URL: the Redis engine is not built into this version yet; unset REDIS_URL"
            ),
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
        }))
    }
}
