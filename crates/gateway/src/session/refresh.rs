//! `auth:refresh`: a new token for the same user before the old one
//! expires.

use serde_json::Value;
use tracing::debug;

use super::{Refusal, Session};
use crate::session::connect::expiry_instant;

impl Session {
    pub(crate) fn refresh(&mut self, payload: Option<&Value>) -> Result<(), Refusal> {
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
        Ok(())
    }
}
