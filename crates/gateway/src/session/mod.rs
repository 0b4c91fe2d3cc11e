//! The Socket.IO session of one connection: the `/flows` namespace,
//! CONNECT and authentication, and the dispatch of each client event to
//! the one handler that owns it.
//!
//! A session never knows its transport. The connection task
//! ([`crate::engineio`]) hands it each Engine.IO `message` ([`Session::on_message`],
//! [`Session::on_binary`]), asks it for its next deadline and calls it when
//! the deadline passes, and writes what it answers: the session's own
//! frames ([`Session::pop_local`]) before the frames rooms queued for it.
//! A unit test drives a session the same way, with no socket at all.
//!
//! One file per job: [`connect`] (CONNECT, auth), [`recover`] (connection
//! state recovery), [`join`],
//! [`leave`], [`refresh`] (`auth:refresh`), [`relay`] (the relay table's
//! events), [`locks`] (pod locks), [`reply`] (acks, `error`, own events).

mod connect;
mod join;
mod leave;
mod locks;
mod recover;
mod refresh;
mod relay;
mod reply;
mod slots;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod join_tests;
#[cfg(test)]
mod locks_tests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use flowgate_protocol::{DecodeError, Decoded, Packet, PacketType, PartialPacket};
use serde_json::{json, Value};
use tracing::{debug, info};

use crate::app::App;
use crate::auth::Identity;
use crate::engine::{Offset, SessionInfo};
use crate::engineio::End;
use crate::outbound::{OutFrame, Outbound, RoomFrame};
use crate::read_budget::{Held, OverRead};
use crate::rooms::NSP;
pub(crate) use reply::Refusal;
pub use slots::{PeerSlots, Slot, Slots, UserSlot, UserSlots};

/// CONNECT packets one connection may send: a client connects once (and
/// again after a namespace-level disconnect); more is churn that costs the
/// shared store a write each.
const MAX_CONNECTS: u32 = 16;

/// What the upgrade (or first polling) request carried that the session
/// needs.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// `Authorization: Bearer …`.
    pub bearer: Option<String>,
    /// `?token=…`.
    pub query_token: Option<String>,
    /// The peer, for logs.
    pub peer: String,
}

/// The flow a socket is in.
#[derive(Debug)]
pub(crate) struct Joined {
    /// `flow:F`.
    pub(crate) room: Arc<str>,
    /// Its presence entry, shared with the room's member entry.
    pub(crate) session: Arc<SessionInfo>,
    /// The last room offset delivered to the client: a room frame at or
    /// before it is not written again (replay and live delivery overlap).
    pub(crate) last: Offset,
    /// The room's newest offset when the socket joined.
    pub(crate) start: Offset,
    /// The pod locks this socket holds in the flow.
    pub(crate) locks: locks::HeldLocks,
}

/// A binary packet waiting for its attachments, and the bytes of those
/// collected so far (`read_budget.rs`).
#[derive(Debug)]
struct Awaiting {
    packet: PartialPacket,
    held: Held,
}

/// The `/flows` socket of a connection, once authenticated.
#[derive(Debug)]
pub(crate) struct FlowSocket {
    /// Socket.IO socket id (`sid`), kept across recovery.
    pub(crate) id: Arc<str>,
    /// Private session id: what a reconnecting client presents to recover.
    pub(crate) pid: Arc<str>,
    /// `node/connection`: which connection owns this socket's shared
    /// records (presence, recovery) now.
    pub(crate) owner: Arc<str>,
    pub(crate) identity: Identity,
    pub(crate) user_id: Arc<str>,
    /// `exp` + leeway.
    pub(crate) expires: Option<Instant>,
    pub(crate) flow: Option<Joined>,
    /// This user's slot on the node, given back when the socket ends.
    pub(crate) _slot: UserSlot,
}

