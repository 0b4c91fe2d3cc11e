//! This node's side of the rooms: which local sockets are in which room, the
//! bus subscriptions that follow from it, and the fan-out of a room message
//! to local members.
//!
//! Fan-out encodes a message into its Socket.IO frame once per node and
//! queues the same bytes to every local member (no per-recipient JSON work).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::engine::{
    now_us, Control, Deliver, EngineError, LocalSession, Offset, RoomBus, RoomMessage, SessionInfo,
};
use crate::metrics::Metrics;
use crate::outbound::{Kick, OutFrame, Outbound, RoomFrame};

/// The Socket.IO namespace of flow rooms.
pub use crate::engine::NSP;

/// The room name of a flow.
pub fn room_of(flow_id: &str) -> String {
    format!("flow:{flow_id}")
}

/// One local member of a room.
#[derive(Debug, Clone)]
pub struct Member {
    /// Socket id, to skip the sender.
    pub socket_id: Arc<str>,
    /// User id, to remove a user's sockets (membership revocation).
    pub user_id: Arc<str>,
    /// Private session id, to keep its recovery record alive.
    pub pid: Arc<str>,
    /// The owning connection (`node/connection`), for presence.
    pub owner: Arc<str>,
    /// Its queue.
    pub outbound: Outbound,
    /// Its presence entry, to re-register it after a store outage.
    pub session: Arc<SessionInfo>,
}

/// The local members of one room.
#[derive(Debug, Default)]
struct Local {
    /// The room's name, shared by every frame of the room.
    name: Arc<str>,
    members: Vec<Member>,
    /// The last offset delivered here: a message at or before it was
    /// already delivered (a gap fill and live delivery overlap).
    last: Offset,
}

/// Local members by room; the bus delivers into it.
#[derive(Debug)]
pub struct Fanout {
    rooms: DashMap<String, Local>,
    metrics: Metrics,
}

/// A room message's frame for this node's members, built (or, for a frame
/// the publisher built and the bus carried, sliced) once per node: the
/// event, its JSON argument copied as is, and the offset as trailing
/// argument.
pub fn room_frame(room: &Arc<str>, offset: Option<Offset>, msg: &RoomMessage) -> Arc<RoomFrame> {
    let text = Utf8Bytes::try_from(msg.frame(offset))
        // Frames are built from `&str` or checked when decoded; this
        // fallback is never taken.
        .unwrap_or_else(|_| Utf8Bytes::from_static("42/flows,[\"error\",null]"));
    Arc::new(RoomFrame {
        room: room.clone(),
        text,
        attachments: msg.attachments.clone(),
        offset,
    })
}

impl Fanout {
    /// An empty fan-out.
    pub fn new(metrics: Metrics) -> Self {
        Fanout {
            rooms: DashMap::new(),
            metrics,
        }
    }

    /// Adds a member; `head` is where a room new to this node starts.
    fn insert(&self, room: &str, member: Member, head: Offset) -> bool {
        let mut local = self.rooms.entry(room.to_owned()).or_insert_with(|| Local {
            name: room.into(),
            members: Vec::new(),
            last: head,
        });
        let first = local.members.is_empty();
        local.members.retain(|m| {
            if m.socket_id != member.socket_id {
                return true;
            }
            // Another connection of the same session: the one this
            // member's connection recovered it from, still open here (its
            // client gone, not yet noticed, or a copy of it). It is closed:
            // left open it would stay connected and receive nothing.
            if m.owner != member.owner {
                m.outbound.kick(Kick::Replaced);
            }
            false
        });
        local.members.push(member);
        if first {
            self.metrics.rooms.inc();
        }
        first
    }

    /// Removes a connection's member (`owner`: a connection that recovered
    /// the session since keeps its own); returns whether the room is now
    /// empty here.
    fn remove(&self, room: &str, socket_id: &str, owner: &str) -> bool {
        let emptied = self
            .rooms
            .remove_if_mut(room, |_, local| {
                local
                    .members
                    .retain(|m| &*m.socket_id != socket_id || &*m.owner != owner);
                local.members.is_empty()
            })
            .is_some();
        if emptied {
            self.metrics.rooms.dec();
        }
        emptied
    }

