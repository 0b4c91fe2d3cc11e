//! The engine seam: what must be shared between gateway nodes — the room bus,
//! presence, pod locks and the per-user rate limiter — behind small traits.
//!
//! Session code only sees these traits. The in-memory engine ([`memory`])
//! serves a single node with no dependencies (and many in-process nodes in
//! tests); the Redis engine implements the same traits for a cluster.

mod event_queue;
mod flow_id;
pub mod locks;
pub mod memory;
pub mod memory_locks;
pub mod memory_queue;
mod message;
mod offset;
pub mod wire;

pub use event_queue::{push_margin, EventQueue, PushRefused, QueueEntry, QueuedEvent};
pub use flow_id::FlowId;
pub use locks::{
    pod_id_json, Acquired, LockHolder, LockInfo, PodLocks, Refreshed, Unlocked, INTEGER_POD,
};
pub(crate) use message::Body;
pub use message::{now_us, raw_json, Control, RoomMessage, NSP};
pub use offset::{BadOffset, Offset};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A shared dependency failed; the caller refuses the one operation.
#[derive(Debug, Clone, Error)]
#[error("engine unavailable: {0}")]
pub struct EngineError(pub String);

/// The node's local side, as an engine sees it: where the bus hands the
/// messages of the rooms the node subscribed to, and the node's own record
/// of which sockets it holds (the source of truth for re-subscribing and
/// re-registering presence after a store outage).
pub trait Deliver: Send + Sync + 'static {
    /// One message of `room`, with the offset the bus assigned (`None` for
    /// a volatile message, which is not in the room log). Called in room
    /// order; must not block (it only queues frames).
    fn deliver(&self, room: &str, offset: Option<Offset>, msg: &RoomMessage);
    /// Rooms with at least one local member.
    fn local_rooms(&self) -> Vec<String>;
    /// Rooms with a local member, each with the last offset this node
    /// delivered: where a subscriber that fell behind or reconnected reads
    /// the room log from to fill its gap.
    fn positions(&self) -> Vec<(String, Offset)>;
    /// Every local member's presence entry.
    fn local_sessions(&self) -> Vec<LocalSession>;
    /// Whether `socket_id` is a local member of `room` now.
    fn is_member(&self, room: &str, socket_id: &str) -> bool;
    /// A gap in `room` that the room log cannot fill (it was trimmed):
    /// the room's local members must reconnect (and start afresh).
    fn resync(&self, room: &str);
}

/// A local member's presence entry, as the node's own record holds it.
#[derive(Debug, Clone)]
pub struct LocalSession {
    /// `flow:F`.
    pub room: String,
    /// The owning connection, `node/connection`.
    pub owner: String,
    /// The entry.
    pub session: SessionInfo,
}

/// Fans room messages out to every node that holds a member of the room.
#[async_trait]
pub trait RoomBus: Send + Sync + 'static {
    /// Assigns the message its room offset, appends it to the room log
    /// (unless volatile) and delivers it to every subscribed node, in offset
    /// order. Returns the offset (`None` for a volatile message).
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<Option<Offset>, EngineError>;
    /// The offset of the room's newest logged event (`Offset::ZERO` for a
    /// room with none): where a member that joins now starts.
    async fn head(&self, room: &str) -> Result<Offset, EngineError>;
    /// Up to `max` logged events of `room` after `after`, in order; `Gone`
    /// when events after `after` were already trimmed from the log (the
    /// caller cannot recover from there).
    async fn read_after(
        &self,
        room: &str,
        after: Offset,
        max: usize,
    ) -> Result<Replay, EngineError>;
    /// This node holds a member of `room` from now on.
    async fn subscribe(&self, room: &str) -> Result<(), EngineError>;
    /// This node holds no member of `room` any more.
    async fn unsubscribe(&self, room: &str) -> Result<(), EngineError>;
}

/// What a room log still holds after an offset.
#[derive(Debug, Clone)]
pub enum Replay {
    /// The events after the offset (possibly none), in order.
    Events(Vec<(Offset, RoomMessage)>),
    /// Some events after the offset were trimmed: a gap nobody can fill.
    Gone,
}

/// What it takes to restore a Socket.IO session on any node (connection
/// state recovery), kept in the shared store — never only in the memory of
/// the node that may die.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRecord {
    /// The Socket.IO socket id, kept across recovery.
    pub sid: String,
    /// The authenticated user; a recovering token must name the same one.
    pub user_id: String,
    /// Which connection owns the record now. A connection that was taken
    /// over (the client recovered elsewhere before the old one noticed)
    /// must not release or announce anything for it.
    pub conn: String,
    /// The flow the socket was in, as presence lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<SessionInfo>,
    /// The room offset at which the socket joined: replay starts there
    /// when the client received no room event yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at_offset: Option<String>,
}

