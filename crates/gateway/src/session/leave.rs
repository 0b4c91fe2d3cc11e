//! Leaving a flow: `flow:leave`, joining another flow, a revoked
//! membership, and the end of the connection all end here, with
//! `user:left` to the others exactly when presence really lost the
//! session, after the socket's pod locks were released (except at a
//! recoverable end, which keeps them for the recovery window).

use serde_json::json;
use tracing::{debug, info};

use super::{Refusal, Session};
use crate::engine::RoomMessage;

impl Session {
    /// `flow:leave`.
    pub(crate) async fn leave_event(&mut self) -> Result<(), Refusal> {
        if self.socket.as_ref().and_then(|s| s.flow.as_ref()).is_none() {
            return Err(Refusal::new("NOT_IN_FLOW", "Not in a flow"));
        }
        self.leave_flow().await;
        self.save_record().await;
        Ok(())
    }

    /// Leaves the socket's flow, if any, releasing its locks. The
    /// session's record is not touched: at the end of a connection it
    /// keeps the flow so that a recovery rejoins it.
    pub(crate) async fn leave_flow(&mut self) {
        self.leave_room(false).await;
    }

    /// Leaves the socket's flow; `keep_locks` for a connection that may be
    /// recovered.
    pub(crate) async fn leave_room(&mut self, keep_locks: bool) {
        let owner = self.owner().to_owned();
        let Some(joined) = self.socket.as_mut().and_then(|s| s.flow.take()) else {
            return;
        };
        if !keep_locks {
            self.release_locks(&joined.room, &joined.session.socket_id)
                .await;
        }
        let app = &self.app;
        let room = &*joined.room;
        let session = &joined.session;
        if let Err(e) = app.rooms.leave(room, &session.socket_id, &owner).await {
            app.metrics
                .engine_failed("unsubscribe", &e, room, "unsubscribe failed");
        }
        match app
            .engine
            .presence
            .leave(room, &session.socket_id, &owner)
            .await
        {
            // Already gone (reaped while this node was cut off: its
            // user:left was announced then), or owned by the connection
            // that recovered this session elsewhere.
            Ok(None) => {}
            Ok(Some(_)) => {
                let mut left = RoomMessage::new(
                    "user:left",
                    json!({"userId": session.user_id, "socketId": session.socket_id, "userName": session.user_name}),
                );
                left.except = Some(session.socket_id.clone());
                if let Err(e) = app.engine.bus.publish(room, left).await {
                    app.metrics
                        .engine_failed("publish", &e, room, "user:left not published");
                }
            }
            Err(e) => {
                app.metrics
                    .engine_failed("presence", &e, room, "presence leave failed");
            }
        }
        debug!(room, "left flow");
    }

    /// The user's membership of `room` was revoked.
    pub(crate) async fn on_evicted(&mut self, room: &str) {
        let current = self
            .socket
            .as_ref()
            .and_then(|s| s.flow.as_ref())
            .map(|j| j.room.clone());
        if current.as_deref() == Some(room) {
            info!(room, "membership revoked: leaving the flow");
            self.leave_flow().await;
            self.save_record().await;
            self.app
                .metrics
                .refusals
                .with_label_values(&["FORBIDDEN"])
                .inc();
            self.emit(
                "error",
                &json!({"message": "Membership revoked", "code": "FORBIDDEN"}),
            );
        }
    }
}