/// One connection's Socket.IO session.
#[derive(Debug)]
pub struct Session {
    pub(crate) app: Arc<App>,
    pub(crate) hs: Handshake,
    /// The connection's queue, handed to the rooms the socket joins.
    pub(crate) out: Outbound,
    /// Frames this session produced itself (answers, acks, a replay), in
    /// order; written before what rooms queued. Bounded by what one inbound
    /// packet can produce, and a replay by its own byte cap.
    local: VecDeque<OutFrame>,
    pub(crate) socket: Option<FlowSocket>,
    /// A binary packet waiting for its attachments; boxed, as it is rare
    /// and every connection would otherwise carry it.
    partial: Option<Box<Awaiting>>,
    /// Set until the client sends CONNECT.
    connect_deadline: Option<Instant>,
    /// CONNECT packets received.
    connects: u32,
    /// A recovery's missed events, written right after the CONNECT reply.
    replay: Vec<Arc<RoomFrame>>,
    /// This address's slot for a connection that has not authenticated;
    /// given back at CONNECT.
    pre_auth: Option<Slot<std::net::IpAddr>>,
}

impl Session {
    /// A session waiting for its CONNECT.
    pub fn new(app: Arc<App>, hs: Handshake, out: Outbound) -> Self {
        let connect_deadline = Some(Instant::now() + app.config.connect_timeout);
        Session {
            app,
            hs,
            out,
            local: VecDeque::new(),
            socket: None,
            partial: None,
            connect_deadline,
            connects: 0,
            replay: Vec::new(),
            pre_auth: None,
        }
    }

    /// Takes the peer's slot for an unauthenticated connection; `false`
    /// when its address holds too many already (the connection is closed
    /// at once).
    pub fn admit_peer(&mut self) -> bool {
        let Ok(addr) = self.hs.peer.parse::<std::net::SocketAddr>() else {
            return true;
        };
        let max = self.app.config.max_unauthenticated_per_ip;
        self.pre_auth = self.app.peer_slots.take(&addr.ip(), max);
        self.pre_auth.is_some()
    }

    /// Queues a frame of the session's own, ahead of room frames.
    pub fn push_local(&mut self, f: OutFrame) {
        self.local.push_back(f);
    }

    /// The next frame of the session's own. The queue's memory is given
    /// back once it is drained: it holds a frame or two per inbound packet,
    /// and an idle connection would otherwise keep its slots for good.
    pub fn pop_local(&mut self) -> Option<OutFrame> {
        let f = self.local.pop_front();
        if f.is_none() && self.local.capacity() > 0 {
            self.local = VecDeque::new();
        }
        f
    }

    /// Whether frames of the session's own wait.
    pub fn has_local(&self) -> bool {
        !self.local.is_empty()
    }

    /// Whether the client completed CONNECT.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// Whether a room frame is for this client: it must be of the room the
    /// socket is in now, and after the last offset delivered.
    pub fn admit(&mut self, f: &RoomFrame) -> bool {
        let Some(j) = self.socket.as_mut().and_then(|s| s.flow.as_mut()) else {
            return false;
        };
        if *f.room != *j.room {
            return false;
        }
        if let Some(o) = f.offset {
            if o <= j.last {
                return false;
            }
            j.last = o;
        }
        true
    }

