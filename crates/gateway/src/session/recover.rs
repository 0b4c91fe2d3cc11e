//! Connection state recovery: restoring a lost session on this connection
//! (same sid and pid, user and flow), whichever node it was on, with the
//! room events it missed queued behind the CONNECT reply.

use std::sync::Arc;

use serde_json::json;
use tracing::info;

use super::connect::expiry_instant;
use super::{FlowSocket, Joined, Session};
use crate::auth::Identity;
use crate::engine::{Offset, Replay};
use crate::outbound::OutFrame;
use crate::rooms::room_frame;

/// Why a recovery attempt became a new session.
#[derive(Debug)]
pub(crate) enum NotRecovered {
    /// Unknown pid, window passed, or another user's session.
    Unknown,
    /// Events after the client's offset were trimmed from the room log, or
    /// more than a replay may hold.
    LogGone,
    /// The shared store could not be read.
    Unavailable,
}

impl Session {
    /// Restores session `pid` on this connection: same sid and pid, same
    /// user and flow; the room events the client missed are queued first.
    pub(crate) async fn recover(
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
        let Some(info) = record.flow.clone().map(Arc::new) else {
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
            self.release_lost_locks(&crate::rooms::room_of(&info.flow_id))
                .await;
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

    /// The client gets a new session instead: the old one is gone for
    /// good, so its locks are released now rather than at the end of the
    /// window.
    async fn abandon_recovery(&mut self, room: &str) {
        if let Some(s) = &self.socket {
            let _ = self.app.rooms.leave(room, &s.id, &s.owner).await;
        }
        self.release_lost_locks(room).await;
        self.socket = None;
        self.replay.clear();
    }
}