/// The shared store of recoverable sessions, by private session id (`pid`).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Writes the record, owned by `record.conn`, kept for `ttl` unless
    /// refreshed.
    async fn save(
        &self,
        pid: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), EngineError>;
    /// The record, if it still exists.
    async fn load(&self, pid: &str) -> Result<Option<SessionRecord>, EngineError>;
    /// Extends the records of live sessions (pid, conn) by `ttl`.
    async fn refresh(&self, pids: &[String], ttl: Duration) -> Result<(), EngineError>;
    /// The connection `conn` ended: keep the record for `window` (the
    /// recovery window) if `conn` still owns it, or delete it for a zero
    /// window; returns whether it did.
    async fn release(&self, pid: &str, conn: &str, window: Duration) -> Result<bool, EngineError>;
    /// Forgets a session that may not be recovered (the client left).
    async fn forget(&self, pid: &str) -> Result<(), EngineError>;
}

/// One session in a flow, as `flow:users` and `user:joined` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The authenticated user.
    pub user_id: String,
    /// The Socket.IO socket id.
    pub socket_id: String,
    /// The flow joined, shown as the JSON type the joiner gave it: a
    /// front end that joins flow `42` compares `flowId === 42` (the old
    /// gateway echoed it as sent). Kept as text with its type, so the
    /// same flow given as `42` or `"42"` is one room.
    #[serde(with = "flow_id::json")]
    pub flow_id: FlowId,
    /// Display name given at join.
    pub user_name: String,
    /// Display colour given at join.
    pub user_color: String,
    /// ISO-8601 join time.
    pub joined_at: String,
}

/// Who is in which flow, across all nodes.
///
/// Every entry has an owner, `node/connection`: a leave by anyone but the
/// owner changes nothing, so a connection that was replaced (its session
/// recovered elsewhere) or a reaper of a dead node cannot remove the entry
/// of a session that lives on.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Adds (or takes over) a session in a room, owned by `owner`; returns
    /// everyone in the room, it included, and whether it was not listed
    /// before (so that `user:joined` is announced once).
    async fn join(
        &self,
        room: &str,
        session: &SessionInfo,
        owner: &str,
    ) -> Result<(Vec<SessionInfo>, bool), EngineError>;
    /// Removes a session if `owner` owns it (an owner ending in `/` matches
    /// every connection of that node); returns it if it was removed.
    async fn leave(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Option<SessionInfo>, EngineError>;
    /// Everyone in a room.
    async fn members(&self, room: &str) -> Result<Vec<SessionInfo>, EngineError>;
}

/// Whether `owner` (or an owner prefix ending in `/`) owns an entry owned
/// by `current`.
pub fn owns(owner: &str, current: &str) -> bool {
    if owner.ends_with('/') {
        current.starts_with(owner)
    } else {
        owner == current
    }
}

/// The per-user event budget.
#[async_trait]
pub trait UserLimiter: Send + Sync + 'static {
    /// Spends one event of `user_id`'s budget; `false` when over budget.
    async fn check(&self, user_id: &str) -> Result<bool, EngineError>;
}

/// A short-lived shared cache of access decisions, so a reconnect storm
/// does not become a query storm.
#[async_trait]
pub trait AccessCache: Send + Sync + 'static {
    /// A cached decision.
    async fn get(&self, flow_id: &str, user_id: &str) -> Result<Option<bool>, EngineError>;
    /// Caches a decision for `ttl`. A decision already cached is kept (a
    /// refusal written by a revocation wins over a grant read before it).
    async fn put(
        &self,
        flow_id: &str,
        user_id: &str,
        allowed: bool,
        ttl: Duration,
    ) -> Result<(), EngineError>;
    /// Forgets a decision (membership changed).
    async fn forget(&self, flow_id: &str, user_id: &str) -> Result<(), EngineError>;
}

/// The engine a node runs on.
#[derive(Clone)]
pub struct Engine {
    /// `memory` or `redis`, for `/health`.
    pub kind: &'static str,
    /// The room bus.
    pub bus: Arc<dyn RoomBus>,
    /// Presence.
    pub presence: Arc<dyn Presence>,
    /// The rate limiter.
    pub limiter: Arc<dyn UserLimiter>,
    /// Recoverable sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Liveness of the shared store, for `/health`.
    pub health: Arc<dyn EngineHealth>,
    /// The queue of the event log: durable in Redis; in the embedded
    /// engine, in the node's memory (`memory_queue`).
    pub queue: Option<Arc<dyn EventQueue>>,
    /// The access-decision cache (Redis engine only).
    pub access_cache: Option<Arc<dyn AccessCache>>,
    /// Pod locks.
    pub locks: Arc<dyn PodLocks>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A cheap round trip to the engine's store.
#[async_trait]
pub trait EngineHealth: Send + Sync + 'static {
    /// How long the round trip took, or why it failed.
    async fn ping(&self) -> Result<Duration, EngineError>;
}