    /// When [`Session::on_timer`] must run next.
    pub fn deadline(&self) -> Option<Instant> {
        [
            self.connect_deadline,
            self.socket.as_ref().and_then(|s| s.expires),
            self.locks_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Connect timeout, token expiry, and the refresh of held locks.
    pub async fn on_timer(&mut self, now: Instant) -> Result<(), End> {
        self.on_locks_timer(now).await;
        if self.connect_deadline.is_some_and(|t| t <= now) {
            return Err(End::ConnectTimeout);
        }
        let expired = self
            .socket
            .as_ref()
            .and_then(|s| s.expires)
            .is_some_and(|t| t <= now);
        if expired {
            self.emit(
                "error",
                &json!({"message": "Token expired", "code": "TOKEN_EXPIRED"}),
            );
            self.app
                .metrics
                .refusals
                .with_label_values(&["TOKEN_EXPIRED"])
                .inc();
            self.send_packet(&Packet::new(PacketType::Disconnect, NSP, None));
            return Err(End::TokenExpired);
        }
        Ok(())
    }

    /// The text of one Engine.IO `message`: a Socket.IO packet.
    pub async fn on_message(&mut self, m: &str) -> Result<(), End> {
        if self.partial.is_some() {
            return Err(End::Protocol(
                "text frame while attachments were due",
                String::new(),
            ));
        }
        match Packet::decode(m) {
            // Well-formed but nested past the parser's depth: a refused
            // event (counted against the budget, as any event), not a
            // broken connection.
            Err(DecodeError::TooDeep { nsp, id }) if nsp == NSP && self.is_connected() => {
                let result = if self.spend_budget().await {
                    Err(Refusal::new("INVALID_PAYLOAD", "Payload nested too deeply"))
                } else {
                    Err(Refusal::new("RATE_LIMIT", "Rate limit exceeded"))
                };
                self.answer("", id, result);
                Ok(())
            }
            Err(e) => Err(End::Protocol("bad socket.io packet", e.to_string())),
            Ok(Decoded::Complete(p)) => self.on_packet(p).await,
            Ok(Decoded::NeedsAttachments(partial)) => {
                if partial.expected() > self.app.config.max_attachments {
                    return Err(End::Protocol(
                        "too many attachments",
                        partial.expected().to_string(),
                    ));
                }
                // The attachments collected so far are held in memory as
                // unfinished frames are: at most a max payload, and
                // within the node's read budget.
                let held = self.app.read_budget.account(self.app.config.max_payload);
                self.partial = Some(Box::new(Awaiting {
                    packet: partial,
                    held,
                }));
                Ok(())
            }
        }
    }

    /// One binary `message`: the next attachment of a binary packet.
    pub async fn on_binary(&mut self, data: Bytes) -> Result<(), End> {
        let Some(partial) = self.partial.as_mut() else {
            return Err(End::Protocol("unexpected binary frame", String::new()));
        };
        partial.held.charge(data.len()).map_err(|over| match over {
            OverRead::Connection => End::Oversize,
            OverRead::Node => End::ReadBudget,
        })?;
        match partial.packet.push(data) {
            None => Ok(()),
            Some(p) => {
                self.partial = None;
                p.check_placeholders()
                    .map_err(|e| End::Protocol("bad attachments", e.to_string()))?;
                self.on_packet(p).await
            }
        }
    }

    async fn on_packet(&mut self, p: Packet) -> Result<(), End> {
        if p.nsp != NSP {
            if p.kind == PacketType::Connect {
                self.app
                    .metrics
                    .refusals
                    .with_label_values(&["INVALID_NAMESPACE"])
                    .inc();
                if crate::log_sample::allow("unknown namespace") {
                    info!(nsp = ?reply::prefix(&p.nsp), "refused connect to unknown namespace");
                }
                self.send_packet(&Packet::new(
                    PacketType::ConnectError,
                    &p.nsp,
                    Some(json!({"message": "Invalid namespace"})),
                ));
            } else {
                debug!(nsp = ?reply::prefix(&p.nsp), "packet for a namespace without a socket ignored");
            }
            return Ok(());
        }
        match p.kind {
            PacketType::Connect => {
                self.connects += 1;
                if self.connects > MAX_CONNECTS {
                    return Err(End::Protocol("connect churn", self.connects.to_string()));
                }
                if self.socket.is_some() {
                    debug!("second CONNECT on a connected namespace ignored");
                    return Ok(());
                }
                // Cold path, boxed: its state would otherwise sit in every
                // connection's resident future.
                Box::pin(self.on_connect(p.data.as_ref())).await;
                Ok(())
            }
            PacketType::Disconnect => {
                // The client left on purpose: nothing to recover.
                self.leave_flow().await;
                self.forget().await;
                if let Some(s) = self.socket.take() {
                    info!(user = ?s.user_id, socket = %s.id, "client left the namespace");
                }
                Ok(())
            }
            PacketType::Event | PacketType::BinaryEvent => {
                if self.socket.is_none() {
                    debug!("event before CONNECT ignored");
                    return Ok(());
                }
                let id = p.id;
                let Some(Value::Array(mut args)) = p.data else {
                    return Err(End::Protocol("bad event", String::new()));
                };
                let name = match args.first() {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(End::Protocol("bad event", String::new())),
                };
                let payload = if args.len() > 1 {
                    Some(args.swap_remove(1))
                } else {
                    None
                };
                self.on_event(&name, payload, p.attachments, id).await;
                Ok(())
            }
            // The gateway never asks a client for an ack, so any ACK names an
            // id it did not issue.
            PacketType::Ack | PacketType::BinaryAck => Err(End::Protocol(
                "ack for an id the server never issued",
                p.id.map(|i| i.to_string()).unwrap_or_default(),
            )),
            PacketType::ConnectError => {
                Err(End::Protocol("CONNECT_ERROR from a client", String::new()))
            }
        }
    }

    /// One client event: rate limit, then its handler, then the ack.
    async fn on_event(
        &mut self,
        name: &str,
        payload: Option<Value>,
        attachments: Vec<Bytes>,
        ack: Option<u64>,
    ) {
        let metrics = &self.app.metrics;
        metrics
            .events_in
            .with_label_values(&[metrics.event_label(name)])
            .inc();
        let rule = self.app.table.get(name).cloned();
        let counted = rule.as_ref().is_none_or(|r| r.rate_limited);
        let result = if counted && !self.spend_budget().await {
            Err(Refusal::new("RATE_LIMIT", "Rate limit exceeded"))
        } else {
            match (name, rule) {
                // Cold paths, boxed (see `on_connect`).
                ("flow:join", _) => Box::pin(self.join(payload.as_ref())).await,
                ("flow:leave", _) => Box::pin(self.leave_event()).await,
                ("auth:refresh", _) => self.refresh(payload.as_ref()).await,
                (_, Some(rule)) => self.relay(&rule, payload.as_ref(), attachments).await,
                (other, None) => Err(Refusal::new(
                    "UNKNOWN_EVENT",
                    format!("Unknown event {:?}", reply::prefix(other)),
                )),
            }
        };
        self.answer(name, ack, result);
    }

    /// The connection ended: leave the flow (peers get `user:left`), and
    /// keep the session recoverable for the window if the end allows it.
    pub async fn close(&mut self, end: &End) {
        if self.socket.is_none() {
            // A frame over the limit before CONNECT is, from a stock
            // client, a CONNECT with a token far over any real one: a
            // CONNECT_ERROR (written before the close) makes it report
            // `connect_error` and stop, where a bare close would have it
            // reconnect and send the same frame again, forever.
            if *end == End::Oversize {
                self.send_packet(&Packet::new(
                    PacketType::ConnectError,
                    NSP,
                    Some(json!({
                        "message": "CONNECT over the size allowed before authentication",
                        "data": {"code": "INVALID_TOKEN"}
                    })),
                ));
            }
            return;
        }
        // Another connection recovered the session: the record, the
        // room's membership, presence and locks are its own now, so this
        // one touches none of them. The DISCONNECT keeps a stock client
        // that is still here (a copy of the session) from reconnecting and
        // taking it back, in turn, forever.
        if *end == End::Replaced {
            self.send_packet(&Packet::new(PacketType::Disconnect, NSP, None));
            return;
        }
        // The record keeps the flow, so that a recovery rejoins it; the
        // locks too, for the window.
        if end.recoverable() {
            self.suspend_locks().await;
            self.leave_room(true).await;
        } else {
            self.leave_flow().await;
        }
        if end.recoverable() {
            self.release().await;
        } else {
            self.forget().await;
        }
        if let Some(s) = &self.socket {
            info!(user = ?s.user_id, socket = %s.id, reason = ?end, "socket disconnected");
        }
    }
}
