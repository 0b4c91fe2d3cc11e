//! The relay table's events (`pod:move`, `cursor:move`, …): built once from
//! the client's payload with the server's stamps, published to the room,
//! and — for `persist` events — queued durably for the event log before
//! the ack.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{Refusal, Session};
use crate::engine::{QueuedEvent, RoomMessage};
use crate::events::{RelayRule, Stamp};
use crate::ids::iso_now;

impl Session {
    /// Spends one event of the user's budget.
    pub(crate) async fn spend_budget(&self) -> bool {
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

    /// One relay-table event: its lock rule (if any) decides first
    /// whether it is relayed at all.
    pub(crate) async fn relay(
        &mut self,
        rule: &RelayRule,
        payload: Option<&Value>,
        attachments: Vec<Bytes>,
    ) -> Result<(), Refusal> {
        let step = self.lock_step(rule, payload).await?;
        if matches!(step, super::locks::LockStep::Skip) {
            return Ok(());
        }
        let r = self.relay_event(rule, payload, attachments).await;
        self.lock_done(step, r.is_ok()).await;
        r
    }

    async fn relay_event(
        &mut self,
        rule: &RelayRule,
        payload: Option<&Value>,
        attachments: Vec<Bytes>,
    ) -> Result<(), Refusal> {
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| Refusal::new("NOT_IN_FLOW", "Not in a flow"))?;
        let joined = socket
            .flow
            .as_ref()
            .ok_or_else(|| Refusal::new("NOT_IN_FLOW", "Join a flow first"))?;
        let timestamp = if rule.stamp.contains(&Stamp::Timestamp) {
            iso_now()
        } else {
            String::new()
        };
        let data: Map<String, Value> = rule
            .build(payload, &socket.user_id, &socket.id, &timestamp)
            .map_err(|e| Refusal::new("INVALID_PAYLOAD", e.0))?;
        let data = Value::Object(data);
        let persist = rule.persist && self.app.store.is_some();
        if persist && crate::eventlog::has_nul(&data) {
            return Err(Refusal::new(
                "INVALID_PAYLOAD",
                "Text must not contain NUL characters",
            ));
        }
        // Serialized once: the same text goes to the room and to the log.
        let data = crate::engine::raw_json(&data);
        let logged = persist.then(|| data.clone());
        let mut msg = RoomMessage::with_raw(rule.emit.clone(), data);
        msg.attachments = attachments;
        msg.except = Some(socket.id.to_string());
        msg.volatile = rule.volatile;
        let app = &self.app;
        if let Some(data) = &logged {
            // Before the publish: an event the queue cannot take is refused
            // before anyone received it.
            crate::eventlog::admit(app, &joined.session.flow_id, &rule.emit, data)
                .await
                .map_err(|e| {
                    app.metrics.engine_failed(
                        "queue",
                        &e,
                        "",
                        "event refused: the log queue cannot take it",
                    );
                    Refusal::new("UNAVAILABLE", "The event was not stored; try again")
                })?;
        }
        let offset = app
            .engine
            .bus
            .publish(&joined.room, msg)
            .await
            .map_err(|e| {
                app.metrics
                    .engine_failed("publish", &e, "", "publish failed");
                Refusal::new("UNAVAILABLE", "The event could not be delivered; try again")
            })?;
        if let (Some(data), Some(offset)) = (logged, offset) {
            // The ack waits for this: an acknowledged event is durably
            // queued for the event log.
            let queued = QueuedEvent {
                flow_id: joined.session.flow_id.text.clone(),
                offset: offset.to_string(),
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
                Refusal::new("UNAVAILABLE", "The event was not stored; try again")
            })?;
        }
        Ok(())
    }
}
