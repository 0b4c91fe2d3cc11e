//! `flow:join`: access check, room membership (and the bus subscription
//! that follows), presence, `flow:users` and `flow:locks` to the joiner
//! and `user:joined` to the others.
//!
//! Access is checked twice: before anything is done, and again once the
//! socket is a local member of the room. A revocation caches the refusal
//! and then publishes the eviction; a join whose first check passed just
//! before the revocation either reads the refusal in its second check, or
//! is already a member when the eviction arrives and is removed by it. One
//! or the other, never neither.

use std::sync::Arc;

use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{Joined, Refusal, Session};
use crate::engine::{FlowId, RoomMessage, SessionInfo};
use crate::ids::iso_now;
use crate::rooms::room_of;

impl Session {
    pub(crate) async fn join(&mut self, payload: Option<&Value>) -> Result<(), Refusal> {
        let obj = payload.and_then(Value::as_object);
        let flow_id = obj
            .and_then(|o| parse_flow_id(o.get("flowId")))
            .ok_or_else(|| {
                Refusal::new(
                    "INVALID_FLOW_ID",
                    "flowId must be 1-128 characters of A-Z a-z 0-9 _ - . :",
                )
            })?;
        let given_name = optional_string(obj, "userName", 100)?;
        let given_color = optional_string(obj, "userColor", 32)?;
        let app = self.app.clone();
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| Refusal::new("JOIN_ERROR", "Not connected"))?;
        let identity = socket.identity.clone();
        check_access(&app, &identity, &flow_id).await?;
        let room: Arc<str> = room_of(&flow_id).into();
        // Joining the flow the socket is already in (a front end that joins
        // again on every `connect`, also after a recovery): the answer is
        // the same, and nobody is told the user left and came back. A
        // userName or userColor that differs from the one shown is taken:
        // presence is updated and the others are told `user:joined` again
        // (same socketId, new name), as the old gateway told them on every
        // join.
        if let Some(joined) = socket.flow.as_ref().filter(|j| j.room == room) {
            let shown = joined.session.clone();
            let renamed = given_name.is_some_and(|n| n != shown.user_name)
                || given_color.is_some_and(|c| c != shown.user_color);
            if renamed {
                let session = Arc::new(SessionInfo {
                    user_name: given_name.unwrap_or(&shown.user_name).to_owned(),
                    user_color: given_color.unwrap_or(&shown.user_color).to_owned(),
                    ..(*shown).clone()
                });
                return self.rename(&room, session).await;
            }
            let members = app.engine.presence.members(&room).await.map_err(|e| {
                app.metrics
                    .engine_failed("presence", &e, &room, "presence read failed");
                unavailable()
            })?;
            self.emit(
                "flow:users",
                &serde_json::to_value(&members).unwrap_or_default(),
            );
            self.emit_flow_locks(&room).await;
            return Ok(());
        }
        let user_name = given_name.unwrap_or("Anonymous");
        let user_color = given_color.unwrap_or("#888888");
        let session = Arc::new(SessionInfo {
            user_id: socket.user_id.to_string(),
            socket_id: socket.id.to_string(),
            flow_id: flow_id.clone(),
            user_name: user_name.to_owned(),
            user_color: user_color.to_owned(),
            joined_at: iso_now(),
        });
        // One flow per socket: joining another leaves the first.
        self.leave_flow().await;

