//! The embedded in-memory engine: one process, no dependencies.
//!
//! A [`MemoryHub`] stands for the shared store. Each node gets its own
//! [`Engine`] view of the hub, so several in-process nodes sharing one hub
//! behave like nodes sharing one Redis (used by fast tests); a single node
//! with its own hub is the zero-dependency `flowgate serve`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use super::{
    Deliver, Engine, EngineError, EngineHealth, Offset, Presence, Replay, RoomBus, RoomMessage,
    SessionInfo, SessionRecord, SessionStore, UserLimiter,
};

#[derive(Default)]
struct RoomLog {
    /// The last offset assigned.
    last: Offset,
    /// The newest trimmed offset: a reader after an older offset has a gap.
    trimmed: Offset,
    /// The retained non-volatile events, oldest first.
    events: VecDeque<(Offset, RoomMessage)>,
    /// Nodes subscribed to the room.
    subscribers: HashSet<String>,
    /// When the newest event was logged.
    last_at: Option<Instant>,
}

/// The shared state of every node attached to it.
#[derive(Default)]
pub struct MemoryHub {
    /// Per-room offset counter and subscribers; one lock per room so that
    /// delivery happens in offset order without serialising unrelated rooms.
    rooms: DashMap<String, Arc<Mutex<RoomLog>>>,
    /// Each node's delivery sink.
    nodes: DashMap<String, Arc<dyn Deliver>>,
    /// room → (owner, session) in join order.
    presence: DashMap<String, Vec<(String, SessionInfo)>>,
    /// One limiter for every user: the budget is shared by all nodes.
    limiter: Mutex<Option<Arc<DefaultKeyedRateLimiter<String>>>>,
    /// Recoverable sessions by pid, with their expiry.
    sessions: Mutex<HashMap<String, (SessionRecord, Instant)>>,
    /// Events kept per room log (0 means the default of 1000).
    log_len: std::sync::atomic::AtomicUsize,
    /// Pod locks of every room.
    locks: Arc<crate::memory_locks::MemoryLocks>,
}

impl std::fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHub")
            .field("rooms", &self.rooms.len())
            .finish_non_exhaustive()
    }
}

impl MemoryHub {
    /// A fresh hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Keeps `len` events per room log (the default is 1000).
    pub fn set_log_len(&self, len: usize) {
        self.log_len
            .store(len, std::sync::atomic::Ordering::Relaxed);
    }

    fn log_len(&self) -> usize {
        match self.log_len.load(std::sync::atomic::Ordering::Relaxed) {
            0 => 1000,
            n => n,
        }
    }

