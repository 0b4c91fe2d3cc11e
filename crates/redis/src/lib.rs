//! The Redis engine: what lets any number of flowgate nodes act as one
//! gateway. Built on `fred`.
//!
//! - **Room bus**: a room event is appended to the room's stream (its id is
//!   the event's offset) and published on the room's shard channel in one
//!   Lua script, so order and offsets agree. A node `SSUBSCRIBE`s to a room's
//!   channel only while it holds a member of the room. Volatile events
//!   (cursors) skip the stream: they are never replayed.
//! - **Presence**: per room a hash (socket id → session JSON) and a sorted
//!   set (socket id → expiry), under the room's hash tag; each node also
//!   lists its sessions in a set of its own and heartbeats into
//!   `flowgate:nodes`. When a node stops heartbeating, a surviving node
//!   claims it (a lock with a TTL), removes its sessions and publishes
//!   `user:left` for each.
//! - **Limiter**: GCRA in Lua with Redis time, behind a local `governor`
//!   filter so an abusive client costs no round trip; a node takes a few
//!   tokens of a user's budget per call (a lease) and spends them locally,
//!   so an active user costs one call per few events. While Redis is
//!   unreachable each node enforces the budget alone (the local filter):
//!   a user spread over k nodes may get up to k× the budget until Redis is
//!   back. Each such decision is counted in `flowgate_limiter_fallback_total`.
//! - **Faults**: a pinger keeps `up` current; while Redis is down, engine
//!   calls fail fast and `/health` says 503. When it returns, the node
//!   re-subscribes its rooms and re-registers its live sessions (announcing
//!   with `user:joined` any that had been lost).
//!
//! One file per job: `client` (connections, liveness, health), `keys`
//! (every key and channel name), `metrics`, `bus` (publish/subscribe),
//! `batches` (group commit of a room's, or a server's, events),
//! `subscriber` (the message pump and re-subscription), `presence`,
//! `reaper` (dead nodes and the maintenance loop), `limiter`,
//! `event_queue`, `access_cache`, `locks` (pod locks), `scripts` and
//! `lock_scripts` (the Lua), `registry` (the node directory: where other
//! nodes forward polling requests).

mod access_cache;
mod batches;
mod bus;
mod client;
mod event_queue;
mod keys;
mod limiter;
mod lock_scripts;
mod locks;
mod metrics;
mod presence;
mod reaper;
mod registry;
mod scripts;
mod sessions;
mod subscriber;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use flowgate_engine::{Deliver, Engine, EngineError};
use fred::prelude::*;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::metrics::Metrics;
use crate::scripts::Scripts;
pub use registry::NodeDirectory;

/// TLS material for a `rediss://` URL (any of its forms: one server,
/// `rediss-cluster://`, `rediss-sentinel://`). Files are PEM.
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// The CA bundle that signs the servers' certificates; the system's
    /// roots when unset.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain, for servers that require one
    /// (`tls-auth-clients yes`); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub client_key: Option<PathBuf>,
}

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` (one server), `redis-cluster://` or
    /// `rediss-cluster://host:port?node=host:port&…` (Redis Cluster),
    /// `redis-sentinel://` or `rediss-sentinel://host:port?sentinelServiceName=…&node=…`.
    pub url: String,
    /// Certificates for the TLS forms of `url`; must be empty otherwise.
    pub tls: RedisTls,
    /// This node's id (heartbeats, session ownership).
    pub node_id: String,
    /// Events per second per user.
    pub rate_per_sec: u32,
    /// Burst per user.
    pub burst: u32,
    /// Tokens of a user's shared budget a node takes per Redis call (1:
    /// one call per event).
    pub lease: u32,
    /// How long a node may spend tokens it took; unspent ones are dropped.
    pub lease_for: Duration,
    /// How often the node heartbeats and looks for dead nodes.
    pub heartbeat: Duration,
    /// A node silent this long is dead and its sessions are removed.
    pub dead_after: Duration,
    /// How often the node prunes its local limiter state and leases.
    pub presence_refresh: Duration,
    /// How often the node verifies its presence entries when nothing asked
    /// for it sooner (see `presence.rs`); they expire, as a backstop, after
    /// three of these without one.
    pub presence_verify: Duration,
    /// Per-command timeout.
    pub command_timeout: Duration,
    /// Approximate number of events kept per room stream (for recovery).
    pub log_len: u64,
    /// A room stream without events for this long is deleted.
    pub log_ttl: Duration,
    /// Publish room messages in the first releases' JSON
    /// (`flowgate_engine::wire`, version 0) instead of the binary format.
    pub bus_json: bool,
    /// A node's publish calls per group (`batches`) are at least this far
    /// apart; zero: batches form only while a call is in flight.
    pub publish_linger: Duration,
    /// Streams the event-log queue is sharded over, by flow (each shard
    /// under its own hash tag, so on a cluster they spread over masters).
    pub queue_shards: u32,
    /// The event-log queue's cap in entries, over all shards (each holds
    /// its share): persisted events are refused beyond it.
    pub queue_max_len: u64,
    /// The event-log queue's cap in bytes of events, split the same way.
    pub queue_max_bytes: u64,
    /// How long after its publication an event may still enter the
    /// event-log queue; history holds back the latest this long.
    pub enqueue_grace: Duration,
}

pub(crate) fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError(e.to_string())
}

