//! What a session sends its own client: Socket.IO packets, events, acks,
//! and the `error` event plus failed ack of a refused event.

use flowgate_protocol::{event_frame, EnginePacket, Packet, PacketType};
use serde_json::{json, Value};
use tracing::debug;

use super::Session;
use crate::outbound::OutFrame;
use crate::rooms::NSP;

/// At most this many characters of client input go back into an error
/// message or a log line.
const ECHO_CHARS: usize = 32;

/// The first characters of client input, for messages and logs.
pub(crate) fn prefix(s: &str) -> &str {
    match s.char_indices().nth(ECHO_CHARS) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A refused client event: the `error` event and failed ack it produces.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl Session {
    /// Queues one Socket.IO packet for this client.
    pub(crate) fn send_packet(&mut self, p: &Packet) {
        let text = EnginePacket::Message(&p.encode()).encode();
        self.push_local(OutFrame::Text(text.into()));
    }

    /// Queues an event for this client only.
    pub(crate) fn emit(&mut self, event: &str, data: &Value) {
        let metrics = &self.app.metrics;
        metrics
            .events_out
            .with_label_values(&[metrics.event_label(event)])
            .inc();
        // Writing a `Value` into a String cannot fail.
        let json = serde_json::to_string(data).unwrap_or_default();
        let text = event_frame(NSP, event, &json, 0, None);
        self.push_local(OutFrame::Text(text.into()));
    }

    fn ack(&mut self, id: u64, data: Value) {
        let p = Packet {
            id: Some(id),
            ..Packet::new(PacketType::Ack, NSP, Some(Value::Array(vec![data])))
        };
        self.send_packet(&p);
    }

    /// Acks an event (when the client asked) and, for a refusal, emits
    /// `error` and counts it.
    pub(crate) fn answer(&mut self, event: &str, ack: Option<u64>, result: Result<(), Refusal>) {
        match result {
            Ok(()) => {
                if let Some(id) = ack {
                    self.ack(id, json!({"ok": true}));
                }
            }
            Err(r) => {
                self.app.metrics.refusals.with_label_values(&[r.code]).inc();
                debug!(event = ?prefix(event), code = r.code, message = ?r.message, "event refused");
                self.emit("error", &json!({"message": &r.message, "code": r.code}));
                if let Some(id) = ack {
                    self.ack(
                        id,
                        json!({"ok": false, "code": r.code, "message": r.message}),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_cuts_on_characters() {
        assert_eq!(prefix("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(prefix(&long).chars().count(), ECHO_CHARS);
    }
}
