//! This node's side of the rooms: which local sockets are in which room, the
//! bus subscriptions that follow from it, and the fan-out of a room message
//! to local members.
//!
//! Fan-out encodes a message into its Socket.IO frame once per node and
//! queues the same bytes to every local member (no per-recipient JSON work).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use serde_json::Value;

use crate::engine::{now_us, Control, Deliver, EngineError, RoomBus, RoomMessage, SessionInfo};
use crate::metrics::Metrics;
use crate::outbound::{EncodedEvent, Kick, OutFrame, Outbound};

/// The Socket.IO namespace of flow rooms.
pub const NSP: &str = "/flows";

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
    /// Its queue.
    pub outbound: Outbound,
    /// Its presence entry, to re-register it after a store outage.
    pub session: Arc<SessionInfo>,
    /// Tells its connection to leave a room (membership revoked).
    pub evict: tokio::sync::mpsc::Sender<String>,
}

/// Local members by room; the bus delivers into it.
#[derive(Debug)]
pub struct Fanout {
    rooms: DashMap<String, Vec<Member>>,
    metrics: Metrics,
}

/// Encodes `event` with one argument into the Engine.IO `message` frame of
/// an EVENT (or BINARY_EVENT) of the flows namespace.
pub fn encode_event(event: &str, data: &Value, attachments: &[bytes::Bytes]) -> EncodedEvent {
    // Writing a `Value` into a String cannot fail.
    encode_raw(
        event,
        &serde_json::to_string(data).unwrap_or_default(),
        attachments,
    )
}

/// The same, with the argument already JSON text: the fan-out path, where
/// it is copied into the frame as is.
pub fn encode_raw(event: &str, data_json: &str, attachments: &[bytes::Bytes]) -> EncodedEvent {
    let mut text = String::with_capacity(16 + NSP.len() + event.len() + data_json.len());
    if attachments.is_empty() {
        text.push_str("42");
    } else {
        text.push_str(&format!("45{}-", attachments.len()));
    }
    text.push_str(NSP);
    text.push_str(",[");
    // An event name is a JSON string; serializing a &str cannot fail.
    text.push_str(&serde_json::to_string(event).unwrap_or_default());
    text.push(',');
    text.push_str(data_json);
    text.push(']');
    EncodedEvent {
        text: Utf8Bytes::from(text),
        attachments: attachments.to_vec(),
    }
}

impl Fanout {
    /// An empty fan-out.
    pub fn new(metrics: Metrics) -> Self {
        Fanout {
            rooms: DashMap::new(),
            metrics,
        }
    }

    fn insert(&self, room: &str, member: Member) -> bool {
        let mut members = self.rooms.entry(room.to_owned()).or_default();
        let first = members.is_empty();
        members.retain(|m| m.socket_id != member.socket_id);
        members.push(member);
        if first {
            self.metrics.rooms.inc();
        }
        first
    }

    /// Removes a member; returns whether the room is now empty here.
    fn remove(&self, room: &str, socket_id: &str) -> bool {
        let emptied = self
            .rooms
            .remove_if_mut(room, |_, members| {
                members.retain(|m| &*m.socket_id != socket_id);
                members.is_empty()
            })
            .is_some();
        if emptied {
            self.metrics.rooms.dec();
        }
        emptied
    }

    fn has_members(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|m| !m.is_empty())
    }
}

impl Deliver for Fanout {
    fn deliver(&self, room: &str, _offset: &str, msg: &RoomMessage) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        if let Some(Control::RemoveUser { user_id }) = &msg.control {
            for m in members.iter().filter(|m| &*m.user_id == user_id) {
                // The connection task does the leaving (it owns the socket's
                // state); a full channel means an eviction is already due.
                let _ = m.evict.try_send(room.to_owned());
            }
            return;
        }
        let except = msg.except.as_deref();
        let recipients = members
            .iter()
            .filter(|m| Some(&*m.socket_id) != except)
            .count();
        if recipients == 0 {
            return;
        }
        let frame = OutFrame::Shared(Arc::new(encode_raw(
            &msg.event,
            msg.data.get(),
            &msg.attachments,
        )));
        for m in members.iter().filter(|m| Some(&*m.socket_id) != except) {
            m.outbound.push(frame.clone(), msg.volatile);
        }
        drop(members);
        self.metrics
            .events_out
            .with_label_values(&[self.metrics.event_label(&msg.event)])
            .inc_by(recipients as u64);
        let latency = Duration::from_micros(now_us().saturating_sub(msg.published_at_us));
        self.metrics.fanout_latency.observe(latency.as_secs_f64());
    }

    fn resync(&self) {
        for room in self.rooms.iter() {
            for m in room.value() {
                m.outbound.kick(Kick::Resync);
            }
        }
    }

    fn local_rooms(&self) -> Vec<String> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }

    fn local_sessions(&self) -> Vec<(String, SessionInfo)> {
        self.rooms
            .iter()
            .flat_map(|r| {
                let room = r.key().clone();
                r.value()
                    .iter()
                    .map(move |m| (room.clone(), (*m.session).clone()))
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

    /// Adds a local member, subscribing the node to the room first if it
    /// is the first one.
    pub async fn join(&self, room: &str, member: Member) -> Result<(), EngineError> {
        let _guard = self.lock(room).lock().await;
        if !self.fanout.has_members(room) {
            self.bus.subscribe(room).await?;
        }
        self.fanout.insert(room, member);
        Ok(())
    }

    /// Removes a local member, unsubscribing when it was the last one.
    pub async fn leave(&self, room: &str, socket_id: &str) -> Result<(), EngineError> {
        let _guard = self.lock(room).lock().await;
        if self.fanout.remove(room, socket_id) {
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
    async fn resync_closes_every_local_member() {
        let metrics = Metrics::new([]);
        let fanout = Fanout::new(metrics.clone());
        let mut outs = Vec::new();
        for (i, room) in ["flow:a", "flow:a", "flow:b"].iter().enumerate() {
            let (out, rx) = Outbound::new(8, Duration::from_secs(5), metrics.clone());
            let (evict, _) = tokio::sync::mpsc::channel(1);
            let session = SessionInfo {
                user_id: "u".into(),
                socket_id: format!("s{i}"),
                flow_id: room.to_string(),
                user_name: "n".into(),
                user_color: "c".into(),
                joined_at: "t".into(),
            };
            fanout.insert(
                room,
                Member {
                    socket_id: session.socket_id.as_str().into(),
                    user_id: "u".into(),
                    outbound: out.clone(),
                    session: Arc::new(session),
                    evict,
                },
            );
            outs.push((out, rx));
        }
        fanout.resync();
        for (out, _rx) in &outs {
            let why = tokio::time::timeout(Duration::from_secs(1), out.kicked()).await;
            assert_eq!(why.unwrap(), Kick::Resync);
        }
        assert_eq!(metrics.slow_consumer_disconnects.get(), 0);
    }

    #[test]
    fn encodes_plain_and_binary_events() {
        let e = encode_event("pod:moved", &json!({"x": 1}), &[]);
        assert_eq!(e.text.as_str(), r#"42/flows,["pod:moved",{"x":1}]"#);
        let e = encode_event(
            "pod:updated",
            &json!({"b": {"_placeholder": true, "num": 0}}),
            &[bytes::Bytes::from_static(b"\x01")],
        );
        assert_eq!(
            e.text.as_str(),
            r#"451-/flows,["pod:updated",{"b":{"_placeholder":true,"num":0}}]"#
        );
        assert_eq!(e.attachments.len(), 1);
    }
}