    /// The engine of node `node_id`, delivering into `sink`.
    pub fn engine(
        self: &Arc<Self>,
        node_id: &str,
        sink: Arc<dyn Deliver>,
        rate_per_sec: u32,
        burst: u32,
    ) -> Engine {
        self.nodes.insert(node_id.to_owned(), sink);
        let limiter = self
            .limiter
            .lock()
            .get_or_insert_with(|| {
                let quota =
                    Quota::per_second(NonZeroU32::new(rate_per_sec).unwrap_or(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                Arc::new(RateLimiter::keyed(quota))
            })
            .clone();
        let node = Arc::new(MemoryNode {
            hub: self.clone(),
            node_id: node_id.to_owned(),
            limiter,
        });
        Engine {
            kind: "memory",
            bus: node.clone(),
            presence: node.clone(),
            limiter: node.clone(),
            sessions: node.clone(),
            health: node,
            queue: None,
            access_cache: None,
            locks: self.locks.clone(),
        }
    }

    /// Forgets what no one needs any more, so that memory follows the live
    /// rooms and users, not every flow id ever seen: rooms with no
    /// subscriber whose log is empty or idle longer than `log_ttl` (the
    /// Redis engine's streams expire the same way), expired session
    /// records, and idle limiter state.
    pub fn prune(&self, log_ttl: Duration) {
        let now = Instant::now();
        self.rooms.retain(|_, log| {
            let log = log.lock();
            !log.subscribers.is_empty()
                || log
                    .last_at
                    .is_some_and(|t| now.duration_since(t) < log_ttl && !log.events.is_empty())
        });
        self.sessions.lock().retain(|_, (_, until)| *until > now);
        if let Some(l) = self.limiter.lock().as_ref() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Rooms held (for tests of pruning).
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    fn room(&self, room: &str) -> Arc<Mutex<RoomLog>> {
        self.rooms.entry(room.to_owned()).or_default().clone()
    }
}

struct MemoryNode {
    hub: Arc<MemoryHub>,
    node_id: String,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
}

#[async_trait]
impl RoomBus for MemoryNode {
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<Option<Offset>, EngineError> {
        let log = self.hub.room(room);
        let mut log = log.lock();
        let offset = if msg.volatile {
            None
        } else {
            let o = log.last.next(crate::now_us() / 1000);
            log.last = o;
            log.last_at = Some(Instant::now());
            log.events.push_back((o, msg.clone()));
            while log.events.len() > self.hub.log_len() {
                if let Some((old, _)) = log.events.pop_front() {
                    log.trimmed = old;
                }
            }
            Some(o)
        };
        // Delivery under the room lock keeps offset order; `deliver` only
        // queues frames, so the lock is held briefly.
        let sinks: Vec<Arc<dyn Deliver>> = log
            .subscribers
            .iter()
            .filter_map(|n| self.hub.nodes.get(n).map(|s| s.clone()))
            .collect();
        for sink in sinks {
            sink.deliver(room, offset, &msg);
        }
        Ok(offset)
    }

    async fn head(&self, room: &str) -> Result<Offset, EngineError> {
        Ok(self.hub.room(room).lock().last)
    }

    async fn read_after(
        &self,
        room: &str,
        after: Offset,
        max: usize,
    ) -> Result<Replay, EngineError> {
        let log = self.hub.room(room);
        let log = log.lock();
        if after < log.trimmed {
            return Ok(Replay::Gone);
        }
        Ok(Replay::Events(
            log.events
                .iter()
                .filter(|(o, _)| *o > after)
                .take(max)
                .cloned()
                .collect(),
        ))
    }

    async fn subscribe(&self, room: &str) -> Result<(), EngineError> {
        self.hub
            .room(room)
            .lock()
            .subscribers
            .insert(self.node_id.clone());
        Ok(())
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), EngineError> {
        self.hub.room(room).lock().subscribers.remove(&self.node_id);
        Ok(())
    }
}

#[async_trait]
impl Presence for MemoryNode {
    async fn join(
        &self,
        room: &str,
        session: &SessionInfo,
        owner: &str,
    ) -> Result<(Vec<SessionInfo>, bool), EngineError> {
        let mut members = self.hub.presence.entry(room.to_owned()).or_default();
        let before = members.len();
        members.retain(|(_, s)| s.socket_id != session.socket_id);
        let fresh = members.len() == before;
        members.push((owner.to_owned(), session.clone()));
        Ok((members.iter().map(|(_, s)| s.clone()).collect(), fresh))
    }

    async fn leave(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Option<SessionInfo>, EngineError> {
        let removed = self.hub.presence.get_mut(room).and_then(|mut members| {
            let i = members
                .iter()
                .position(|(o, s)| s.socket_id == socket_id && crate::owns(owner, o))?;
            Some(members.remove(i).1)
        });
        self.hub.presence.remove_if(room, |_, m| m.is_empty());
        Ok(removed)
    }

    async fn members(&self, room: &str) -> Result<Vec<SessionInfo>, EngineError> {
        Ok(self
            .hub
            .presence
            .get(room)
            .map(|m| m.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl SessionStore for MemoryNode {
    async fn save(
        &self,
        pid: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let mut all = self.hub.sessions.lock();
        let now = Instant::now();
        // Expired records go on every write, so the map stays bounded by
        // the sessions of the last window.
        all.retain(|_, (_, until)| *until > now);
        all.insert(pid.to_owned(), (record.clone(), now + ttl));
        Ok(())
    }

    async fn load(&self, pid: &str) -> Result<Option<SessionRecord>, EngineError> {
        let all = self.hub.sessions.lock();
        Ok(all
            .get(pid)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(r, _)| r.clone()))
    }

    async fn refresh(&self, pids: &[String], ttl: Duration) -> Result<(), EngineError> {
        let mut all = self.hub.sessions.lock();
        let until = Instant::now() + ttl;
        for pid in pids {
            if let Some(e) = all.get_mut(pid) {
                e.1 = until;
            }
        }
        Ok(())
    }

    async fn release(&self, pid: &str, conn: &str, window: Duration) -> Result<bool, EngineError> {
        let mut all = self.hub.sessions.lock();
        match all.get_mut(pid) {
            Some((r, until)) if r.conn == conn => {
                if window.is_zero() {
                    all.remove(pid);
                } else {
                    *until = Instant::now() + window;
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn forget(&self, pid: &str) -> Result<(), EngineError> {
        self.hub.sessions.lock().remove(pid);
        Ok(())
    }
}

#[async_trait]
impl UserLimiter for MemoryNode {
    async fn check(&self, user_id: &str) -> Result<bool, EngineError> {
        Ok(self.limiter.check_key(&user_id.to_owned()).is_ok())
    }
}

#[async_trait]
impl EngineHealth for MemoryNode {
    async fn ping(&self) -> Result<Duration, EngineError> {
        Ok(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalSession;
    use serde_json::json;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, String, String)>>);
    impl Deliver for Recorder {
        fn deliver(&self, room: &str, offset: Option<Offset>, msg: &RoomMessage) {
            let o = offset.map(|o| o.to_string()).unwrap_or_default();
            self.0.lock().push((room.into(), o, msg.event.clone()));
        }
        fn local_rooms(&self) -> Vec<String> {
            Vec::new()
        }
        fn local_sessions(&self) -> Vec<LocalSession> {
            Vec::new()
        }
        fn resync(&self, _room: &str) {}
        fn is_member(&self, _room: &str, _socket_id: &str) -> bool {
            false
        }
        fn positions(&self) -> Vec<(String, Offset)> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn only_subscribed_nodes_receive_in_offset_order() {
        let hub = MemoryHub::new();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let ea = hub.engine("a", a.clone(), 20, 20);
        let eb = hub.engine("b", b.clone(), 20, 20);
        ea.bus.subscribe("flow:1").await.unwrap();
        for i in 0..3 {
            eb.bus
                .publish("flow:1", RoomMessage::new(format!("e{i}"), json!({})))
                .await
                .unwrap();
        }
        assert!(b.0.lock().is_empty());
        let got = a.0.lock().clone();
        assert_eq!(
            got.iter().map(|(_, _, e)| e.as_str()).collect::<Vec<_>>(),
            ["e0", "e1", "e2"]
        );
        let offsets: Vec<Offset> = got.iter().map(|(_, o, _)| o.parse().unwrap()).collect();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
        ea.bus.unsubscribe("flow:1").await.unwrap();
        eb.bus
            .publish("flow:1", RoomMessage::new("late", json!({})))
            .await
            .unwrap();
        assert_eq!(a.0.lock().len(), 3);
    }

    #[tokio::test]
    async fn the_room_log_replays_after_an_offset_and_reports_a_trimmed_gap() {
        let hub = MemoryHub::new();
        hub.set_log_len(3);
        let e = hub.engine("a", Arc::new(Recorder::default()), 20, 20);
        let mut offsets = Vec::new();
        for i in 0..5 {
            let o = e
                .bus
                .publish("flow:1", RoomMessage::new(format!("e{i}"), json!({})))
                .await
                .unwrap()
                .unwrap();
            offsets.push(o);
        }
        let mut cursor = RoomMessage::new("cursor", json!({}));
        cursor.volatile = true;
        assert_eq!(e.bus.publish("flow:1", cursor).await.unwrap(), None);
        assert_eq!(e.bus.head("flow:1").await.unwrap(), offsets[4]);
        let Replay::Events(after) = e.bus.read_after("flow:1", offsets[2], 10).await.unwrap()
        else {
            panic!("gone")
        };
        assert_eq!(
            after
                .iter()
                .map(|(_, m)| m.event.as_str())
                .collect::<Vec<_>>(),
            ["e3", "e4"]
        );
        // e0 and e1 were trimmed: reading after e0 would skip e1.
        assert!(matches!(
            e.bus.read_after("flow:1", offsets[0], 10).await.unwrap(),
            Replay::Gone
        ));
        assert!(matches!(
            e.bus.read_after("flow:1", offsets[1], 10).await.unwrap(),
            Replay::Events(v) if v.len() == 3
        ));
    }

    #[tokio::test]
    async fn idle_rooms_are_pruned_and_live_ones_kept() {
        let hub = MemoryHub::new();
        let e = hub.engine("a", Arc::new(Recorder::default()), 20, 20);
        for i in 0..100 {
            let _ = e.bus.head(&format!("flow:probe{i}")).await;
        }
        e.bus.subscribe("flow:live").await.unwrap();
        e.bus
            .publish("flow:logged", RoomMessage::new("x", json!({})))
            .await
            .unwrap();
        assert_eq!(hub.room_count(), 102);
        hub.prune(Duration::from_secs(60));
        assert_eq!(
            hub.room_count(),
            2,
            "the subscribed room and the fresh log stay"
        );
        hub.prune(Duration::ZERO);
        assert_eq!(hub.room_count(), 1, "an idle log goes");
    }

    #[tokio::test]
    async fn limiter_budget_is_shared_between_nodes_and_per_user() {
        let hub = MemoryHub::new();
        let ea = hub.engine("a", Arc::new(Recorder::default()), 20, 20);
        let eb = hub.engine("b", Arc::new(Recorder::default()), 20, 20);
        let mut allowed = 0;
        for i in 0..40 {
            let e = if i % 2 == 0 { &ea } else { &eb };
            if e.limiter.check("u1").await.unwrap() {
                allowed += 1;
            }
        }
        // The burst of 20, plus whatever refilled during the loop.
        assert!((20..=21).contains(&allowed), "allowed {allowed}");
        assert!(ea.limiter.check("u2").await.unwrap());
    }

    #[tokio::test]
    async fn presence_lists_in_join_order() {
        let hub = MemoryHub::new();
        let e = hub.engine("a", Arc::new(Recorder::default()), 20, 20);
        let s = |id: &str| SessionInfo {
            user_id: "u".into(),
            socket_id: id.into(),
            flow_id: "1".into(),
            user_name: "n".into(),
            user_color: "c".into(),
            joined_at: "t".into(),
        };
        assert!(e.presence.join("flow:1", &s("x"), "a/1").await.unwrap().1);
        let (all, fresh) = e.presence.join("flow:1", &s("y"), "a/2").await.unwrap();
        assert!(fresh);
        assert_eq!(
            all.iter().map(|s| s.socket_id.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        // Taken over by another connection: the old owner cannot remove it.
        assert!(!e.presence.join("flow:1", &s("x"), "b/3").await.unwrap().1);
        assert!(e
            .presence
            .leave("flow:1", "x", "a/1")
            .await
            .unwrap()
            .is_none());
        assert!(e
            .presence
            .leave("flow:1", "x", "a/")
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            e.presence
                .leave("flow:1", "x", "b/")
                .await
                .unwrap()
                .unwrap()
                .socket_id,
            "x"
        );
        assert!(e
            .presence
            .leave("flow:1", "x", "b/3")
            .await
            .unwrap()
            .is_none());
        assert_eq!(e.presence.members("flow:1").await.unwrap().len(), 1);
    }
}
