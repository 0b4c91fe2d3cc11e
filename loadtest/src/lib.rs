//! flowgate's load generator, as a library so the smoke test can call the
//! scenario runners directly.
//!
//! It speaks Socket.IO v4 over Engine.IO v4 WebSocket frames to any
//! Socket.IO server that implements the flow-room contract (flowgate, or the
//! Node baseline in `loadtest/baseline/`), spreads connections round-robin
//! over several target nodes and binds source addresses round-robin over
//! several loopback IPs.
//!
//! Modules:
//! - [`client`]: one connection: TCP (with source bind), WebSocket, the
//!   Engine.IO handshake, the `/flows` CONNECT with a minted JWT, `flow:join`,
//!   and cheap substring parsing of the frames the scenarios care about.
//! - [`stats`]: sharded HdrHistograms, latency summaries, RSS of processes.
//! - [`idle`], [`relay`], [`limit`]: the scenarios (`idle`; `rooms`,
//!   `broadcast` and `ramp`; `limit`).
//! - [`report`]: the JSON report types and the plain-text tables.
//! - [`svg`]: hand-written SVG line charts (latency distribution, ramp).
//! - [`procs`]: child processes (Redis, flowgate nodes, baseline nodes,
//!   idle workers) on free loopback ports, stopped by PID.
//! - [`compare`]: the side-by-side run, flowgate vs the baseline.

pub mod capacity;
pub mod client;
pub mod compare;
pub mod idle;
pub mod limit;
pub mod procs;
pub mod redis_stats;
pub mod relay;
pub mod report;
pub mod stats;
pub mod svg;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Where and how to connect; shared by every scenario.
#[derive(Debug, Clone)]
pub struct Common {
    /// Socket.IO servers; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Source addresses; connection `i` binds `source_ips[i % len]` (empty:
    /// let the kernel choose).
    pub source_ips: Vec<IpAddr>,
    /// HS256 secret the servers check tokens with.
    pub secret: String,
    /// Connections being set up at once.
    pub connect_concurrency: usize,
    /// Time one connection may take from TCP connect to its `flow:join` ack.
    pub connect_timeout: Duration,
    /// Prefix of flow ids and user ids, so two runs against the same
    /// servers do not share rooms.
    pub run_id: String,
}

impl Common {
    /// Defaults for `targets`, with the given secret.
    pub fn new(targets: Vec<SocketAddr>, secret: &str) -> Self {
        Common {
            targets,
            source_ips: Vec::new(),
            secret: secret.to_owned(),
            connect_concurrency: 200,
            connect_timeout: Duration::from_secs(30),
            run_id: format!("lt{}", std::process::id()),
        }
    }

    /// The target of connection `i`.
    pub fn target(&self, i: usize) -> SocketAddr {
        self.targets[i % self.targets.len()]
    }

    /// The source address of connection `i`, if any were given.
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        if self.source_ips.is_empty() {
            None
        } else {
            Some(self.source_ips[i % self.source_ips.len()])
        }
    }
}

/// Raises this process's open-files soft limit to its hard limit; returns
/// the new soft limit.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024),
    }
}
