//! `auth:refresh`: a new token for the same user before the old one
//! expires. The access policy is applied again with the new token's
//! claims: a token that no longer allows the socket's flow takes the
//! socket out of it (`error` FORBIDDEN), as a revoked membership does.

use serde_json::Value;
use tracing::{debug, warn};

use super::{Refusal, Session};
use crate::session::connect::expiry_instant;

impl Session {
    pub(crate) async fn refresh(&mut self, payload: Option<&Value>) -> Result<(), Refusal> {
        let token = payload
            .and_then(|p| p.get("token"))
            .and_then(Value::as_str)
            .ok_or_else(|| Refusal::new("INVALID_PAYLOAD", "auth:refresh requires {token}"))?;
        let identity = self
            .app
            .verifier
            .verify(token)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let leeway = self.app.config.jwt.leeway;
        let socket = self
            .socket
            .as_mut()
            .ok_or_else(|| Refusal::new("AUTH_ERROR", "Not connected"))?;
        if identity.user_id != *socket.user_id {
            return Err(Refusal::new("AUTH_ERROR", "Token is for another user"));
        }
        socket.expires = expiry_instant(identity.expires_at, leeway);
        socket.identity = identity;
        debug!(user = ?socket.user_id, "token refreshed");
        let Some((room, flow_id)) = socket
            .flow
            .as_ref()
            .map(|j| (j.room.clone(), j.session.flow_id.clone()))
        else {
            return Ok(());
        };
        match crate::access::may_join(&self.app, &socket.identity, &flow_id).await {
            Ok(true) => {}
            // Out of the flow exactly as when a membership is revoked.
            Ok(false) => self.on_evicted(&room).await,
            // The token itself is fine; the socket stays where it is until
            // access can be decided again (the next join or refresh).
            Err(e) => warn!(error = %e, flow_id = %flow_id, "access not re-checked on refresh"),
        }
        Ok(())
    }
}
