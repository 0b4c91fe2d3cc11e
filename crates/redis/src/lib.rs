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
//!   filter so an abusive client costs no round trip. While Redis is
//!   unreachable each node enforces the budget alone (the local filter):
//!   a user spread over k nodes may get up to k× the budget until Redis is
//!   back. Each such decision is counted in `flowgate_limiter_fallback_total`.
//! - **Faults**: a pinger keeps `up` current; while Redis is down, engine
//!   calls fail fast and `/health` says 503. When it returns, the node
//!   re-subscribes its rooms and re-registers its live sessions (announcing
//!   with `user:joined` any that had been lost).

mod scripts;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_engine::{
    AccessCache, Deliver, Engine, EngineError, EngineHealth, EventQueue, Presence, QueuedEvent,
    RoomBus, RoomMessage, SessionInfo, UserLimiter,
};
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, SetOptions};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prometheus::{IntCounter, IntGauge, Registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://…`.
    pub url: String,
    /// This node's id (heartbeats, session ownership).
    pub node_id: String,
    /// Events per second per user.
    pub rate_per_sec: u32,
    /// Burst per user.
    pub burst: u32,
    /// How often the node heartbeats and looks for dead nodes.
    pub heartbeat: Duration,
    /// A node silent this long is dead and its sessions are removed.
    pub dead_after: Duration,
    /// How often the node extends its sessions' expiry.
    pub presence_refresh: Duration,
    /// A session not refreshed this long is no longer listed.
    pub session_ttl: Duration,
    /// Per-command timeout.
    pub command_timeout: Duration,
    /// Approximate number of events kept per room stream (for recovery).
    pub log_len: u64,
    /// A room stream without events for this long is deleted.
    pub log_ttl: Duration,
}

const NODES_KEY: &str = "flowgate:nodes";
/// The durable queue between the room bus and the event-log writers.
const QUEUE_KEY: &str = "flowgate:eventlog";
/// The consumer group of the writers (one consumer per node).
const QUEUE_GROUP: &str = "writers";
/// A queue entry unacknowledged this long (its writer died) is taken over.
const QUEUE_CLAIM_IDLE_MS: u64 = 30_000;

fn node_sessions_key(node: &str) -> String {
    format!("flowgate:node:{node}:sessions")
}
fn stream_key(room: &str) -> String {
    format!("{{{room}}}:log")
}
fn channel(room: &str) -> String {
    format!("{{{room}}}:bus")
}
fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix('{')?.strip_suffix("}:bus")
}
fn presence_keys(room: &str) -> Vec<String> {
    vec![
        format!("{{{room}}}:presence"),
        format!("{{{room}}}:presence:exp"),
    ]
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError(e.to_string())
}

#[derive(Debug, Clone)]
struct Metrics {
    up: IntGauge,
    outages: IntCounter,
    limiter_fallback: IntCounter,
    bus_messages: IntCounter,
    bus_lagged: IntCounter,
    reaped_sessions: IntCounter,
    resubscribes: IntCounter,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let m = IntGauge::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let c = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let m = IntCounter::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        Ok(Metrics {
            up: g("redis_up", "1 while Redis answers pings")?,
            outages: c("redis_outages_total", "Times Redis became unreachable")?,
            limiter_fallback: c(
                "limiter_fallback_total",
                "Rate-limit decisions taken by the per-node fallback while Redis was unreachable",
            )?,
            bus_messages: c(
                "bus_messages_total",
                "Room messages this node received from Redis",
            )?,
            bus_lagged: c(
                "bus_lagged_total",
                "Room messages lost because the subscriber fell behind",
            )?,
            reaped_sessions: c(
                "presence_reaped_sessions_total",
                "Sessions of dead nodes removed by this node",
            )?,
            resubscribes: c(
                "bus_resubscribes_total",
                "Times this node re-subscribed its rooms after a reconnect",
            )?,
        })
    }
}

struct Scripts {
    publish: Script,
    join: Script,
    members: Script,
    leave: Script,
    refresh: Script,
    heartbeat: Script,
    dead_nodes: Script,
    gcra: Script,
}