        let failed = |e: &dyn std::fmt::Display, what: &str| {
            warn!(error = %e, room = %room, "{what}");
            unavailable()
        };
        if let Err(e) = app.rooms.join(&room, self.member(&session)).await {
            app.metrics
                .engine_failed("subscribe", &e, &room, "join failed");
            return Err(failed(&e, "subscribe failed"));
        }
        // A member now, so an eviction published from here on reaches this
        // socket; one published before is seen as a refusal here.
        if let Err(refusal) = check_access(&app, &identity, &flow_id).await {
            let _ = app
                .rooms
                .leave(&room, &session.socket_id, self.owner())
                .await;
            return Err(refusal);
        }
        // Where this socket starts in the room log: recovery replays from
        // here when the client received no room event yet.
        let start = match app.engine.bus.head(&room).await {
            Ok(o) => o,
            Err(e) => {
                let _ = app
                    .rooms
                    .leave(&room, &session.socket_id, self.owner())
                    .await;
                return Err(failed(&e, "room log unreadable"));
            }
        };
        let members = match app
            .engine
            .presence
            .join(&room, &session, self.owner())
            .await
        {
            Ok((m, _)) => m,
            Err(e) => {
                app.metrics
                    .engine_failed("presence", &e, &room, "presence join failed");
                let _ = app
                    .rooms
                    .leave(&room, &session.socket_id, self.owner())
                    .await;
                return Err(failed(&e, "presence join failed"));
            }
        };
        if let Some(s) = self.socket.as_mut() {
            s.flow = Some(Joined {
                room: room.clone(),
                session: session.clone(),
                last: start,
                start,
                locks: Default::default(),
            });
        }
        self.save_record().await;
        self.emit(
            "flow:users",
            &serde_json::to_value(&members).unwrap_or_default(),
        );
        self.emit_flow_locks(&room).await;
        self.announce_joined(&room, &session).await;
        info!(user = ?session.user_id, room = %room, "joined flow");
        Ok(())
    }

    /// A re-join of the socket's own flow under another userName or
    /// userColor: the room's member entry (which presence is rebuilt from)
    /// and the presence entry take the new one, the record is saved, the
    /// joiner gets `flow:users` and `flow:locks` as on any join, and the
    /// others `user:joined`. The room membership and the offsets stay.
    async fn rename(&mut self, room: &Arc<str>, session: Arc<SessionInfo>) -> Result<(), Refusal> {
        let app = self.app.clone();
        // Replaces the member entry of this socket (same socket id); the
        // room is subscribed already, so no Redis call is made.
        if let Err(e) = app.rooms.join(room, self.member(&session)).await {
            app.metrics
                .engine_failed("subscribe", &e, room, "rename failed");
            return Err(unavailable());
        }
        let members = match app.engine.presence.join(room, &session, self.owner()).await {
            Ok((m, _)) => m,
            Err(e) => {
                app.metrics
                    .engine_failed("presence", &e, room, "presence rename failed");
                return Err(unavailable());
            }
        };
        if let Some(j) = self.socket.as_mut().and_then(|s| s.flow.as_mut()) {
            j.session = session.clone();
        }
        self.save_record().await;
        self.emit(
            "flow:users",
            &serde_json::to_value(&members).unwrap_or_default(),
        );
        self.emit_flow_locks(room).await;
        self.announce_joined(room, &session).await;
        info!(user = ?session.user_id, room = %room, "renamed in flow");
        Ok(())
    }

    /// `user:joined` to everyone else in the room.
    pub(crate) async fn announce_joined(&self, room: &str, session: &SessionInfo) {
        let mut joined = RoomMessage::new(
            "user:joined",
            serde_json::to_value(session).unwrap_or(Value::Null),
        );
        joined.except = Some(session.socket_id.clone());
        if let Err(e) = self.app.engine.bus.publish(room, joined).await {
            self.app
                .metrics
                .engine_failed("publish", &e, room, "user:joined not published");
        }
    }
}

/// A join that a dependency (Redis, the membership store) failed: the
/// contract's `UNAVAILABLE`, the client may retry (a failure after the
/// previous flow was left leaves the socket in no flow).
fn unavailable() -> Refusal {
    Refusal::new(
        "UNAVAILABLE",
        "Could not join the flow now: a dependency is unavailable; retry",
    )
}

/// The access policy's decision as a refusal.
pub(crate) async fn check_access(
    app: &crate::app::App,
    identity: &crate::auth::Identity,
    flow_id: &str,
) -> Result<(), Refusal> {
    match crate::access::may_join(app, identity, flow_id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refusal::new("FORBIDDEN", "Not allowed to join this flow")),
        Err(e) => {
            warn!(error = %e, flow_id, "join refused: access undecidable");
            Err(unavailable())
        }
    }
}

pub(crate) fn parse_flow_id(v: Option<&Value>) -> Option<FlowId> {
    let (s, integer) = match v? {
        Value::String(s) => (s.clone(), false),
        Value::Number(n) if n.is_u64() || n.is_i64() => (n.to_string(), true),
        _ => return None,
    };
    // Room names become Redis keys with a `{flow:F}` hash tag: no braces,
    // no whitespace, bounded length.
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    ok.then_some(FlowId { text: s, integer })
}

fn optional_string<'a>(
    obj: Option<&'a Map<String, Value>>,
    field: &str,
    max: usize,
) -> Result<Option<&'a str>, Refusal> {
    match obj.and_then(|o| o.get(field)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s.as_str())),
        Some(_) => Err(Refusal::new(
            "INVALID_PAYLOAD",
            format!("{field} must be a string of at most {max} characters"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flow_ids() {
        assert_eq!(
            parse_flow_id(Some(&json!("abc-1_2.3:x"))),
            Some("abc-1_2.3:x".into())
        );
        let n = parse_flow_id(Some(&json!(42))).unwrap();
        assert_eq!((n.text.as_str(), n.integer), ("42", true));
        assert!(!parse_flow_id(Some(&json!("42"))).unwrap().integer);
        assert_eq!(parse_flow_id(Some(&json!(""))), None);
        assert_eq!(parse_flow_id(Some(&json!("{x}"))), None);
        assert_eq!(parse_flow_id(Some(&json!("a b"))), None);
        assert_eq!(parse_flow_id(Some(&json!("x".repeat(129)))), None);
        assert_eq!(parse_flow_id(Some(&json!(1.5))), None);
        assert_eq!(parse_flow_id(None), None);
    }
}
