//! A room's message as the bus carries it: the event, its argument (JSON
//! text, or the frame a publisher built), who must not get it, and the
//! frame every member is sent.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::Offset;

/// The Socket.IO namespace of flow rooms: every room event is framed for it.
pub const NSP: &str = "/flows";

/// One message on a room's bus: an event for the room's members.
#[derive(Debug, Clone)]
pub struct RoomMessage {
    /// The event name members receive.
    pub event: String,
    /// Its argument: JSON text as the publisher built it, or the frame a
    /// publisher built once and the bus carried ([`wire`]).
    pub(crate) body: Body,
    /// Binary attachments referenced by placeholders in the argument.
    pub attachments: Vec<Bytes>,
    /// The sender's socket id: everyone but the sender receives it.
    pub except: Option<String>,
    /// Dropped for a full queue rather than queued; never replayed.
    pub volatile: bool,
    /// Publish time (µs since the epoch), for the fan-out latency histogram.
    pub published_at_us: u64,
    /// An instruction to the nodes instead of an event for clients.
    pub control: Option<Control>,
}

/// A room message's argument, in the form it was last in.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// JSON text (serialized once by the publisher).
    Json(Box<RawValue>),
    /// The event's Socket.IO frame up to its data argument (`head`), and,
    /// when the bus already completed it with the offset and closing
    /// bracket, the whole frame (`whole`, a slice of the bus message).
    Framed { head: Bytes, whole: Option<Bytes> },
}

/// Instructions carried by the room bus to every node with members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Control {
    /// The user lost access: remove their sockets from the room.
    RemoveUser {
        /// Whose sockets.
        user_id: String,
    },
}

impl RoomMessage {
    /// A message stamped with the current time.
    pub fn new(event: impl Into<String>, data: Value) -> Self {
        Self::with_raw(event, raw_json(&data))
    }

    /// A message whose argument is already JSON text.
    pub fn with_raw(event: impl Into<String>, data: Box<RawValue>) -> Self {
        RoomMessage {
            event: event.into(),
            body: Body::Json(data),
            attachments: Vec::new(),
            except: None,
            volatile: false,
            published_at_us: now_us(),
            control: None,
        }
    }

    /// A control message for every node with members of the room.
    pub fn control(control: Control) -> Self {
        RoomMessage {
            control: Some(control),
            ..RoomMessage::new("", Value::Null)
        }
    }

    /// The event's Socket.IO frame up to its data argument.
    pub fn frame_head(&self) -> Bytes {
        match &self.body {
            Body::Json(data) => Bytes::from(flowgate_protocol::event_frame_head(
                NSP,
                &self.event,
                data.get(),
                self.attachments.len(),
                24,
            )),
            Body::Framed { head, .. } => head.clone(),
        }
    }

    /// The event's whole text frame, with `offset` as its trailing
    /// argument: the slice the bus delivered when it has one for that
    /// offset, built otherwise.
    pub fn frame(&self, offset: Option<Offset>) -> Bytes {
        if let Body::Framed {
            whole: Some(whole), ..
        } = &self.body
        {
            return whole.clone();
        }
        let offset = offset.map(|o| o.to_string());
        let mut text = match &self.body {
            Body::Json(data) => flowgate_protocol::event_frame_head(
                NSP,
                &self.event,
                data.get(),
                self.attachments.len(),
                24,
            ),
            Body::Framed { head, .. } => {
                let mut t = String::with_capacity(head.len() + 24);
                // Heads are built from `&str` and checked when decoded.
                t.push_str(std::str::from_utf8(head).unwrap_or_default());
                t
            }
        };
        flowgate_protocol::finish_frame(&mut text, offset.as_deref());
        Bytes::from(text)
    }

    /// The argument as JSON text, when the message still holds it (not
    /// after the bus carried it as a frame).
    pub fn data_json(&self) -> Option<&str> {
        match &self.body {
            Body::Json(d) => Some(d.get()),
            Body::Framed { .. } => None,
        }
    }
}

/// A value as JSON text, serialized once.
pub fn raw_json(v: &Value) -> Box<RawValue> {
    // Serializing a `Value` cannot fail; `null` is a valid fallback anyway.
    serde_json::value::to_raw_value(v)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("`null` is JSON"))
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_the_offset_and_attachments() {
        let m = RoomMessage::new("pod:moved", serde_json::json!({"x": 1}));
        let f = m.frame(Some(Offset { ms: 5, seq: 1 }));
        assert_eq!(&f[..], br#"42/flows,["pod:moved",{"x":1},"5-1"]"#);
        assert_eq!(&m.frame(None)[..], br#"42/flows,["pod:moved",{"x":1}]"#);
        let mut m = RoomMessage::new(
            "pod:moved",
            serde_json::json!({"_placeholder": true, "num": 0}),
        );
        m.attachments = vec![Bytes::from_static(b"x")];
        assert!(m.frame(None).starts_with(b"451-/flows,"));
    }
}