struct Inner {
    client: Client,
    subscriber: Client,
    settings: RedisSettings,
    sink: Arc<dyn Deliver>,
    local: DefaultKeyedRateLimiter<String>,
    scripts: Scripts,
    metrics: Metrics,
    up: AtomicBool,
    latency_us: AtomicU64,
}

/// The Redis engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct RedisEngine(Arc<Inner>);

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("node", &self.0.settings.node_id)
            .finish_non_exhaustive()
    }
}

fn build_client(s: &RedisSettings, broadcast: usize) -> Result<Client, Error> {
    let mut config = Config::from_url(&s.url)?;
    // Start even if Redis is down: the node serves degraded (503 on
    // /health) and connects when Redis appears.
    config.fail_fast = false;
    Builder::from_config(config)
        .with_performance_config(|p| {
            p.default_command_timeout = s.command_timeout;
            p.broadcast_channel_capacity = broadcast;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2))
        .build()
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
        let client = build_client(&settings, 32).map_err(err)?;
        // Room traffic arrives on this client's broadcast channel; a large
        // capacity absorbs bursts while the pump task is busy.
        let subscriber = build_client(&settings, 1 << 16).map_err(err)?;
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
            scripts: Scripts {
                publish: Script::from_lua(scripts::PUBLISH),
                join: Script::from_lua(scripts::presence_join()),
                members: Script::from_lua(scripts::presence_members()),
                leave: Script::from_lua(scripts::PRESENCE_LEAVE),
                refresh: Script::from_lua(scripts::PRESENCE_REFRESH),
                heartbeat: Script::from_lua(scripts::HEARTBEAT),
                dead_nodes: Script::from_lua(scripts::DEAD_NODES),
                gcra: Script::from_lua(scripts::GCRA),
            },
            metrics: Metrics::new(registry).map_err(err)?,
            up: AtomicBool::new(false),
            latency_us: AtomicU64::new(0),
            settings,
        });
        let engine = RedisEngine(inner);
        engine.ping_once().await;
        if engine.is_up() {
            // A node restarted under the same id after a crash: whatever
            // sessions Redis still lists for it are ghosts.
            engine.reap(&engine.0.settings.node_id).await;
            engine.heartbeat().await;
        }
        tasks.spawn(engine.clone().pump(stop.clone()));
        tasks.spawn(engine.clone().resubscriber(stop.clone()));
        tasks.spawn(engine.clone().heartbeats(stop.clone()));
        tasks.spawn(engine.clone().maintenance(stop.clone()));
        tasks.spawn(engine.clone().pinger(stop));
        Ok(Engine {
            kind: "redis",
            bus: Arc::new(engine.clone()),
            presence: Arc::new(engine.clone()),
            limiter: Arc::new(engine.clone()),
            queue: Some(Arc::new(engine.clone())),
            access_cache: Some(Arc::new(engine.clone())),
            health: Arc::new(engine),
        })
    }

    fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    fn ensure_up(&self) -> Result<(), EngineError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(EngineError("Redis is unreachable".into()))
        }
    }

    async fn ping_once(&self) -> bool {
        let started = Instant::now();
        let ok = matches!(
            tokio::time::timeout(
                self.0.settings.command_timeout,
                self.0.client.ping::<String>(None)
            )
            .await,
            Ok(Ok(_))
        );
        if ok {
            self.0
                .latency_us
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
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
    async fn pinger(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let was = self.is_up();
            if self.ping_once().await && !was {
                self.heartbeat().await;
                self.refresh_presence().await;
            }
        }
    }

    /// Hands every room message to the node's fan-out, in arrival order.
    async fn pump(self, stop: CancellationToken) {
        let mut rx = self.0.subscriber.message_rx();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = rx.recv() => m,
            };
            match msg {
                Ok(m) => self.on_message(&m.channel, &m.value),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    self.0.metrics.bus_lagged.inc_by(n);
                    error!(
                        lost = n,
                        "room messages lost: subscriber fell behind; members reconnect to reload"
                    );
                    self.0.sink.resync();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn on_message(&self, channel: &str, value: &Value) {
        let Some(room) = room_of_channel(channel) else {
            return;
        };
        let Some(text) = value.as_bytes().and_then(|b| std::str::from_utf8(b).ok()) else {
            warn!(channel, "non-text room message ignored");
            return;
        };
        let Some((offset, json)) = text.split_once(' ') else {
            warn!(channel, "room message without offset ignored");
            return;
        };
        match serde_json::from_str::<RoomMessage>(json) {
            Ok(msg) => {
                self.0.metrics.bus_messages.inc();
                self.0.sink.deliver(room, offset, &msg);
            }
            Err(e) => warn!(channel, error = %e, "undecodable room message ignored"),
        }
    }

    /// After the subscriber reconnects, subscribes again to every room
    /// that has a local member (the node's own record is the truth).
    async fn resubscriber(self, stop: CancellationToken) {
        let mut rx = self.0.subscriber.reconnect_rx();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.recv() => if r.is_err() { return },
            }
            let rooms = self.0.sink.local_rooms();
            self.0.metrics.resubscribes.inc();
            info!(rooms = rooms.len(), "re-subscribing rooms after reconnect");
            for room in rooms {
                if let Err(e) = self.0.subscriber.ssubscribe(channel(&room)).await {
                    warn!(room, error = %e, "re-subscribe failed");
                }
            }
        }
    }

    /// The heartbeat, alone in its task: reaping a large dead node or
    /// refreshing many rooms must not delay it past `dead_after`, or the
    /// other nodes would reap this live one.
    async fn heartbeats(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.0.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.is_up() {
                self.heartbeat().await;
            }
        }
    }

    /// Dead-node reaping and presence refresh.
    async fn maintenance(self, stop: CancellationToken) {
        let s = &self.0.settings;
        let mut tick = tokio::time::interval(s.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if !self.is_up() {
                continue;
            }
            self.reap_dead().await;
            if last_refresh.elapsed() >= s.presence_refresh {
                last_refresh = Instant::now();
                self.refresh_presence().await;
                self.0.local.retain_recent();
            }
        }
        // Clean exit: this node's sessions left with their sockets; drop
        // its heartbeat so no one reaps it later.
        let _: Result<i64, _> = self.0.client.zrem(NODES_KEY, s.node_id.clone()).await;
        let _: Result<i64, _> = self.0.client.del(node_sessions_key(&s.node_id)).await;
    }

    async fn heartbeat(&self) {
        let r: Result<i64, _> = self
            .0
            .scripts
            .heartbeat
            .evalsha_with_reload(
                &self.0.client,
                vec![NODES_KEY],
                vec![self.0.settings.node_id.clone()],
            )
            .await;
        if let Err(e) = r {
            warn!(error = %e, "heartbeat failed");
        }
    }

    async fn reap_dead(&self) {
        let dead: Result<Vec<String>, _> = self
            .0
            .scripts
            .dead_nodes
            .evalsha_with_reload(
                &self.0.client,
                vec![NODES_KEY],
                vec![self.0.settings.dead_after.as_millis() as i64],
            )
            .await;
        match dead {
            Ok(nodes) => {
                for node in nodes.iter().filter(|n| **n != self.0.settings.node_id) {
                    self.reap(node).await;
                }
            }
            Err(e) => warn!(error = %e, "dead-node scan failed"),
        }
    }

    /// Removes every session of `node` and announces `user:left` for each.
    /// A lock with a TTL makes one survivor do it; if that survivor dies
    /// midway, the lock expires and another finishes the job.
    async fn reap(&self, node: &str) {
        let c = &self.0.client;
        let lock = format!("flowgate:reap:{node}");
        let claimed: Result<Option<String>, _> = c
            .set(
                lock.clone(),
                self.0.settings.node_id.clone(),
                Some(Expiration::PX(10_000)),
                Some(SetOptions::NX),
                false,
            )
            .await;
        if !matches!(claimed, Ok(Some(_))) {
            return;
        }
        let members: Vec<String> = match c.smembers(node_sessions_key(node)).await {
            Ok(m) => m,
            Err(e) => {
                warn!(node, error = %e, "cannot list a dead node's sessions");
                return;
            }
        };
        let mut removed = 0u64;
        for m in &members {
            let Some((room, sid)) = m.split_once('\n') else {
                continue;
            };
            let left: Result<Option<String>, _> = self
                .0
                .scripts
                .leave
                .evalsha_with_reload(c, presence_keys(room), vec![sid.to_owned()])
                .await;
            if let Ok(Some(json)) = left {
                removed += 1;
                self.0.metrics.reaped_sessions.inc();
                if let Ok(s) = serde_json::from_str::<SessionInfo>(&json) {
                    let msg = RoomMessage::new(
                        "user:left",
                        json!({"userId": s.user_id, "socketId": s.socket_id, "userName": s.user_name}),
                    );
                    if let Err(e) = self.publish(room, msg).await {
                        warn!(room, error = %e, "user:left for a dead node's session not published");
                    }
                }
            }
        }
        let _: Result<i64, _> = c.del(node_sessions_key(node)).await;
        if node != self.0.settings.node_id {
            let _: Result<i64, _> = c.zrem(NODES_KEY, node.to_owned()).await;
        }
        let _: Result<i64, _> = c.del(lock).await;
        if removed > 0 || node != self.0.settings.node_id {
            info!(
                node,
                sessions = removed,
                "removed the sessions of a dead node"
            );
        }
    }

    /// Extends this node's sessions; re-registers (and announces) any that
    /// Redis lost.
    async fn refresh_presence(&self) {
        let sessions = self.0.sink.local_sessions();
        if sessions.is_empty() {
            return;
        }
        let c = &self.0.client;
        let ttl = self.0.settings.session_ttl.as_millis() as i64;
        let members: Vec<String> = sessions
            .iter()
            .map(|(room, s)| format!("{room}\n{}", s.socket_id))
            .collect();
        if let Err(e) = c
            .sadd::<i64, _, _>(node_sessions_key(&self.0.settings.node_id), members)
            .await
        {
            warn!(error = %e, "node session set not refreshed");
            return;
        }
        let mut by_room: HashMap<&str, Vec<&SessionInfo>> = HashMap::new();
        for (room, s) in &sessions {
            by_room.entry(room.as_str()).or_default().push(s);
        }
        for (room, list) in by_room {
            let mut args = vec![ttl.to_string()];
            args.extend(list.iter().map(|s| s.socket_id.clone()));
            let missing: Vec<String> = match self
                .0
                .scripts
                .refresh
                .evalsha_with_reload(c, presence_keys(room), args)
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(room, error = %e, "presence refresh failed");
                    continue;
                }
            };
            for sid in missing {
                let Some(s) = list.iter().find(|s| s.socket_id == sid) else {
                    continue;
                };
                if self.register(room, s, false).await.is_ok() {
                    let mut joined = RoomMessage::new(
                        "user:joined",
                        serde_json::to_value(s).unwrap_or_default(),
                    );
                    joined.except = Some(s.socket_id.clone());
                    let _ = self.publish(room, joined).await;
                    debug!(room, socket = %sid, "re-registered a lost session");
                }
            }
        }
    }

    async fn register(
        &self,
        room: &str,
        s: &SessionInfo,
        want_members: bool,
    ) -> Result<Vec<String>, EngineError> {
        let json = serde_json::to_string(s).map_err(err)?;
        self.0
            .scripts
            .join
            .evalsha_with_reload(
                &self.0.client,
                presence_keys(room),
                vec![
                    s.socket_id.clone(),
                    json,
                    (self.0.settings.session_ttl.as_millis() as i64).to_string(),
                    if want_members { "1" } else { "0" }.to_owned(),
                ],
            )
            .await
            .map_err(err)
    }
}

