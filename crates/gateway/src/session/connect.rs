//! CONNECT to `/flows`: authentication, a new session or the recovery of a
//! lost one (Socket.IO connection state recovery), and the session's
//! record in the shared store that makes recovery possible on any node.
//!
//! Wire details the stock client (≥ 4.6) relies on: the CONNECT reply
//! carries `{sid, pid}`; every non-volatile room event carries its offset
//! as a trailing string argument; a reconnecting client adds `{pid,
//! offset}` to its auth payload, and sees `socket.recovered === true` when
//! the reply carries the same `pid` again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_protocol::{Packet, PacketType};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::{FlowSocket, Joined, Session};
use crate::auth::{pick_token, AuthError, Identity};
use crate::engine::{Offset, Replay, SessionRecord};
use crate::ids::{iso_now, random_id};
use crate::outbound::OutFrame;
use crate::rooms::{room_frame, Member, NSP};

/// `exp` + leeway as an instant; `None` for no expiry.
pub(crate) fn expiry_instant(exp: Option<u64>, leeway: Duration) -> Option<Instant> {
    let exp = exp?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::from_secs(exp).saturating_add(leeway);
    // An `exp` centuries away is no expiry at all (and must not overflow).
    Instant::now().checked_add(at.saturating_sub(now))
}

/// Why a recovery attempt became a new session.
#[derive(Debug)]
enum NotRecovered {
    /// Unknown pid, window passed, or another user's session.
    Unknown,
    /// Events after the client's offset were trimmed from the room log, or
    /// more than a replay may hold.
    LogGone,
    /// The shared store could not be read.
    Unavailable,
}

impl Session {
    /// `node/connection`, the owner tag of a new connection.
    fn new_owner(&self) -> Arc<str> {
        format!("{}/{}", self.app.config.node_id, random_id(12)).into()
    }

    pub(crate) async fn on_connect(&mut self, auth: Option<&Value>) {
        let token = pick_token(
            auth,
            self.hs.bearer.as_deref(),
            self.hs.query_token.as_deref(),
        );
        let verified = match token {
            None => Err(AuthError::NoToken),
            Some(t) => self.app.verifier.verify(t),
        };
        let identity = match verified {
            Ok(identity) => identity,
            Err(e) => {
                self.app
                    .metrics
                    .refusals
                    .with_label_values(&[e.code()])
                    .inc();
                if crate::log_sample::allow("connect refused") {
                    info!(code = e.code(), reason = %e, "connect refused");
                }
                self.send_packet(&Packet::new(
                    PacketType::ConnectError,
                    NSP,
                    Some(json!({"message": e.to_string(), "data": {"code": e.code()}})),
                ));
                return;
            }
        };
        let pid = auth
            .and_then(|a| a.get("pid"))
            .and_then(Value::as_str)
            .filter(|p| p.len() <= 64);
        if pid.is_some()
            && self.app.user_slots.held(identity.user_id.as_str())
                >= self.app.config.max_connections_per_user
        {
            // Checked before recovery too, so that a recovery attempt
            // cannot bypass the cap.
            self.user_slot(&identity);
            return;
        }
        self.connect_deadline = None;
        if let Some(pid) = pid {
            let offset = auth
                .and_then(|a| a.get("offset"))
                .and_then(Value::as_str)
                .and_then(|o| o.parse::<Offset>().ok());
            match self.recover(pid, offset, &identity).await {
                Ok(()) => {
                    self.app
                        .metrics
                        .recoveries
                        .with_label_values(&["recovered"])
                        .inc();
                    self.pre_auth = None;
                    self.greet();
                    for f in std::mem::take(&mut self.replay) {
                        self.push_local(OutFrame::Room(f));
                    }
                    return;
                }
                Err(why) => {
                    let outcome = match why {
                        NotRecovered::Unknown => "unknown",
                        NotRecovered::LogGone => "log_gone",
                        NotRecovered::Unavailable => "failed",
                    };
                    self.app
                        .metrics
                        .recoveries
                        .with_label_values(&[outcome])
                        .inc();
                    debug!(why = ?why, "session not recovered; a new one starts");
                }
            }
        }
        let Some(slot) = self.user_slot(&identity) else {
            return;
        };
        let socket = FlowSocket {
            id: random_id(20).into(),
            pid: random_id(24).into(),
            owner: self.new_owner(),
            user_id: identity.user_id.as_str().into(),
            expires: expiry_instant(identity.expires_at, self.app.config.jwt.leeway),
            identity,
            flow: None,
            _slot: slot,
        };
        info!(user = ?socket.user_id, socket = %socket.id, "socket connected");
        self.socket = Some(socket);
        self.pre_auth = None;
        self.save_record().await;
        self.greet();
    }

