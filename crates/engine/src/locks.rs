//! Pod locks: one holder per pod per flow, owned by the server so that a
//! user who vanishes while dragging does not leave the pod locked forever.
//!
//! **Who holds a lock.** The contract's holder is a *user*: "takes the lock
//! if it is free (or already held by the same user)", and only the holder
//! may unlock. So a lock belongs to one user, and any of that user's
//! sockets may re-lock (acked, nothing relayed) or unlock it. Its
//! *lifetime* is tied to sockets: a lock records the set of the user's
//! sockets (by Socket.IO socket id) that asked for it, and it is released
//! when the last of them is gone. A user with two tabs who drags in both
//! keeps the lock until both have left; one tab closing does not yank the
//! pod from under the other. The socket id (not the connection) is the
//! holder because it survives connection state recovery: a recovered
//! session keeps its locks, whichever node it lands on.
//!
//! **When a holder is gone.** Each holding socket has an owner (the
//! connection, `node/connection`, as in presence) and an expiry:
//! - while connected, its connection extends the expiry
//!   ([`PodLocks::refresh`], every presence-refresh interval, with the
//!   presence TTL) and re-registers locks the store lost;
//! - when the connection ends recoverably, the expiry is cut to the
//!   recovery window ([`PodLocks::suspend`]); a recovery adopts the holder
//!   again ([`PodLocks::adopt`]) before it runs out;
//! - leaving the flow, a revoked membership, or an unrecoverable end
//!   releases at once ([`PodLocks::release_session`], [`PodLocks::release_user`]);
//! - a dead node's holders are expired at once by the reaper (the Redis
//!   engine), so they go within the bound of `user:left`.
//!
//! Expired holders are released by [`PodLocks::sweep`], which a node runs
//! on an interval; it returns the locks it freed so that the caller
//! announces them. Every change is guarded by the owner, so a connection
//! that was replaced (its session recovered elsewhere) or a reaper cannot
//! release what a live session holds.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::EngineError;

/// Marks a pod id the client sent as an integer, in front of its digits:
/// the key the store keeps is a string, and the lock's events must give
/// the id back with the type the client used (`pod:locked {podId: 7}`,
/// then `flow:locks` and `pod:unlocked` with `7`, not `"7"`). A string id
/// never starts with it (NUL is refused in ids), so `7` and `"7"` are two
/// pods, as they are two keys to a front end.
pub const INTEGER_POD: char = '\0';

/// The JSON value of a pod id as the store keys it (see [`INTEGER_POD`]).
pub fn pod_id_json(key: &str) -> serde_json::Value {
    match key.strip_prefix(INTEGER_POD) {
        Some(digits) => serde_json::from_str::<serde_json::Number>(digits)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|_| digits.into()),
        None => key.into(),
    }
}

fn serialize_pod_id<S: serde::Serializer>(key: &str, s: S) -> Result<S::Ok, S::Error> {
    pod_id_json(key).serialize(s)
}

/// One lock as `flow:locks` and the locks API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockInfo {
    /// The locked pod (the value of the rule's lock key, as the store
    /// keys it: shown with its JSON type, see [`INTEGER_POD`]).
    #[serde(serialize_with = "serialize_pod_id")]
    pub pod_id: String,
    /// The holder.
    pub user_id: String,
    /// ISO-8601, when the user took it.
    pub locked_at: String,
}

/// The socket asking for or holding a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The user the lock belongs to.
    pub user_id: String,
    /// The socket whose lifetime keeps it.
    pub socket_id: String,
    /// The connection that owns the socket now, `node/connection`.
    pub owner: String,
}

/// What a lock attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The pod was free and is now locked: announce it.
    Taken {
        /// The store's generation of the room's locks (see [`PodLocks::refresh`]).
        epoch: String,
    },
    /// The same user held it already; the socket is now a holder too.
    /// Nothing to announce.
    AlreadyHeld {
        /// As for `Taken`.
        epoch: String,
        /// When the user took it.
        locked_at: String,
    },
    /// Another user holds it.
    Locked {
        /// Who.
        by: String,
    },
}

/// What an unlock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlocked {
    /// The user held it; it is free now: announce it.
    Released,
    /// Nobody held it: nothing to announce.
    NotHeld,
    /// Another user holds it.
    NotOwner,
}

