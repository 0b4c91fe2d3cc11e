//! The embedded in-memory engine: one process, no dependencies.
//!
//! A [`MemoryHub`] stands for the shared store. Each node gets its own
//! [`Engine`] view of the hub, so several in-process nodes sharing one hub
//! behave like nodes sharing one Redis (used by fast tests); a single node
//! with its own hub is the zero-dependency `flowgate serve`.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;

use super::{
    Deliver, Engine, EngineError, EngineHealth, Presence, RoomBus, RoomMessage, SessionInfo,
    UserLimiter,
};

#[derive(Default)]
struct RoomLog {
    /// Next offset to assign.
    next: u64,
    /// Nodes subscribed to the room.
    subscribers: HashSet<String>,
}

/// The shared state of every node attached to it.
#[derive(Default)]
pub struct MemoryHub {
    /// Per-room offset counter and subscribers; one lock per room so that
    /// delivery happens in offset order without serialising unrelated rooms.
    rooms: DashMap<String, Arc<Mutex<RoomLog>>>,
    /// Each node's delivery sink.
    nodes: DashMap<String, Arc<dyn Deliver>>,
    /// room → sessions in join order.
    presence: DashMap<String, Vec<SessionInfo>>,
    /// One limiter for every user: the budget is shared by all nodes.
    limiter: Mutex<Option<Arc<DefaultKeyedRateLimiter<String>>>>,
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
            health: node,
            queue: None,
            access_cache: None,
        }
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
    async fn publish(&self, room: &str, msg: RoomMessage) -> Result<String, EngineError> {
        let log = self.hub.room(room);
        let mut log = log.lock();
        let offset = log.next.to_string();
        log.next += 1;
        // Delivery under the room lock keeps offset order; `deliver` only
        // queues frames, so the lock is held briefly.
        let sinks: Vec<Arc<dyn Deliver>> = log
            .subscribers
            .iter()
            .filter_map(|n| self.hub.nodes.get(n).map(|s| s.clone()))
            .collect();
        for sink in sinks {
            sink.deliver(room, &offset, &msg);
        }
        Ok(offset)
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
    ) -> Result<Vec<SessionInfo>, EngineError> {
        let mut members = self.hub.presence.entry(room.to_owned()).or_default();
        members.retain(|s| s.socket_id != session.socket_id);
        members.push(session.clone());
        Ok(members.clone())
    }

    async fn leave(&self, room: &str, socket_id: &str) -> Result<Option<SessionInfo>, EngineError> {
        let removed = self.hub.presence.get_mut(room).and_then(|mut members| {
            let i = members.iter().position(|s| s.socket_id == socket_id)?;
            Some(members.remove(i))
        });
        self.hub.presence.remove_if(room, |_, m| m.is_empty());
        Ok(removed)
    }

    async fn members(&self, room: &str) -> Result<Vec<SessionInfo>, EngineError> {
        Ok(self
            .hub
            .presence
            .get(room)
            .map(|m| m.clone())
            .unwrap_or_default())
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
    use serde_json::json;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, String, String)>>);
    impl Deliver for Recorder {
        fn deliver(&self, room: &str, offset: &str, msg: &RoomMessage) {
            self.0
                .lock()
                .push((room.into(), offset.into(), msg.event.clone()));
        }
        fn local_rooms(&self) -> Vec<String> {
            Vec::new()
        }
        fn local_sessions(&self) -> Vec<(String, SessionInfo)> {
            Vec::new()
        }
        fn resync(&self) {}
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
        let got: Vec<_> =
            a.0.lock()
                .iter()
                .map(|(_, o, e)| format!("{o}:{e}"))
                .collect();
        assert_eq!(got, ["0:e0", "1:e1", "2:e2"]);
        ea.bus.unsubscribe("flow:1").await.unwrap();
        eb.bus
            .publish("flow:1", RoomMessage::new("late", json!({})))
            .await
            .unwrap();
        assert_eq!(a.0.lock().len(), 3);
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
        e.presence.join("flow:1", &s("x")).await.unwrap();
        let all = e.presence.join("flow:1", &s("y")).await.unwrap();
        assert_eq!(
            all.iter().map(|s| s.socket_id.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert_eq!(
            e.presence
                .leave("flow:1", "x")
                .await
                .unwrap()
                .unwrap()
                .socket_id,
            "x"
        );
        assert!(e.presence.leave("flow:1", "x").await.unwrap().is_none());
        assert_eq!(e.presence.members("flow:1").await.unwrap().len(), 1);
    }
}
