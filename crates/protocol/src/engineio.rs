//! Engine.IO v4 packets as they travel over the WebSocket transport.
//!
//! Over WebSocket every text frame is one packet: a single type digit
//! followed by its payload. A binary frame is always a `message` whose bytes
//! are the payload, so it needs no decoding here.

use serde::{Deserialize, Serialize};

use crate::socketio::DecodeError;

/// One Engine.IO text packet, borrowing its payload from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// `0` + handshake JSON; only the server sends it.
    Open(&'a str),
    /// `1`: the peer is closing the transport.
    Close,
    /// `2` + optional probe payload.
    Ping(&'a str),
    /// `3` + the payload echoed from the ping.
    Pong(&'a str),
    /// `4` + the Socket.IO packet it carries.
    Message(&'a str),
    /// `5`: transport upgrade (never valid on a WebSocket-only server).
    Upgrade,
    /// `6`: no-op, used by the polling transport.
    Noop,
}

impl<'a> EnginePacket<'a> {
    /// Decodes one text frame.
    pub fn decode(frame: &'a str) -> Result<Self, DecodeError> {
        let mut chars = frame.char_indices();
        let (_, kind) = chars.next().ok_or(DecodeError::Empty)?;
        let rest = &frame[kind.len_utf8()..];
        Ok(match kind {
            '0' => EnginePacket::Open(rest),
            '1' => EnginePacket::Close,
            '2' => EnginePacket::Ping(rest),
            '3' => EnginePacket::Pong(rest),
            '4' => EnginePacket::Message(rest),
            '5' => EnginePacket::Upgrade,
            '6' => EnginePacket::Noop,
            other => return Err(DecodeError::UnknownEngineType(other)),
        })
    }

    /// Encodes the packet as the text of one WebSocket frame.
    pub fn encode(&self) -> String {
        let (digit, payload) = match self {
            EnginePacket::Open(p) => ('0', *p),
            EnginePacket::Close => ('1', ""),
            EnginePacket::Ping(p) => ('2', *p),
            EnginePacket::Pong(p) => ('3', *p),
            EnginePacket::Message(p) => ('4', *p),
            EnginePacket::Upgrade => ('5', ""),
            EnginePacket::Noop => ('6', ""),
        };
        let mut out = String::with_capacity(1 + payload.len());
        out.push(digit);
        out.push_str(payload);
        out
    }
}

/// The handshake the server sends as the first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenPacket {
    /// The Engine.IO session id.
    pub sid: String,
    /// Transports the client may upgrade to; empty on WebSocket.
    pub upgrades: Vec<String>,
    /// Milliseconds between server pings.
    pub ping_interval: u64,
    /// Milliseconds the server waits for a pong.
    pub ping_timeout: u64,
    /// Largest frame the server accepts, in bytes.
    pub max_payload: u64,
}

impl OpenPacket {
    /// The full `0{…}` frame.
    pub fn encode(&self) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        EnginePacket::Open(&json).encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_each_type() {
        assert_eq!(EnginePacket::decode("2").unwrap(), EnginePacket::Ping(""));
        assert_eq!(
            EnginePacket::decode("3probe").unwrap(),
            EnginePacket::Pong("probe")
        );
        assert_eq!(
            EnginePacket::decode("42[\"a\"]").unwrap(),
            EnginePacket::Message("2[\"a\"]")
        );
        assert_eq!(EnginePacket::decode("1").unwrap(), EnginePacket::Close);
        assert!(matches!(
            EnginePacket::decode("9x"),
            Err(DecodeError::UnknownEngineType('9'))
        ));
        assert!(matches!(EnginePacket::decode(""), Err(DecodeError::Empty)));
    }

    #[test]
    fn open_packet_uses_camel_case() {
        let open = OpenPacket {
            sid: "abc".into(),
            upgrades: vec![],
            ping_interval: 25000,
            ping_timeout: 20000,
            max_payload: 1_000_000,
        };
        assert_eq!(
            open.encode(),
            r#"0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#
        );
    }

    fn packet_strategy() -> impl Strategy<Value = (u8, String)> {
        (0u8..7, ".*")
    }

    proptest! {
        #[test]
        fn round_trips((kind, payload) in packet_strategy()) {
            let p = match kind {
                0 => EnginePacket::Open(&payload),
                1 => EnginePacket::Close,
                2 => EnginePacket::Ping(&payload),
                3 => EnginePacket::Pong(&payload),
                4 => EnginePacket::Message(&payload),
                5 => EnginePacket::Upgrade,
                _ => EnginePacket::Noop,
            };
            let text = p.encode();
            prop_assert_eq!(EnginePacket::decode(&text).unwrap(), p);
        }

        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = EnginePacket::decode(&s);
        }
    }
}
