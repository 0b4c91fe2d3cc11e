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

use super::recover::NotRecovered;
use super::{FlowSocket, Session};
use crate::auth::{pick_token, AuthError, Identity};
use crate::engine::{Offset, SessionRecord};
use crate::ids::{iso_now, random_id};
use crate::outbound::OutFrame;
use crate::rooms::{Member, NSP};

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

impl Session {
    /// `node/connection`, the owner tag of a new connection.
    pub(crate) fn new_owner(&self) -> Arc<str> {
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

    /// This connection's owner tag.
    pub(crate) fn owner(&self) -> &str {
        self.socket.as_ref().map_or("", |s| &s.owner)
    }

    /// A room member entry for this socket.
    pub(crate) fn member(&self, info: &Arc<crate::engine::SessionInfo>) -> Member {
        let s = self.socket.as_ref().expect("member of a connected socket");
        Member {
            socket_id: s.id.clone(),
            user_id: s.user_id.clone(),
            pid: s.pid.clone(),
            owner: s.owner.clone(),
            outbound: self.out.clone(),
            session: info.clone(),
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
            flow: s.flow.as_ref().map(|j| (*j.session).clone()),
            joined_at_offset: s.flow.as_ref().map(|j| j.start.to_string()),
        };
        let cfg = &self.app.config;
        // Kept alive by the node while connected (see `recovery_keeper`);
        // a dead node's records run out one window after its last refresh.
        let ttl = crate::recovery_keeper::record_ttl(cfg);
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