/// What a connection's refresh found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// The room's lock generation now; the caller remembers it.
    pub epoch: String,
    /// Pods the socket no longer holds (released by someone entitled to,
    /// or taken by another user while the store had lost them).
    pub dropped: Vec<String>,
    /// Locks the store had lost and this refresh put back: announce them
    /// again for members that joined meanwhile.
    pub restored: Vec<LockInfo>,
}

/// The locks of every flow, shared by all nodes.
#[async_trait]
pub trait PodLocks: Send + Sync + 'static {
    /// Locks `pod` in `room` for `holder.user_id`, unless another user
    /// holds it; `locked_at` is the time to record if it is taken. The
    /// socket becomes a holder, alive for `ttl` unless refreshed.
    async fn acquire(
        &self,
        room: &str,
        pod: &str,
        holder: &LockHolder,
        locked_at: &str,
        ttl: std::time::Duration,
    ) -> Result<Acquired, EngineError>;

    /// Unlocks `pod` if `user_id` holds it.
    async fn unlock(&self, room: &str, pod: &str, user_id: &str) -> Result<Unlocked, EngineError>;

    /// Drops the lock of `pod`, whoever holds it (the pod was deleted).
    async fn remove(&self, room: &str, pod: &str) -> Result<Option<LockInfo>, EngineError>;

    /// `socket_id` holds nothing in `room` any more, if `owner` owns it (an
    /// owner ending in `/` matches every connection of that node). Returns
    /// the locks that became free.
    async fn release_session(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Vec<LockInfo>, EngineError>;

    /// Every lock of `user_id` in `room` is released (membership revoked).
    async fn release_user(&self, room: &str, user_id: &str) -> Result<Vec<LockInfo>, EngineError>;

    /// The connection of `socket_id` ended recoverably: its locks live for
    /// `window` more unless it is adopted again; only if `owner` owns it.
    async fn suspend(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
        window: std::time::Duration,
    ) -> Result<(), EngineError>;

    /// A recovered session takes its locks over: `holder.owner` owns the
    /// socket's holder entry from now on, with a fresh expiry of `ttl`.
    /// Returns the pods it holds, with their lock time, and the epoch.
    async fn adopt(
        &self,
        room: &str,
        holder: &LockHolder,
        ttl: std::time::Duration,
    ) -> Result<(String, Vec<(String, String)>), EngineError>;

    /// The holder's connection is alive: extends its expiry by `ttl`.
    /// `held` lists the pods it believes it holds, with their lock time,
    /// under `epoch`, the generation it last saw. When the store's
    /// generation differs (the store lost its data, e.g. a Redis restart
    /// without persistence) the locks are put back if still free;
    /// otherwise a pod missing from the store was released by someone
    /// entitled to, and is dropped.
    async fn refresh(
        &self,
        room: &str,
        holder: &LockHolder,
        epoch: &str,
        held: &[(String, String)],
        ttl: std::time::Duration,
    ) -> Result<Refreshed, EngineError>;

    /// Every lock of `room`, oldest first.
    async fn list(&self, room: &str) -> Result<Vec<LockInfo>, EngineError>;

    /// Releases the locks of holders whose expiry passed; returns them by
    /// room for the caller to announce. Any node may call it on an
    /// interval; implementations make concurrent sweeps harmless.
    async fn sweep(&self) -> Result<Vec<(String, LockInfo)>, EngineError>;
}

/// The payload announcing `lock` (put back after the store lost it):
/// `{<lock key>, userId, timestamp}`.
pub fn lock_payload(
    lock_key: &str,
    lock: &LockInfo,
    timestamp: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert(lock_key.to_owned(), pod_id_json(&lock.pod_id));
    m.insert("userId".into(), lock.user_id.clone().into());
    m.insert("timestamp".into(), timestamp.into());
    m
}

/// The payload announcing that `lock` was released for a holder that is
/// gone: [`lock_payload`] with `reason: "released"`.
pub fn released_payload(
    lock_key: &str,
    lock: &LockInfo,
    timestamp: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = lock_payload(lock_key, lock, timestamp);
    m.insert("reason".into(), "released".into());
    m
}