    /// A slot for the user on this node, or the CONNECT_ERROR that says
    /// there is none.
    fn user_slot(&mut self, identity: &Identity) -> Option<super::UserSlot> {
        let user: Arc<str> = identity.user_id.as_str().into();
        let max = self.app.config.max_connections_per_user;
        let slot = self.app.user_slots.take(&user, max);
        if slot.is_none() {
            self.app
                .metrics
                .refusals
                .with_label_values(&["TOO_MANY_CONNECTIONS"])
                .inc();
            info!(user = ?user, max, "connect refused: too many sockets for one user");
            self.send_packet(&Packet::new(
                PacketType::ConnectError,
                NSP,
                Some(json!({"message": "Too many connections", "data": {"code": "TOO_MANY_CONNECTIONS"}})),
            ));
        }
        slot
    }

    /// The CONNECT reply and the `connected` event.
    fn greet(&mut self) {
        let Some(s) = &self.socket else { return };
        // Written by hand so that `sid` comes first, as the reference
        // server writes it (a `Value` map would sort the keys).
        let reply = format!(
            "40{NSP},{{\"sid\":{},\"pid\":{}}}",
            Value::from(&*s.id),
            Value::from(&*s.pid)
        );
        let user_id = s.user_id.clone();
        self.push_local(OutFrame::Text(reply.into()));
        self.emit(
            "connected",
            &json!({"message": "Connected to flows", "userId": &*user_id, "serverTime": iso_now()}),
        );
    }