/// The shared state of one node's engine, behind the `Arc` of
/// [`RedisEngine`].
pub(crate) struct Inner {
    /// Commands, scripts and `SPUBLISH`.
    pub(crate) client: Client,
    /// Sharded subscriptions only: room traffic arrives on its own
    /// broadcast channel, sized for bursts.
    pub(crate) subscriber: Client,
    pub(crate) settings: RedisSettings,
    /// The node's fan-out: where room messages go, and the record of
    /// which rooms and sessions are local.
    pub(crate) sink: Arc<dyn Deliver>,
    /// The limiter's local first filter (and the per-node budget while
    /// Redis is unreachable).
    pub(crate) local: DefaultKeyedRateLimiter<String>,
    /// Tokens this node took from users' shared budgets and may still spend.
    pub(crate) leases: limiter::Leases,
    pub(crate) scripts: Scripts,
    /// Room events waiting for their group's publish call in flight.
    pub(crate) batches: batches::Batches,
    /// A Redis Cluster: a script may touch one slot only.
    pub(crate) clustered: bool,
    pub(crate) queue: event_queue::QueueState,
    pub(crate) metrics: Metrics,
    /// Kept current by the pinger; engine calls fail fast while false.
    pub(crate) up: AtomicBool,
    /// The last ping's round trip, for `/health`.
    pub(crate) latency_us: AtomicU64,
    /// Redis time minus this node's clock (ms), measured by the pinger.
    pub(crate) clock_offset_ms: AtomicI64,
    /// When this engine started: the origin of `reap_not_before_ms`.
    pub(crate) started: std::time::Instant,
    /// No dead-node scan before this (ms after `started`): set when Redis
    /// comes back, see `reaper`.
    pub(crate) reap_not_before_ms: AtomicU64,
    /// Rebuild this node's session set at the next presence verification
    /// (set when Redis comes back or this node was reaped: it may be gone).
    pub(crate) repair_node_set: AtomicBool,
    /// Verify this node's presence at the next maintenance tick.
    pub(crate) verify_presence: AtomicBool,
}

/// The Redis engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct RedisEngine(pub(crate) Arc<Inner>);

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("node", &self.0.settings.node_id)
            .finish_non_exhaustive()
    }
}

impl RedisEngine {
    /// Connects (waiting up to a few seconds; the node starts degraded if
    /// Redis is not there yet) and starts the background tasks on
    /// `tasks`, which stop when `stop` is cancelled.
    pub async fn start(
        settings: RedisSettings,
        sink: Arc<dyn Deliver>,
        registry: &Registry,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Engine, EngineError> {
        let config = client::config(&settings)?;
        // A TLS URL whose server does not complete a handshake is refused
        // here, at start, rather than left retrying in the background.
        client::check_tls(&config).await?;
        let client = client::build_client(&config, &settings, 32).map_err(err)?;
        // Room traffic arrives on this client's broadcast channel; a large
        // capacity absorbs bursts while the pump task is busy.
        let subscriber = client::build_client(&config, &settings, 1 << 16).map_err(err)?;
        client.connect();
        subscriber.connect();
        for c in [&client, &subscriber] {
            match tokio::time::timeout(Duration::from_secs(5), c.wait_for_connect()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "Redis not reachable yet; starting degraded"),
                Err(_) => warn!("Redis not reachable yet; starting degraded"),
            }
        }
        let quota =
            Quota::per_second(NonZeroU32::new(settings.rate_per_sec).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(settings.burst).unwrap_or(NonZeroU32::MIN));
        let inner = Arc::new(Inner {
            client,
            subscriber,
            sink,
            local: RateLimiter::keyed(quota),
            leases: limiter::Leases::default(),
            scripts: Scripts::new(),
            batches: batches::Batches::default(),
            clustered: config.server.is_clustered(),
            queue: event_queue::QueueState::new(),
            metrics: Metrics::new(registry).map_err(err)?,
            up: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            clock_offset_ms: AtomicI64::new(0),
            started: std::time::Instant::now(),
            reap_not_before_ms: AtomicU64::new(0),
            repair_node_set: AtomicBool::new(false),
            verify_presence: AtomicBool::new(false),
            settings,
        });
        let engine = RedisEngine(inner);
        engine.ping_once().await;
        if engine.is_up() {
            // Two live nodes under one id would reap each other's sessions.
            // A node restarted right after a crash finds its own last
            // heartbeat: it waits until that one is stale; a heartbeat that
            // stays fresh is another live node.
            let s = &engine.0.settings;
            let until = std::time::Instant::now() + s.dead_after + s.heartbeat * 2;
            let mut alive = engine.node_is_alive(&s.node_id).await;
            while alive && std::time::Instant::now() < until {
                tokio::time::sleep(s.heartbeat).await;
                alive = engine.node_is_alive(&s.node_id).await;
            }
            if alive {
                return Err(EngineError(format!(
                    "node id {:?} is already alive in Redis (FLOWGATE_NODE_ID must be unique)",
                    engine.0.settings.node_id
                )));
            }
            // A node restarted under the same id after a crash: whatever
            // sessions Redis still lists for it are ghosts.
            engine.reap(&engine.0.settings.node_id).await;
            engine.heartbeat().await;
        }
        tasks.spawn(engine.clone().pump(stop.clone()));
        tasks.spawn(engine.clone().heartbeats(stop.clone()));
        tasks.spawn(engine.clone().maintenance(stop.clone()));
        tasks.spawn(engine.clone().pinger(stop));
        Ok(Engine {
            kind: "redis",
            bus: Arc::new(engine.clone()),
            presence: Arc::new(engine.clone()),
            limiter: Arc::new(engine.clone()),
            sessions: Arc::new(engine.clone()),
            queue: Some(Arc::new(engine.clone())),
            access_cache: Some(Arc::new(engine.clone())),
            locks: Arc::new(engine.clone()),
            health: Arc::new(engine),
        })
    }
}
