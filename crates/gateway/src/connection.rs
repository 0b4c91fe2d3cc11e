//! One Engine.IO connection over WebSocket and the `/flows` Socket.IO socket
//! on it: handshake, heartbeat, decoding, authentication, flow rooms, acks
//! and the clean close.
//!
//! Each connection is one task reading frames and handling them in order,
//! plus a writer task draining the bounded [`Outbound`] queue into the
//! socket, so a slow reader never blocks room fan-out. Any malformed input
//! ends this connection only, with the reason logged and counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use flowgate_protocol::{Decoded, EnginePacket, OpenPacket, Packet, PacketType, PartialPacket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use crate::app::App;
use crate::auth::{pick_token, AuthError, Identity};
use crate::engine::{QueuedEvent, RoomMessage, SessionInfo};
use crate::events::{RelayRule, Stamp};
use crate::ids::{iso_now, random_id};
use crate::outbound::{Kick, OutFrame, Outbound};
use crate::rooms::{encode_event, room_of, Member, NSP};

/// What the upgrade request carried that the connection needs.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    /// `Authorization: Bearer …`.
    pub bearer: Option<String>,
    /// `?token=…`.
    pub query_token: Option<String>,
    /// The peer, for logs.
    pub peer: String,
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed the WebSocket or sent an Engine.IO close.
    ClientClosed,
    /// A malformed frame; the reason is logged and counted.
    Protocol(&'static str, String),
    /// A frame over the max payload.
    Oversize,
    /// No pong within the ping timeout.
    PingTimeout,
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
    /// The client does not read its frames.
    SlowConsumer,
    /// Room messages were lost before reaching this node.
    Resync,
    /// The node is draining.
    Drain,
    /// The token expired without a refresh.
    TokenExpired,
    /// The socket broke under the writer.
    WriteFailed,
}

impl End {
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        Some(match self {
            End::ClientClosed | End::WriteFailed => return None,
            End::Protocol(..) => (1002, "protocol error"),
            End::Oversize => (1009, "frame too large"),
            End::PingTimeout => (1000, "ping timeout"),
            End::ConnectTimeout => (1008, "no connect"),
            End::SlowConsumer => (1008, "slow consumer"),
            // 1012 "service restart": clients reconnect, and rejoin with a
            // fresh flow:users.
            End::Resync => (1012, "resync"),
            End::Drain => (1001, "server shutting down"),
            End::TokenExpired => (1000, "token expired"),
        })
    }
}

/// A refused client event: the `error` event and failed ack it produces.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    message: String,
}

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// The flow a socket is in.
#[derive(Debug)]
struct Joined {
    room: String,
    session: SessionInfo,
}

/// The `/flows` socket of a connection, once authenticated.
#[derive(Debug)]
struct FlowSocket {
    id: Arc<str>,
    identity: Identity,
    user_id: Arc<str>,
    expires: Option<Instant>,
    flow: Option<Joined>,
}

struct Conn {
    app: Arc<App>,
    hs: Handshake,
    out: Outbound,
    socket: Option<FlowSocket>,
    /// A binary packet waiting for its attachments.
    partial: Option<PartialPacket>,
    /// Bytes of attachments collected for `partial`.
    partial_bytes: usize,
    connect_deadline: Option<Instant>,
    next_ping: Instant,
    pong_deadline: Option<Instant>,
    drain_at: Option<Instant>,
    /// Handed to the rooms this socket joins, to evict it.
    evict: mpsc::Sender<String>,
}

fn text(s: String) -> OutFrame {
    OutFrame::Text(Utf8Bytes::from(s))
}

/// A Socket.IO packet inside an Engine.IO `message`.
fn sio(p: &Packet) -> OutFrame {
    text(EnginePacket::Message(&p.encode()).encode())
}

fn expiry_instant(exp: Option<u64>, leeway: Duration) -> Option<Instant> {
    let exp = exp?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::from_secs(exp).saturating_add(leeway);
    // An `exp` centuries away is no expiry at all (and must not overflow).
    Instant::now().checked_add(at.saturating_sub(now))
}