fn parse_sessions(list: Vec<String>) -> Vec<SessionInfo> {
    list.iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

#[async_trait]
impl RoomBus for RedisEngine {
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<String, EngineError> {
        self.ensure_up()?;
        let json = serde_json::to_string(&msg).map_err(err)?;
        if msg.volatile {
            // Never replayed, so not worth a stream entry.
            let _: i64 = self
                .0
                .client
                .spublish(channel(room), format!("- {json}"))
                .await
                .map_err(err)?;
            return Ok("-".to_owned());
        }
        let s = &self.0.settings;
        self.0
            .scripts
            .publish
            .evalsha_with_reload(
                &self.0.client,
                vec![stream_key(room), channel(room)],
                vec![
                    json,
                    s.log_len.to_string(),
                    (s.log_ttl.as_millis() as i64).to_string(),
                ],
            )
            .await
            .map_err(err)
    }

    async fn subscribe(&self, room: &str) -> Result<(), EngineError> {
        self.ensure_up()?;
        self.0
            .subscriber
            .ssubscribe(channel(room))
            .await
            .map_err(err)
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), EngineError> {
        self.0
            .subscriber
            .sunsubscribe(channel(room))
            .await
            .map_err(err)
    }
}

#[async_trait]
impl Presence for RedisEngine {
    async fn join(
        &self,
        room: &str,
        session: &SessionInfo,
    ) -> Result<Vec<SessionInfo>, EngineError> {
        self.ensure_up()?;
        let _: i64 = self
            .0
            .client
            .sadd(
                node_sessions_key(&self.0.settings.node_id),
                format!("{room}\n{}", session.socket_id),
            )
            .await
            .map_err(err)?;
        self.register(room, session, true).await.map(parse_sessions)
    }

    async fn leave(&self, room: &str, socket_id: &str) -> Result<Option<SessionInfo>, EngineError> {
        self.ensure_up()?;
        let left: Option<String> = self
            .0
            .scripts
            .leave
            .evalsha_with_reload(
                &self.0.client,
                presence_keys(room),
                vec![socket_id.to_owned()],
            )
            .await
            .map_err(err)?;
        let _: Result<i64, _> = self
            .0
            .client
            .srem(
                node_sessions_key(&self.0.settings.node_id),
                format!("{room}\n{socket_id}"),
            )
            .await;
        Ok(left.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn members(&self, room: &str) -> Result<Vec<SessionInfo>, EngineError> {
        self.ensure_up()?;
        let list: Vec<String> = self
            .0
            .scripts
            .members
            .evalsha_with_reload(&self.0.client, presence_keys(room), Vec::<String>::new())
            .await
            .map_err(err)?;
        Ok(parse_sessions(list))
    }
}

#[async_trait]
impl UserLimiter for RedisEngine {
    async fn check(&self, user_id: &str) -> Result<bool, EngineError> {
        // Local first filter: the shared budget can never be larger than
        // this node's view of it, so a local refusal needs no round trip.
        if self.0.local.check_key(&user_id.to_owned()).is_err() {
            return Ok(false);
        }
        if !self.is_up() {
            self.0.metrics.limiter_fallback.inc();
            return Ok(true);
        }
        let s = &self.0.settings;
        let interval_us = 1_000_000 / i64::from(s.rate_per_sec.max(1));
        let r: Result<i64, _> = self
            .0
            .scripts
            .gcra
            .evalsha_with_reload(
                &self.0.client,
                vec![format!("flowgate:limit:{{{user_id}}}")],
                vec![interval_us, i64::from(s.burst)],
            )
            .await;
        match r {
            Ok(allowed) => Ok(allowed == 1),
            Err(e) => {
                self.0.metrics.limiter_fallback.inc();
                debug!(error = %e, "limiter falls back to the per-node budget");
                Ok(true)
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

fn access_key(flow_id: &str, user_id: &str) -> String {
    format!("flowgate:access:{{flow:{flow_id}}}:{user_id}")
}

type Entries = Vec<(String, QueuedEvent)>;

fn decode_entries(list: Vec<(String, HashMap<String, String>)>) -> Entries {
    list.into_iter()
        .filter_map(|(id, fields)| {
            let e = fields.get("e").and_then(|j| serde_json::from_str(j).ok());
            if e.is_none() {
                warn!(id, "undecodable event-log queue entry skipped");
            }
            Some((id, e?))
        })
        .collect()
}

/// Parses an `XAUTOCLAIM` reply by hand: fred's typed helper predates the
/// three-element reply of Redis 7.
fn decode_autoclaim(v: Value) -> Entries {
    let Value::Array(parts) = v else {
        return Vec::new();
    };
    let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let Value::Array(pair) = entry else { continue };
        let mut it = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (it.next(), it.next()) else {
            continue;
        };
        let Some(id) = id.as_string() else { continue };
        let mut map = HashMap::new();
        let mut f = fields.into_iter();
        while let (Some(k), Some(v)) = (f.next(), f.next()) {
            if let (Some(k), Some(v)) = (k.as_string(), v.as_string()) {
                map.insert(k, v);
            }
        }
        out.extend(decode_entries(vec![(id, map)]));
    }
    out
}

impl RedisEngine {
    async fn read_group(&self, consumer: &str, max: usize, id: &str) -> Result<Entries, Error> {
        let v: Value = self
            .0
            .client
            .xreadgroup(
                QUEUE_GROUP,
                consumer,
                Some(max as u64),
                None,
                false,
                QUEUE_KEY,
                id,
            )
            .await?;
        // Nothing new is a nil reply, which the typed helper cannot read.
        if v.is_null() {
            return Ok(Vec::new());
        }
        let r: fred::types::streams::XReadResponse<String, String, String, String> =
            v.into_xread_response()?;
        Ok(r.into_values().flat_map(decode_entries).collect())
    }

    async fn take_once(&self, consumer: &str, max: usize) -> Result<Entries, Error> {
        // Our own entries read before but never acknowledged (a write that
        // failed, or a restart), then those of writers that died, then new.
        let own = self.read_group(consumer, max, "0").await?;
        if !own.is_empty() {
            return Ok(own);
        }
        let claimed: Value = self
            .0
            .client
            .xautoclaim(
                QUEUE_KEY,
                QUEUE_GROUP,
                consumer,
                QUEUE_CLAIM_IDLE_MS,
                "0-0",
                Some(max as u64),
                false,
            )
            .await?;
        let claimed = decode_autoclaim(claimed);
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        self.read_group(consumer, max, ">").await
    }
}

#[async_trait]
impl EventQueue for RedisEngine {
    async fn push(&self, event: &QueuedEvent) -> Result<(), EngineError> {
        self.ensure_up()?;
        let json = serde_json::to_string(event).map_err(err)?;
        let _: String = self
            .0
            .client
            .xadd(QUEUE_KEY, false, None, "*", vec![("e", json)])
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn take(
        &self,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<(String, QueuedEvent)>, EngineError> {
        self.ensure_up()?;
        match self.take_once(consumer, max).await {
            Err(e) if e.details().contains("NOGROUP") => {
                // First use, or Redis lost the group in a restart.
                let _: Result<String, _> = self
                    .0
                    .client
                    .xgroup_create(QUEUE_KEY, QUEUE_GROUP, "0", true)
                    .await;
                self.take_once(consumer, max).await.map_err(err)
            }
            r => r.map_err(err),
        }
    }

    async fn ack(&self, ids: &[String]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .0
            .client
            .xack(QUEUE_KEY, QUEUE_GROUP, ids.to_vec())
            .await
            .map_err(err)?;
        let _: i64 = self
            .0
            .client
            .xdel(QUEUE_KEY, ids.to_vec())
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        self.ensure_up()?;
        self.0.client.xlen(QUEUE_KEY).await.map_err(err)
    }
}

#[async_trait]
impl AccessCache for RedisEngine {
    async fn get(&self, flow_id: &str, user_id: &str) -> Result<Option<bool>, EngineError> {
        self.ensure_up()?;
        let v: Option<String> = self
            .0
            .client
            .get(access_key(flow_id, user_id))
            .await
            .map_err(err)?;
        Ok(v.map(|v| v == "1"))
    }

    async fn put(
        &self,
        flow_id: &str,
        user_id: &str,
        allowed: bool,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.ensure_up()?;
        let _: Option<String> = self
            .0
            .client
            .set(
                access_key(flow_id, user_id),
                if allowed { "1" } else { "0" },
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                // A revocation's refusal is written with SET (no NX) and
                // must not be overwritten by a join's earlier read.
                if allowed { Some(SetOptions::NX) } else { None },
                false,
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn forget(&self, flow_id: &str, user_id: &str) -> Result<(), EngineError> {
        let _: i64 = self
            .0
            .client
            .del(access_key(flow_id, user_id))
            .await
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_room_hash_tag() {
        assert_eq!(stream_key("flow:1"), "{flow:1}:log");
        assert_eq!(channel("flow:1"), "{flow:1}:bus");
        assert_eq!(room_of_channel("{flow:1}:bus"), Some("flow:1"));
        assert_eq!(room_of_channel("other"), None);
        for k in presence_keys("flow:1") {
            assert!(k.starts_with("{flow:1}"));
        }
    }
}