    fn has_members(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|l| !l.members.is_empty())
    }

    /// The private session ids of every local member.
    pub fn local_pids(&self) -> Vec<String> {
        self.rooms
            .iter()
            .flat_map(|r| {
                r.members
                    .iter()
                    .map(|m| m.pid.to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Deliver for Fanout {
    fn deliver(&self, room: &str, offset: Option<Offset>, msg: &RoomMessage) {
        let Some(mut local) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(o) = offset {
            if o <= local.last {
                return;
            }
            local.last = o;
        }
        let local = local.downgrade();
        if let Some(Control::RemoveUser { user_id }) = &msg.control {
            for m in local.members.iter().filter(|m| &*m.user_id == user_id) {
                // The connection does the leaving (it owns the socket's
                // state); the eviction is ordered with the room's frames.
                m.outbound.push(OutFrame::Evict(local.name.clone()), false);
            }
            return;
        }
        let except = msg.except.as_deref();
        let recipients = local
            .members
            .iter()
            .filter(|m| Some(&*m.socket_id) != except)
            .count();
        if recipients == 0 {
            return;
        }
        let frame = room_frame(&local.name, offset, msg);
        for m in local
            .members
            .iter()
            .filter(|m| Some(&*m.socket_id) != except)
        {
            m.outbound.push(OutFrame::Room(frame.clone()), msg.volatile);
        }
        drop(local);
        self.metrics
            .events_out
            .with_label_values(&[self.metrics.event_label(&msg.event)])
            .inc_by(recipients as u64);
        let latency = Duration::from_micros(now_us().saturating_sub(msg.published_at_us));
        self.metrics.fanout_latency.observe(latency.as_secs_f64());
    }

    fn resync(&self, room: &str) {
        if let Some(local) = self.rooms.get(room) {
            for m in &local.members {
                m.outbound.kick(Kick::Resync);
            }
        }
    }

    fn is_member(&self, room: &str, socket_id: &str) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|l| l.members.iter().any(|m| &*m.socket_id == socket_id))
    }

    fn positions(&self) -> Vec<(String, Offset)> {
        self.rooms
            .iter()
            .map(|r| (r.key().clone(), r.last))
            .collect()
    }

    fn local_rooms(&self) -> Vec<String> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }

    fn local_sessions(&self) -> Vec<LocalSession> {
        self.rooms
            .iter()
            .flat_map(|r| {
                let room = r.key().clone();
                r.members
                    .iter()
                    .map(move |m| LocalSession {
                        room: room.clone(),
                        owner: m.owner.to_string(),
                        session: (*m.session).clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Room membership of this node's sockets, and the bus subscriptions that
/// follow from it: subscribed while at least one local member is in a room.
pub struct Rooms {
    fanout: Arc<Fanout>,
    bus: Arc<dyn RoomBus>,
    /// Striped locks: a join and a leave of the same room must not reorder
    /// their subscribe / unsubscribe, or a room could end up with a member
    /// and no subscription.
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Rooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rooms").finish_non_exhaustive()
    }
}

impl Rooms {
    /// Rooms over a fan-out and a bus.
    pub fn new(fanout: Arc<Fanout>, bus: Arc<dyn RoomBus>) -> Self {
        Rooms {
            fanout,
            bus,
            locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    fn lock(&self, room: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(room);
        &self.locks[(h % self.locks.len() as u64) as usize]
    }

    /// The private session ids of every local member.
    pub fn local_pids(&self) -> Vec<String> {
        self.fanout.local_pids()
    }

    /// Adds a local member, subscribing the node to the room first if it
    /// is the first one.
    pub async fn join(&self, room: &str, member: Member) -> Result<(), EngineError> {
        let _guard = self.lock(room).lock().await;
        let mut head = Offset::ZERO;
        if !self.fanout.has_members(room) {
            self.bus.subscribe(room).await?;
            // Subscribed first, then read: nothing published in between is
            // missed by a later gap fill.
            head = match self.bus.head(room).await {
                Ok(h) => h,
                Err(e) => {
                    let _ = self.bus.unsubscribe(room).await;
                    return Err(e);
                }
            };
        }
        self.fanout.insert(room, member, head);
        Ok(())
    }

    /// Removes the local member of connection `owner`, unsubscribing when
    /// it was the last one.
    pub async fn leave(&self, room: &str, socket_id: &str, owner: &str) -> Result<(), EngineError> {
        let _guard = self.lock(room).lock().await;
        if self.fanout.remove(room, socket_id, owner) {
            self.bus.unsubscribe(room).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn resync_closes_the_rooms_local_members() {
        let metrics = Metrics::new([]);
        let fanout = Fanout::new(metrics.clone());
        let mut outs = Vec::new();
        for (i, room) in ["flow:a", "flow:a", "flow:b"].iter().enumerate() {
            let head = Offset::ZERO;
            let (out, rx) = Outbound::new(8, 1 << 20, Duration::from_secs(5), metrics.clone());
            let session = SessionInfo {
                user_id: "u".into(),
                socket_id: format!("s{i}"),
                flow_id: room.to_string().into(),
                user_name: "n".into(),
                user_color: "c".into(),
                joined_at: "t".into(),
            };
            fanout.insert(
                room,
                Member {
                    socket_id: session.socket_id.as_str().into(),
                    user_id: "u".into(),
                    pid: format!("p{i}").into(),
                    owner: "n/c".into(),
                    outbound: out.clone(),
                    session: Arc::new(session),
                },
                head,
            );
            outs.push((out, rx));
        }
        assert_eq!(fanout.local_pids().len(), 3);
        fanout.resync("flow:a");
        for (out, _rx) in &outs[..2] {
            let why = tokio::time::timeout(Duration::from_secs(1), out.kicked()).await;
            assert_eq!(why.unwrap(), Kick::Resync);
        }
        let other = tokio::time::timeout(Duration::from_millis(50), outs[2].0.kicked()).await;
        assert!(other.is_err(), "another room's members stay");
        assert_eq!(metrics.slow_consumer_disconnects.get(), 0);
    }

    /// A member of socket `s1` owned by connection `owner`.
    fn member_of(
        owner: &str,
        metrics: &Metrics,
    ) -> (Member, Outbound, crate::outbound::OutboundRx) {
        let (out, rx) = Outbound::new(8, 1 << 20, Duration::from_secs(5), metrics.clone());
        let session = SessionInfo {
            user_id: "u".into(),
            socket_id: "s1".into(),
            flow_id: "f".into(),
            user_name: "n".into(),
            user_color: "c".into(),
            joined_at: "t".into(),
        };
        let m = Member {
            socket_id: "s1".into(),
            user_id: "u".into(),
            pid: "p1".into(),
            owner: owner.into(),
            outbound: out.clone(),
            session: Arc::new(session),
        };
        (m, out, rx)
    }

    #[tokio::test]
    async fn a_recovered_session_replaces_its_old_connection_which_cannot_remove_it() {
        let metrics = Metrics::new([]);
        let fanout = Fanout::new(metrics.clone());
        let (old, old_out, _old_rx) = member_of("n/1", &metrics);
        let (new, new_out, _new_rx) = member_of("n/2", &metrics);
        fanout.insert("flow:f", old, Offset::ZERO);
        // The same connection joining again replaces its entry, and stays.
        let (mut again, _, _rx) = member_of("n/1", &metrics);
        again.outbound = old_out.clone();
        fanout.insert("flow:f", again, Offset::ZERO);
        let stays = tokio::time::timeout(Duration::from_millis(50), old_out.kicked()).await;
        assert!(
            stays.is_err(),
            "a re-join does not close its own connection"
        );
        // Another connection recovered the session: the old one is closed.
        fanout.insert("flow:f", new, Offset::ZERO);
        let why = tokio::time::timeout(Duration::from_secs(1), old_out.kicked()).await;
        assert_eq!(why.unwrap(), Kick::Replaced);
        // The old connection's end leaves the new one in the room.
        assert!(!fanout.remove("flow:f", "s1", "n/1"));
        assert!(fanout.is_member("flow:f", "s1"));
        assert!(fanout.remove("flow:f", "s1", "n/2"));
        let kept = tokio::time::timeout(Duration::from_millis(50), new_out.kicked()).await;
        assert!(kept.is_err());
    }

    #[test]
    fn room_frames_carry_the_offset_and_attachments() {
        let room: Arc<str> = "flow:1".into();
        let m = RoomMessage::new("pod:moved", json!({"x": 1}));
        let f = room_frame(&room, Some(Offset { ms: 5, seq: 1 }), &m);
        assert_eq!(f.text.as_str(), r#"42/flows,["pod:moved",{"x":1},"5-1"]"#);
        let mut m = RoomMessage::new(
            "pod:updated",
            json!({"b": {"_placeholder": true, "num": 0}}),
        );
        m.attachments = vec![bytes::Bytes::from_static(b"\x01")];
        m.volatile = true;
        let f = room_frame(&room, None, &m);
        assert_eq!(
            f.text.as_str(),
            r#"451-/flows,["pod:updated",{"b":{"_placeholder":true,"num":0}}]"#
        );
        assert_eq!(f.attachments.len(), 1);
    }
}