/// Serves one upgraded WebSocket until it ends.
pub async fn run(ws: WebSocket, app: Arc<App>, hs: Handshake) {
    let sid = random_id(20);
    let span = tracing::info_span!("conn", sid = %sid, peer = %hs.peer);
    serve(ws, app, hs, sid).instrument(span).await
}

async fn serve(ws: WebSocket, app: Arc<App>, hs: Handshake, sid: String) {
    let cfg = app.config.clone();
    app.metrics.connections.inc();
    let _gauge = scopeguard(app.metrics.connections.clone());
    let (sink, mut stream) = ws.split();
    let (out, rx) = Outbound::new(
        cfg.outbound_queue,
        cfg.slow_consumer_grace,
        app.metrics.clone(),
    );
    let (close_tx, close_rx) = oneshot::channel();
    let write_failed = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(write_loop(sink, rx, close_rx, write_failed.clone()));

    let open = OpenPacket {
        sid,
        upgrades: vec![],
        ping_interval: cfg.ping_interval.as_millis() as u64,
        ping_timeout: cfg.ping_timeout.as_millis() as u64,
        max_payload: cfg.max_payload as u64,
    };
    out.push(text(open.encode()), false);
    debug!("engine.io open");

    let now = Instant::now();
    let (evict, mut evicted) = mpsc::channel::<String>(4);
    let mut conn = Conn {
        evict,
        app: app.clone(),
        hs,
        out: out.clone(),
        socket: None,
        partial: None,
        partial_bytes: 0,
        connect_deadline: Some(now + cfg.connect_timeout),
        next_ping: now + cfg.ping_interval,
        pong_deadline: None,
        drain_at: None,
    };

    let timer = tokio::time::sleep_until(conn.next_deadline().into());
    tokio::pin!(timer);
    let drain = app.drain.clone();
    let closing = drain.closing();
    tokio::pin!(closing);

    let end = loop {
        tokio::select! {
            biased;
            kick = out.kicked() => match kick {
                Kick::SlowConsumer => break End::SlowConsumer,
                Kick::Resync => break End::Resync,
            },
            _ = write_failed.cancelled() => break End::WriteFailed,
            Some(room) = evicted.recv() => conn.on_evicted(&room).await,
            delay = &mut closing, if conn.drain_at.is_none() => {
                conn.drain_at = Some(Instant::now() + delay);
            }
            frame = stream.next() => {
                let step = match frame {
                    None => Err(End::ClientClosed),
                    Some(Ok(Message::Text(t))) => conn.on_text(t.as_str()).await,
                    Some(Ok(Message::Binary(b))) => conn.on_binary(b).await,
                    Some(Ok(Message::Close(_))) => Err(End::ClientClosed),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                    Some(Err(e)) => {
                        let e = e.to_string();
                        if e.contains("too long") || e.contains("Space limit") {
                            Err(End::Oversize)
                        } else {
                            debug!(error = %e, "read failed");
                            Err(End::ClientClosed)
                        }
                    }
                };
                if let Err(end) = step {
                    break end;
                }
            }
            _ = &mut timer => {
                if let Err(end) = conn.on_timer().await {
                    break end;
                }
            }
        }
        // Resetting re-registers the timer: only when the deadline moved
        // (a pong, a CONNECT, a refresh), not on every frame.
        let next = tokio::time::Instant::from_std(conn.next_deadline());
        if timer.deadline() != next || timer.is_elapsed() {
            timer.as_mut().reset(next);
        }
    };

    match &end {
        End::Protocol(reason, detail) => {
            app.metrics
                .protocol_errors
                .with_label_values(&[reason])
                .inc();
            warn!(reason, detail = %detail, "closing connection: malformed input");
        }
        End::Oversize => {
            app.metrics
                .protocol_errors
                .with_label_values(&["oversize frame"])
                .inc();
            warn!(
                max_payload = cfg.max_payload,
                "closing connection: frame over max payload"
            );
        }
        End::SlowConsumer => warn!("closing connection: slow consumer"),
        other => debug!(reason = ?other, "connection ends"),
    }

    conn.leave_flow().await;
    if let Some(s) = &conn.socket {
        info!(user = %s.user_id, socket = %s.id, reason = ?end, "socket disconnected");
    }
    drop(conn);
    drop(out);
    // A slow consumer's queue is discarded; otherwise what is queued (an
    // `error` event, a DISCONNECT) is written before the close frame.
    let flush = !matches!(end, End::SlowConsumer);
    let _ = close_tx.send(end.close_frame().map(|(c, r)| (c, r, flush)));
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Decrements the connection gauge when the connection task ends, however
/// it ends.
fn scopeguard(g: prometheus::IntGauge) -> impl Drop {
    struct Guard(prometheus::IntGauge);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Guard(g)
}

type Sink = SplitSink<WebSocket, Message>;

async fn feed(sink: &mut Sink, frame: OutFrame) -> Result<(), axum::Error> {
    match frame {
        OutFrame::Text(t) => sink.feed(Message::Text(t)).await,
        OutFrame::Shared(e) => {
            sink.feed(Message::Text(e.text.clone())).await?;
            for a in &e.attachments {
                sink.feed(Message::Binary(a.clone())).await?;
            }
            Ok(())
        }
    }
}

/// Writes queued frames, batching whatever is already queued into one
/// flush. Ends on the close signal (writing the close frame) or an error.
async fn write_loop(
    mut sink: Sink,
    mut rx: mpsc::Receiver<OutFrame>,
    mut close: oneshot::Receiver<Option<(u16, &'static str, bool)>>,
    failed: tokio_util::sync::CancellationToken,
) {
    let result: Result<(), axum::Error> = async {
        loop {
            tokio::select! {
                biased;
                c = &mut close => {
                    if let Ok(Some((code, reason, flush))) = c {
                        if flush {
                            while let Ok(f) = rx.try_recv() {
                                feed(&mut sink, f).await?;
                            }
                        }
                        sink.send(Message::Close(Some(CloseFrame {
                            code,
                            reason: Utf8Bytes::from_static(reason),
                        })))
                        .await?;
                    }
                    let _ = sink.close().await;
                    return Ok(());
                }
                f = rx.recv() => {
                    let Some(f) = f else { return Ok(()) };
                    feed(&mut sink, f).await?;
                    let mut batch = 1;
                    while batch < 128 {
                        match rx.try_recv() {
                            Ok(f) => feed(&mut sink, f).await?,
                            Err(_) => break,
                        }
                        batch += 1;
                    }
                    sink.flush().await?;
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "write failed");
        failed.cancel();
    }
}

impl Conn {
    fn next_deadline(&self) -> Instant {
        let mut d = self.pong_deadline.unwrap_or(self.next_ping);
        for t in [
            self.connect_deadline,
            self.drain_at,
            self.socket.as_ref().and_then(|s| s.expires),
        ]
        .into_iter()
        .flatten()
        {
            d = d.min(t);
        }
        d
    }

    async fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if self.drain_at.is_some_and(|t| t <= now) {
            return Err(End::Drain);
        }
        if self.connect_deadline.is_some_and(|t| t <= now) {
            return Err(End::ConnectTimeout);
        }
        if let Some(deadline) = self.pong_deadline {
            if deadline <= now {
                return Err(End::PingTimeout);
            }
        } else if self.next_ping <= now {
            self.out.push(text(EnginePacket::Ping("").encode()), false);
            self.pong_deadline = Some(now + self.app.config.ping_timeout);
        }
        if self
            .socket
            .as_ref()
            .and_then(|s| s.expires)
            .is_some_and(|t| t <= now)
        {
            self.emit(
                "error",
                json!({"message": "Token expired", "code": "TOKEN_EXPIRED"}),
            );
            self.app
                .metrics
                .refusals
                .with_label_values(&["TOKEN_EXPIRED"])
                .inc();
            self.out
                .push(sio(&Packet::new(PacketType::Disconnect, NSP, None)), false);
            return Err(End::TokenExpired);
        }
        Ok(())
    }

    async fn on_text(&mut self, frame: &str) -> Result<(), End> {
        let packet = EnginePacket::decode(frame)
            .map_err(|e| End::Protocol("bad engine.io packet", e.to_string()))?;
        match packet {
            EnginePacket::Pong(_) => {
                self.pong_deadline = None;
                self.next_ping = Instant::now() + self.app.config.ping_interval;
                Ok(())
            }
            EnginePacket::Ping(p) => {
                self.out.push(text(EnginePacket::Pong(p).encode()), false);
                Ok(())
            }
            EnginePacket::Close => Err(End::ClientClosed),
            EnginePacket::Noop => Ok(()),
            EnginePacket::Open(_) | EnginePacket::Upgrade => Err(End::Protocol(
                "unexpected engine.io packet",
                frame.chars().take(1).collect(),
            )),
            EnginePacket::Message(m) => {
                if self.partial.is_some() {
                    return Err(End::Protocol(
                        "text frame while attachments were due",
                        String::new(),
                    ));
                }
                match Packet::decode(m) {
                    Err(e) => Err(End::Protocol("bad socket.io packet", e.to_string())),
                    Ok(Decoded::Complete(p)) => self.on_packet(p).await,
                    Ok(Decoded::NeedsAttachments(partial)) => {
                        if partial.expected() > self.app.config.max_attachments {
                            return Err(End::Protocol(
                                "too many attachments",
                                partial.expected().to_string(),
                            ));
                        }
                        self.partial = Some(partial);
                        self.partial_bytes = 0;
                        Ok(())
                    }
                }
            }
        }
    }

    async fn on_binary(&mut self, data: Bytes) -> Result<(), End> {
        let Some(partial) = self.partial.as_mut() else {
            return Err(End::Protocol("unexpected binary frame", String::new()));
        };
        self.partial_bytes += data.len();
        if self.partial_bytes > self.app.config.max_payload {
            return Err(End::Oversize);
        }
        match partial.push(data) {
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
                info!(nsp = %p.nsp, "refused connect to unknown namespace");
                let err = Packet::new(
                    PacketType::ConnectError,
                    &p.nsp,
                    Some(json!({"message": "Invalid namespace"})),
                );
                self.out.push(sio(&err), false);
            } else {
                debug!(nsp = %p.nsp, "packet for a namespace without a socket ignored");
            }
            return Ok(());
        }
        match p.kind {
            PacketType::Connect => {
                if self.socket.is_some() {
                    debug!("second CONNECT on a connected namespace ignored");
                    return Ok(());
                }
                self.on_connect(p.data.as_ref());
                Ok(())
            }
            PacketType::Disconnect => {
                self.leave_flow().await;
                if let Some(s) = self.socket.take() {
                    info!(user = %s.user_id, socket = %s.id, "client left the namespace");
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

    fn on_connect(&mut self, auth: Option<&Value>) {
        let app = &self.app;
        let token = pick_token(
            auth,
            self.hs.bearer.as_deref(),
            self.hs.query_token.as_deref(),
        );
        let verified = match token {
            None => Err(AuthError::NoToken),
            Some(t) => app.verifier.verify(t),
        };
        match verified {
            Err(e) => {
                app.metrics.refusals.with_label_values(&[e.code()]).inc();
                info!(code = e.code(), reason = %e, "connect refused");
                let err = Packet::new(
                    PacketType::ConnectError,
                    NSP,
                    Some(json!({"message": e.to_string(), "data": {"code": e.code()}})),
                );
                self.out.push(sio(&err), false);
            }
            Ok(identity) => {
                let id: Arc<str> = random_id(20).into();
                let user_id: Arc<str> = identity.user_id.as_str().into();
                let expires = expiry_instant(identity.expires_at, app.config.jwt.leeway);
                let ok = Packet::new(PacketType::Connect, NSP, Some(json!({"sid": &*id})));
                self.out.push(sio(&ok), false);
                info!(user = %user_id, socket = %id, "socket connected");
                self.emit(
                    "connected",
                    json!({"message": "Connected to flows", "userId": &*user_id, "serverTime": iso_now()}),
                );
                self.socket = Some(FlowSocket {
                    id,
                    identity,
                    user_id,
                    expires,
                    flow: None,
                });
                self.connect_deadline = None;
            }
        }
    }

    /// Queues an event for this client only.
    fn emit(&self, event: &str, data: Value) {
        let e = encode_event(event, &data, &[]);
        self.app
            .metrics
            .events_out
            .with_label_values(&[self.app.metrics.event_label(event)])
            .inc();
        self.out.push(OutFrame::Text(e.text), false);
    }

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
            Err(refuse("RATE_LIMIT", "Rate limit exceeded"))
        } else {
            match (name, rule) {
                ("flow:join", _) => self.join(payload.as_ref()).await,
                ("flow:leave", _) => match self.socket.as_ref().and_then(|s| s.flow.as_ref()) {
                    None => Err(refuse("NOT_IN_FLOW", "Not in a flow")),
                    Some(_) => {
                        self.leave_flow().await;
                        Ok(())
                    }
                },
                ("auth:refresh", _) => self.refresh(payload.as_ref()),
                (_, Some(rule)) => self.relay(&rule, payload.as_ref(), attachments).await,
                (other, None) => Err(refuse(
                    "INVALID_PAYLOAD",
                    format!("Unknown event {other:?}"),
                )),
            }
        };
        match result {
            Ok(()) => {
                if let Some(id) = ack {
                    self.ack(id, json!({"ok": true}));
                }
            }
            Err(r) => {
                self.app.metrics.refusals.with_label_values(&[r.code]).inc();
                debug!(event = name, code = r.code, message = %r.message, "event refused");
                self.emit("error", json!({"message": &r.message, "code": r.code}));
                if let Some(id) = ack {
                    self.ack(
                        id,
                        json!({"ok": false, "code": r.code, "message": r.message}),
                    );
                }
            }
        }
    }

    fn ack(&self, id: u64, data: Value) {
        let p = Packet {
            id: Some(id),
            ..Packet::new(PacketType::Ack, NSP, Some(Value::Array(vec![data])))
        };
        self.out.push(sio(&p), false);
    }

    async fn spend_budget(&self) -> bool {
        let Some(s) = &self.socket else { return false };
        match self.app.engine.limiter.check(&s.user_id).await {
            Ok(allowed) => allowed,
            Err(e) => {
                // The engine decides its own fallback; an error reaching
                // here means it had none, and the event is let through
                // rather than refusing every user.
                self.app
                    .metrics
                    .engine_failed("limiter", &e, "", "rate limiter unavailable");
                true
            }
        }
    }

    fn refresh(&mut self, payload: Option<&Value>) -> Result<(), Refusal> {
        let token = payload
            .and_then(|p| p.get("token"))
            .and_then(Value::as_str)
            .ok_or_else(|| refuse("INVALID_PAYLOAD", "auth:refresh requires {token}"))?;
        let identity = self
            .app
            .verifier
            .verify(token)
            .map_err(|e| refuse(e.code(), e.to_string()))?;
        let leeway = self.app.config.jwt.leeway;
        let socket = self
            .socket
            .as_mut()
            .ok_or_else(|| refuse("AUTH_ERROR", "Not connected"))?;
        if identity.user_id != *socket.user_id {
            return Err(refuse("AUTH_ERROR", "Token is for another user"));
        }
        socket.expires = expiry_instant(identity.expires_at, leeway);
        socket.identity = identity;
        debug!(user = %socket.user_id, "token refreshed");
        Ok(())
    }

    async fn join(&mut self, payload: Option<&Value>) -> Result<(), Refusal> {
        let obj = payload.and_then(Value::as_object);
        let flow_id = obj
            .and_then(|o| parse_flow_id(o.get("flowId")))
            .ok_or_else(|| {
                refuse(
                    "INVALID_FLOW_ID",
                    "flowId must be 1-128 characters of A-Z a-z 0-9 _ - . :",
                )
            })?;
        let user_name = optional_string(obj, "userName", 100)?.unwrap_or("Anonymous");
        let user_color = optional_string(obj, "userColor", 32)?.unwrap_or("#888888");
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| refuse("JOIN_ERROR", "Not connected"))?;
        match crate::access::may_join(&self.app, &socket.identity, &flow_id).await {
            Ok(true) => {}
            Ok(false) => return Err(refuse("FORBIDDEN", "Not allowed to join this flow")),
            Err(e) => {
                warn!(error = %e, flow_id, "join refused: access undecidable");
                return Err(refuse("JOIN_ERROR", "Could not check access to the flow"));
            }
        }
        let session = SessionInfo {
            user_id: socket.user_id.to_string(),
            socket_id: socket.id.to_string(),
            flow_id: flow_id.clone(),
            user_name: user_name.to_owned(),
            user_color: user_color.to_owned(),
            joined_at: iso_now(),
        };
        let member = Member {
            socket_id: socket.id.clone(),
            user_id: socket.user_id.clone(),
            outbound: self.out.clone(),
            session: Arc::new(session.clone()),
            evict: self.evict.clone(),
        };
        // One flow per socket: joining another leaves the first.
        self.leave_flow().await;

        let app = self.app.clone();
        let room = room_of(&flow_id);
        if let Err(e) = app.rooms.join(&room, member).await {
            app.metrics
                .engine_failed("subscribe", &e, &room, "join failed");
            return Err(refuse("JOIN_ERROR", "Could not join the flow"));
        }
        let members = match app.engine.presence.join(&room, &session).await {
            Ok(m) => m,
            Err(e) => {
                app.metrics
                    .engine_failed("presence", &e, &room, "presence join failed");
                let _ = app.rooms.leave(&room, &session.socket_id).await;
                return Err(refuse("JOIN_ERROR", "Could not join the flow"));
            }
        };
        self.emit(
            "flow:users",
            serde_json::to_value(&members).unwrap_or_default(),
        );
        let mut joined = RoomMessage::new(
            "user:joined",
            serde_json::to_value(&session).unwrap_or_default(),
        );
        joined.except = Some(session.socket_id.clone());
        if let Err(e) = app.engine.bus.publish(&room, joined).await {
            app.metrics
                .engine_failed("publish", &e, &room, "user:joined not published");
        }
        info!(user = %session.user_id, room, "joined flow");
        if let Some(s) = self.socket.as_mut() {
            s.flow = Some(Joined { room, session });
        }
        Ok(())
    }

    /// The user's membership of `room` was revoked.
    async fn on_evicted(&mut self, room: &str) {
        let current = self
            .socket
            .as_ref()
            .and_then(|s| s.flow.as_ref())
            .map(|j| j.room.as_str());
        if current == Some(room) {
            info!(room, "membership revoked: leaving the flow");
            self.leave_flow().await;
            self.app
                .metrics
                .refusals
                .with_label_values(&["FORBIDDEN"])
                .inc();
            self.emit(
                "error",
                json!({"message": "Membership revoked", "code": "FORBIDDEN"}),
            );
        }
    }

    async fn leave_flow(&mut self) {
        let Some(joined) = self.socket.as_mut().and_then(|s| s.flow.take()) else {
            return;
        };
        let app = &self.app;
        let Joined { room, session } = joined;
        if let Err(e) = app.rooms.leave(&room, &session.socket_id).await {
            app.metrics
                .engine_failed("unsubscribe", &e, &room, "unsubscribe failed");
        }
        match app.engine.presence.leave(&room, &session.socket_id).await {
            // Already gone (reaped while this node was cut off): its
            // user:left was announced then.
            Ok(None) => {}
            Ok(Some(_)) => {
                let mut left = RoomMessage::new(
                    "user:left",
                    json!({"userId": session.user_id, "socketId": session.socket_id, "userName": session.user_name}),
                );
                left.except = Some(session.socket_id.clone());
                if let Err(e) = app.engine.bus.publish(&room, left).await {
                    app.metrics
                        .engine_failed("publish", &e, &room, "user:left not published");
                }
            }
            Err(e) => {
                app.metrics
                    .engine_failed("presence", &e, &room, "presence leave failed");
            }
        }
        debug!(room, "left flow");
    }

    async fn relay(
        &mut self,
        rule: &RelayRule,
        payload: Option<&Value>,
        attachments: Vec<Bytes>,
    ) -> Result<(), Refusal> {
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| refuse("NOT_IN_FLOW", "Not in a flow"))?;
        let joined = socket
            .flow
            .as_ref()
            .ok_or_else(|| refuse("NOT_IN_FLOW", "Join a flow first"))?;
        let timestamp = if rule.stamp.contains(&Stamp::Timestamp) {
            iso_now()
        } else {
            String::new()
        };
        let data: Map<String, Value> = rule
            .build(payload, &socket.user_id, &socket.id, &timestamp)
            .map_err(|e| refuse("INVALID_PAYLOAD", e.0))?;
        let data = Value::Object(data);
        let persist = rule.persist && self.app.store.is_some();
        if persist && crate::eventlog::has_nul(&data) {
            return Err(refuse(
                "INVALID_PAYLOAD",
                "Text must not contain NUL characters",
            ));
        }
        let data = crate::engine::raw_json(&data);
        let logged = persist.then(|| data.clone());
        let mut msg = RoomMessage::with_raw(rule.emit.clone(), data);
        msg.attachments = attachments;
        msg.except = Some(socket.id.to_string());
        msg.volatile = rule.volatile;
        let app = &self.app;
        let offset = app
            .engine
            .bus
            .publish(&joined.room, msg)
            .await
            .map_err(|e| {
                app.metrics
                    .engine_failed("publish", &e, "", "publish failed");
                refuse("UNAVAILABLE", "The event could not be delivered; try again")
            })?;
        if let Some(data) = logged {
            // The ack waits for this: an acknowledged event is durably
            // queued for the event log.
            let queued = QueuedEvent {
                flow_id: joined.session.flow_id.clone(),
                offset,
                event: rule.emit.clone(),
                data,
                user_id: Some(socket.user_id.to_string()),
            };
            crate::eventlog::enqueue(app, &queued).await.map_err(|e| {
                app.metrics.engine_failed(
                    "queue",
                    &e,
                    "",
                    "event relayed but not queued for the log",
                );
                refuse("UNAVAILABLE", "The event was not stored; try again")
            })?;
        }
        Ok(())
    }
}

fn parse_flow_id(v: Option<&Value>) -> Option<String> {
    let s = match v? {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return None,
    };
    // Room names become Redis keys with a `{flow:F}` hash tag: no braces,
    // no whitespace, bounded length.
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    ok.then_some(s)
}

fn optional_string<'a>(
    obj: Option<&'a Map<String, Value>>,
    field: &str,
    max: usize,
) -> Result<Option<&'a str>, Refusal> {
    match obj.and_then(|o| o.get(field)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s.as_str())),
        Some(_) => Err(refuse(
            "INVALID_PAYLOAD",
            format!("{field} must be a string of at most {max} characters"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exp_centuries_away_does_not_overflow() {
        assert!(expiry_instant(Some(u64::MAX), Duration::from_secs(5)).is_none());
        assert!(expiry_instant(None, Duration::ZERO).is_none());
        let soon = expiry_instant(
            Some(crate::engine::now_us() / 1_000_000 + 60),
            Duration::ZERO,
        )
        .unwrap();
        assert!(soon > Instant::now() + Duration::from_secs(55));
    }

    #[test]
    fn flow_ids() {
        assert_eq!(
            parse_flow_id(Some(&json!("abc-1_2.3:x"))),
            Some("abc-1_2.3:x".into())
        );
        assert_eq!(parse_flow_id(Some(&json!(42))), Some("42".into()));
        assert_eq!(parse_flow_id(Some(&json!(""))), None);
        assert_eq!(parse_flow_id(Some(&json!("{x}"))), None);
        assert_eq!(parse_flow_id(Some(&json!("a b"))), None);
        assert_eq!(parse_flow_id(Some(&json!("x".repeat(129)))), None);
        assert_eq!(parse_flow_id(Some(&json!(1.5))), None);
        assert_eq!(parse_flow_id(None), None);
    }
}