    /// Restores session `pid` on this connection: same sid and pid, same
    /// user and flow; the room events the client missed are queued first.
    async fn recover(
        &mut self,
        pid: &str,
        offset: Option<Offset>,
        identity: &Identity,
    ) -> Result<(), NotRecovered> {
        let app = self.app.clone();
        let record = match app.engine.sessions.load(pid).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(NotRecovered::Unknown),
            Err(e) => {
                app.metrics
                    .engine_failed("sessions", &e, "", "session record unreadable");
                return Err(NotRecovered::Unavailable);
            }
        };
        if record.user_id != identity.user_id {
            return Err(NotRecovered::Unknown);
        }
        let owner = self.new_owner();
        let user: Arc<str> = identity.user_id.as_str().into();
        let slot = app
            .user_slots
            .take(&user, app.config.max_connections_per_user)
            .ok_or(NotRecovered::Unknown)?;
        let mut socket = FlowSocket {
            id: record.sid.as_str().into(),
            pid: pid.into(),
            owner,
            user_id: user,
            expires: expiry_instant(identity.expires_at, app.config.jwt.leeway),
            identity: identity.clone(),
            flow: None,
            _slot: slot,
        };
        let Some(info) = record.flow.clone() else {
            self.socket = Some(socket);
            self.save_record().await;
            return Ok(());
        };
        // Membership may have been revoked while the client was away.
        if !matches!(
            crate::access::may_join(&app, identity, &info.flow_id).await,
            Ok(true)
        ) {
            self.socket = Some(socket);
            self.save_record().await;
            self.emit(
                "error",
                &json!({"message": "Not allowed to join this flow", "code": "FORBIDDEN"}),
            );
            return Ok(());
        }
        let start = record
            .joined_at_offset
            .as_deref()
            .and_then(|o| o.parse::<Offset>().ok())
            .unwrap_or_default();
        // The client cannot have seen this room's events from before it
        // joined; an offset from an earlier room is older than the join.
        let after = offset.map_or(start, |o| o.max(start));
        let room: Arc<str> = crate::rooms::room_of(&info.flow_id).into();
        socket.flow = Some(Joined {
            room: room.clone(),
            session: info.clone(),
            last: after,
            start,
            locks: Default::default(),
        });
        // Claim the record first, so that the connection this one replaces
        // releases nothing when it notices it is gone.
        self.socket = Some(socket);
        self.save_record().await;
        let member = self.member(&info);
        if let Err(e) = app.rooms.join(&room, member).await {
            app.metrics
                .engine_failed("subscribe", &e, &room, "recovery join failed");
            self.abandon_recovery(&room).await;
            return Err(NotRecovered::Unavailable);
        }
        // Checked again now that the socket is a member, as a join does: a
        // revocation published before this point did not reach it.
        if super::join::check_access(&app, identity, &info.flow_id)
            .await
            .is_err()
        {
            self.abandon_recovery(&room).await;
            return Err(NotRecovered::Unknown);
        }
        // Live events now queue behind the replay; the overlap is skipped
        // by offset when written.
        let replay = match app
            .engine
            .bus
            .read_after(&room, after, app.config.room_log_len as usize)
            .await
        {
            Ok(Replay::Events(events)) => events,
            Ok(Replay::Gone) => {
                self.abandon_recovery(&room).await;
                return Err(NotRecovered::LogGone);
            }
            Err(e) => {
                app.metrics
                    .engine_failed("replay", &e, &room, "room log unreadable");
                self.abandon_recovery(&room).await;
                return Err(NotRecovered::Unavailable);
            }
        };
        let mut bytes = 0usize;
        let mut frames = Vec::with_capacity(replay.len());
        for (o, msg) in &replay {
            if msg.control.is_some() || msg.except.as_deref() == Some(&*info.socket_id) {
                continue;
            }
            let f = room_frame(&room, Some(*o), msg);
            bytes += OutFrame::Room(f.clone()).bytes();
            if bytes > app.config.recovery_max_bytes {
                self.abandon_recovery(&room).await;
                return Err(NotRecovered::LogGone);
            }
            frames.push(f);
        }
        let replayed = frames.len();
        // Written after the CONNECT reply (see `on_connect`) and before
        // anything the room queued since the join; the delivered offset
        // advances as they are written (`Session::admit`).
        self.replay = frames;
        match app.engine.presence.join(&room, &info, self.owner()).await {
            Ok((_, true)) => self.announce_joined(&room, &info).await,
            Ok((_, false)) => {}
            Err(e) => app
                .metrics
                .engine_failed("presence", &e, &room, "presence rejoin failed"),
        }
        self.adopt_locks().await;
        info!(user = ?info.user_id, socket = %info.socket_id, room = %room, replayed, "session recovered");
        Ok(())
    }

    async fn abandon_recovery(&mut self, room: &str) {
        if let Some(s) = &self.socket {
            let _ = self.app.rooms.leave(room, &s.id).await;
        }
        self.socket = None;
        self.replay.clear();
    }

    /// This connection's owner tag.
    pub(crate) fn owner(&self) -> &str {
        self.socket.as_ref().map_or("", |s| &s.owner)
    }

    /// A room member entry for this socket.
    pub(crate) fn member(&self, info: &crate::engine::SessionInfo) -> Member {
        let s = self.socket.as_ref().expect("member of a connected socket");
        Member {
            socket_id: s.id.clone(),
            user_id: s.user_id.clone(),
            pid: s.pid.clone(),
            owner: s.owner.clone(),
            outbound: self.out.clone(),
            session: Arc::new(info.clone()),
        }
    }

    /// Writes the session's record to the shared store (at connect, join
    /// and leave), owned by this connection.
    pub(crate) async fn save_record(&self) {
        let Some(s) = &self.socket else { return };
        let record = SessionRecord {
            sid: s.id.to_string(),
            user_id: s.user_id.to_string(),
            conn: s.owner.to_string(),
            flow: s.flow.as_ref().map(|j| j.session.clone()),
            joined_at_offset: s.flow.as_ref().map(|j| j.start.to_string()),
        };
        let cfg = &self.app.config;
        // Kept alive by the node while connected (see `recovery_keeper`);
        // a dead node's records run out one window after its last refresh.
        let ttl = cfg.recovery_window + cfg.presence_refresh * 2;
        if let Err(e) = self.app.engine.sessions.save(&s.pid, &record, ttl).await {
            warn!(error = %e, "session record not saved: this session cannot be recovered");
        }
    }

    /// The connection is lost: the session stays recoverable for the
    /// window, if this connection still owns it.
    pub(crate) async fn release(&self) {
        let Some(s) = &self.socket else { return };
        let window = self.app.config.recovery_window;
        if let Err(e) = self
            .app
            .engine
            .sessions
            .release(&s.pid, &s.owner, window)
            .await
        {
            debug!(error = %e, "session record not released");
        }
    }

    /// The client left on purpose, or may not come back: nothing to recover.
    pub(crate) async fn forget(&self) {
        let Some(s) = &self.socket else { return };
        let _ = self
            .app
            .engine
            .sessions
            .release(&s.pid, &s.owner, Duration::ZERO)
            .await;
    }
}
