//! Socket.IO v5 packets (the payload of an Engine.IO `message`).
//!
//! Text form: `<type>[<attachments>-][<namespace>,][<ack id>][<json>]`.
//! A binary packet (`BINARY_EVENT`, `BINARY_ACK`) announces how many binary
//! frames follow; its JSON holds `{"_placeholder":true,"num":N}` where each
//! attachment belongs. flowgate relays attachments as they came, so the
//! placeholders are kept in the JSON and the frames beside it; nothing here
//! re-inserts them.

use bytes::Bytes;
use serde_json::Value;
use thiserror::Error;

/// Largest ack id accepted: the JavaScript client counts acks in a double,
/// so anything above 2^53 - 1 cannot have come from it.
pub const MAX_ACK_ID: u64 = (1 << 53) - 1;

/// Why a frame could not be decoded. Each one closes that connection only,
/// except [`DecodeError::TooDeep`], which the session may answer instead.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A zero-length frame.
    #[error("empty packet")]
    Empty,
    /// The Engine.IO type digit is not 0–6.
    #[error("unknown engine.io packet type {0:?}")]
    UnknownEngineType(char),
    /// The Socket.IO type digit is not 0–6.
    #[error("unknown socket.io packet type {0:?}")]
    UnknownType(char),
    /// A binary packet whose attachment count is missing or not a number.
    #[error("bad attachment count")]
    BadAttachments,
    /// An ack id that is not a number, or too large.
    #[error("bad ack id")]
    BadAckId,
    /// The JSON part does not parse.
    #[error("bad json: {0}")]
    BadJson(String),
    /// The JSON parses but has the wrong shape for the packet type.
    #[error("invalid payload: {0}")]
    InvalidPayload(&'static str),
    /// An event whose JSON nests deeper than the parser goes (128 levels):
    /// well-formed, but refused as a payload rather than as a broken
    /// packet, so its namespace and ack id are kept for the answer.
    #[error("payload nested too deeply")]
    TooDeep {
        /// The namespace it was sent to.
        nsp: String,
        /// Its ack id.
        id: Option<u64>,
    },
}

/// The seven Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    /// `0`: join a namespace (client) / joined (server).
    Connect,
    /// `1`: leave a namespace.
    Disconnect,
    /// `2`: an event: `["name", ...args]`.
    Event,
    /// `3`: the answer to an event that carried an ack id.
    Ack,
    /// `4`: the server refused a CONNECT.
    ConnectError,
    /// `5`: an event with binary attachments.
    BinaryEvent,
    /// `6`: an ack with binary attachments.
    BinaryAck,
}

impl PacketType {
    fn digit(self) -> char {
        match self {
            PacketType::Connect => '0',
            PacketType::Disconnect => '1',
            PacketType::Event => '2',
            PacketType::Ack => '3',
            PacketType::ConnectError => '4',
            PacketType::BinaryEvent => '5',
            PacketType::BinaryAck => '6',
        }
    }

    fn from_digit(c: char) -> Option<Self> {
        Some(match c {
            '0' => PacketType::Connect,
            '1' => PacketType::Disconnect,
            '2' => PacketType::Event,
            '3' => PacketType::Ack,
            '4' => PacketType::ConnectError,
            '5' => PacketType::BinaryEvent,
            '6' => PacketType::BinaryAck,
            _ => return None,
        })
    }

    /// Whether binary frames follow this packet.
    pub fn is_binary(self) -> bool {
        matches!(self, PacketType::BinaryEvent | PacketType::BinaryAck)
    }
}

/// One Socket.IO packet, with its attachments once they have all arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    /// What the packet is.
    pub kind: PacketType,
    /// The namespace, `/` when the frame names none.
    pub nsp: String,
    /// The ack id of an EVENT that wants an answer, or of an ACK.
    pub id: Option<u64>,
    /// The JSON part, if any.
    pub data: Option<Value>,
    /// Binary frames of a BINARY_EVENT / BINARY_ACK, in placeholder order.
    pub attachments: Vec<Bytes>,
}

/// The result of decoding a text frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Nothing more to wait for.
    Complete(Packet),
    /// A binary packet: the next binary frames are its attachments.
    NeedsAttachments(PartialPacket),
}

/// A binary packet still collecting its attachments.
#[derive(Debug, Clone, PartialEq)]
pub struct PartialPacket {
    packet: Packet,
    expected: usize,
}

impl PartialPacket {
    /// How many attachments the header announced.
    pub fn expected(&self) -> usize {
        self.expected
    }

    /// Adds the next binary frame; returns the packet when it is complete.
    pub fn push(&mut self, frame: Bytes) -> Option<Packet> {
        self.packet.attachments.push(frame);
        if self.packet.attachments.len() >= self.expected {
            Some(std::mem::replace(
                &mut self.packet,
                Packet::new(PacketType::Event, "/", None),
            ))
        } else {
            None
        }
    }
}

impl Packet {
    /// A packet with no attachments.
    pub fn new(kind: PacketType, nsp: &str, data: Option<Value>) -> Self {
        Packet {
            kind,
            nsp: nsp.to_owned(),
            id: None,
            data,
            attachments: Vec::new(),
        }
    }

    /// Decodes the text of one Engine.IO `message`.
    pub fn decode(text: &str) -> Result<Decoded, DecodeError> {
        let bytes = text.as_bytes();
        let first = *bytes.first().ok_or(DecodeError::Empty)?;
        let kind = PacketType::from_digit(first as char)
            .ok_or_else(|| DecodeError::UnknownType(text.chars().next().unwrap_or_default()))?;
        let mut i = 1;

        let mut expected = 0usize;
        if kind.is_binary() {
            let dash = text[i..]
                .find('-')
                .map(|d| d + i)
                .ok_or(DecodeError::BadAttachments)?;
            let digits = &text[i..dash];
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(DecodeError::BadAttachments);
            }
            expected = digits.parse().map_err(|_| DecodeError::BadAttachments)?;
            // The reference parser refuses a binary packet with no attachment.
            if expected == 0 {
                return Err(DecodeError::BadAttachments);
            }
            i = dash + 1;
        }

        let mut nsp = "/";
        if bytes.get(i) == Some(&b'/') {
            let end = text[i..].find(',').map(|c| c + i).unwrap_or(text.len());
            nsp = &text[i..end];
            i = (end + 1).min(text.len());
        }

        let digits_end = text[i..]
            .find(|c: char| !c.is_ascii_digit())
            .map(|d| d + i)
            .unwrap_or(text.len());
        let id = if digits_end > i {
            let id: u64 = text[i..digits_end]
                .parse()
                .map_err(|_| DecodeError::BadAckId)?;
            if id > MAX_ACK_ID {
                return Err(DecodeError::BadAckId);
            }
            i = digits_end;
            Some(id)
        } else {
            None
        };

        let rest = &text[i..];
        let data = if rest.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str::<Value>(&crate::surrogates::replace_lone_surrogates(rest))
                    .map_err(|e| {
                        // serde_json names this error only in its text.
                        let text = e.to_string();
                        if kind == PacketType::Event && text.starts_with("recursion limit exceeded")
                        {
                            DecodeError::TooDeep {
                                nsp: nsp.to_owned(),
                                id,
                            }
                        } else {
                            DecodeError::BadJson(text)
                        }
                    })?,
            )
        };

        validate(kind, id, data.as_ref())?;
        let packet = Packet {
            kind,
            nsp: nsp.to_owned(),
            id,
            data,
            attachments: Vec::new(),
        };
        if kind.is_binary() {
            Ok(Decoded::NeedsAttachments(PartialPacket {
                packet,
                expected,
            }))
        } else {
            Ok(Decoded::Complete(packet))
        }
    }

    /// Encodes the packet: the text frame, then its attachments as binary
    /// frames (in [`Packet::attachments`], unchanged).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 + self.nsp.len());
        out.push(self.kind.digit());
        if self.kind.is_binary() {
            out.push_str(&self.attachments.len().to_string());
            out.push('-');
        }
        if self.nsp != "/" {
            out.push_str(&self.nsp);
            out.push(',');
        }
        if let Some(id) = self.id {
            out.push_str(&id.to_string());
        }
        if let Some(data) = &self.data {
            // Writing a `Value` into a String cannot fail.
            out.push_str(&serde_json::to_string(data).unwrap_or_default());
        }
        out
    }

    /// Checks that every `{"_placeholder":true,"num":N}` in the JSON points
    /// at an attachment that exists. The JavaScript client throws while
    /// decoding a packet that breaks this, so relaying one would break every
    /// receiver; it is refused at the sender instead.
    pub fn check_placeholders(&self) -> Result<(), DecodeError> {
        fn walk(v: &Value, count: usize) -> bool {
            match v {
                Value::Array(a) => a.iter().all(|v| walk(v, count)),
                Value::Object(o) => {
                    if o.get("_placeholder") == Some(&Value::Bool(true)) {
                        o.get("num")
                            .and_then(Value::as_u64)
                            .is_some_and(|n| (n as usize) < count)
                    } else {
                        o.values().all(|v| walk(v, count))
                    }
                }
                _ => true,
            }
        }
        let count = if self.kind.is_binary() {
            self.attachments.len()
        } else {
            0
        };
        match &self.data {
            Some(v) if !walk(v, count) => Err(DecodeError::InvalidPayload(
                "placeholder without a matching attachment",
            )),
            _ => Ok(()),
        }
    }

    /// The event name of an EVENT / BINARY_EVENT.
    pub fn event_name(&self) -> Option<&str> {
        match (&self.kind, &self.data) {
            (PacketType::Event | PacketType::BinaryEvent, Some(Value::Array(a))) => {
                a.first().and_then(Value::as_str)
            }
            _ => None,
        }
    }
}

/// The shape rules of the reference parser (`isPayloadValid`), so that what
/// the JavaScript server would refuse is refused here too.
fn validate(kind: PacketType, id: Option<u64>, data: Option<&Value>) -> Result<(), DecodeError> {
    match kind {
        PacketType::Connect => match data {
            None | Some(Value::Object(_)) => Ok(()),
            _ => Err(DecodeError::InvalidPayload(
                "CONNECT payload must be an object",
            )),
        },
        PacketType::Disconnect => match data {
            None => Ok(()),
            _ => Err(DecodeError::InvalidPayload("DISCONNECT takes no payload")),
        },
        PacketType::ConnectError => match data {
            Some(Value::Object(_)) | Some(Value::String(_)) => Ok(()),
            _ => Err(DecodeError::InvalidPayload(
                "CONNECT_ERROR payload must be an object or string",
            )),
        },
        PacketType::Event | PacketType::BinaryEvent => match data {
            Some(Value::Array(a)) if matches!(a.first(), Some(Value::String(_))) => Ok(()),
            _ => Err(DecodeError::InvalidPayload(
                "EVENT payload must be a non-empty array starting with the event name",
            )),
        },
        PacketType::Ack | PacketType::BinaryAck => match (id, data) {
            (Some(_), Some(Value::Array(_))) => Ok(()),
            (None, _) => Err(DecodeError::BadAckId),
            _ => Err(DecodeError::InvalidPayload("ACK payload must be an array")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn complete(text: &str) -> Packet {
        match Packet::decode(text).unwrap() {
            Decoded::Complete(p) => p,
            other => panic!("expected a complete packet, got {other:?}"),
        }
    }

    #[test]
    fn an_event_nested_too_deeply_keeps_its_namespace_and_ack_id() {
        let deep = format!(
            r#"2/flows,7["pod:update",{}{}]"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            Packet::decode(&deep).unwrap_err(),
            DecodeError::TooDeep {
                nsp: "/flows".into(),
                id: Some(7)
            }
        );
        // Broken JSON stays broken JSON; nesting within the limit parses.
        assert!(matches!(
            Packet::decode(r#"2/flows,7["pod:update",[[]"#).unwrap_err(),
            DecodeError::BadJson(_)
        ));
        let ok = format!(r#"2/flows,["e",{}{}]"#, "[".repeat(100), "]".repeat(100));
        complete(&ok);
    }

    #[test]
    fn connect_with_auth() {
        let p = complete(r#"0/flows,{"token":"abc"}"#);
        assert_eq!(p.kind, PacketType::Connect);
        assert_eq!(p.nsp, "/flows");
        assert_eq!(p.data, Some(json!({"token": "abc"})));
        let p = complete("0/flows,");
        assert_eq!(p.nsp, "/flows");
        assert_eq!(p.data, None);
        let p = complete("0");
        assert_eq!(p.nsp, "/");
    }

    #[test]
    fn json_bounds_lone_surrogates_nesting_and_huge_numbers() {
        let p = complete(r#"2/flows,["pod:update",{"n":"hi\ud83d"}]"#);
        assert_eq!(p.data.unwrap()[1]["n"], "hi\u{fffd}");
        let nested = |depth: usize| {
            format!(
                r#"2/flows,["e",{}{}]"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert!(Packet::decode(&nested(120)).is_ok());
        assert!(matches!(
            Packet::decode(&nested(130)),
            Err(DecodeError::TooDeep { .. })
        ));
        assert!(matches!(
            Packet::decode(r#"2/flows,["e",{"x":1e400}]"#),
            Err(DecodeError::BadJson(_))
        ));
    }

    #[test]
    fn event_with_ack_id() {
        let p = complete(r#"2/flows,12["pod:move",{"podId":"a"}]"#);
        assert_eq!(p.id, Some(12));
        assert_eq!(p.event_name(), Some("pod:move"));
        assert_eq!(p.encode(), r#"2/flows,12["pod:move",{"podId":"a"}]"#);
    }

    #[test]
    fn binary_event_collects_attachments() {
        let text =
            r#"52-/flows,["up",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#;
        let Decoded::NeedsAttachments(mut partial) = Packet::decode(text).unwrap() else {
            panic!("expected attachments");
        };
        assert_eq!(partial.expected(), 2);
        assert!(partial.push(Bytes::from_static(b"a")).is_none());
        let p = partial.push(Bytes::from_static(b"bc")).unwrap();
        assert_eq!(p.attachments.len(), 2);
        assert_eq!(p.encode(), text);
    }

    #[test]
    fn placeholders_must_match_attachments() {
        let mut p = complete(r#"2/flows,["a",{"_placeholder":true,"num":0}]"#);
        assert!(p.check_placeholders().is_err());
        p.kind = PacketType::BinaryEvent;
        p.attachments.push(Bytes::from_static(b"x"));
        assert!(p.check_placeholders().is_ok());
        p.data = Some(json!(["a", {"deep": [{"_placeholder": true, "num": 1}]}]));
        assert!(p.check_placeholders().is_err());
    }

    #[test]
    fn refuses_malformed() {
        assert_eq!(Packet::decode(""), Err(DecodeError::Empty));
        assert!(matches!(
            Packet::decode("9"),
            Err(DecodeError::UnknownType('9'))
        ));
        assert!(matches!(
            Packet::decode("2/flows,[oops"),
            Err(DecodeError::BadJson(_))
        ));
        assert!(matches!(
            Packet::decode("2/flows,[]"),
            Err(DecodeError::InvalidPayload(_))
        ));
        assert!(matches!(
            Packet::decode("2/flows,{\"a\":1}"),
            Err(DecodeError::InvalidPayload(_))
        ));
        assert!(matches!(
            Packet::decode("2/flows,[1]"),
            Err(DecodeError::InvalidPayload(_))
        ));
        assert!(matches!(
            Packet::decode("3/flows,[]"),
            Err(DecodeError::BadAckId)
        ));
        assert!(matches!(
            Packet::decode("2/flows,99999999999999999999[\"a\"]"),
            Err(DecodeError::BadAckId)
        ));
        assert!(matches!(
            Packet::decode("5/flows,[\"a\"]"),
            Err(DecodeError::BadAttachments)
        ));
        assert!(matches!(
            Packet::decode("5x-[\"a\"]"),
            Err(DecodeError::BadAttachments)
        ));
        assert!(matches!(
            Packet::decode("1/flows,{}"),
            Err(DecodeError::InvalidPayload(_))
        ));
        assert!(matches!(
            Packet::decode("0/flows,[1]"),
            Err(DecodeError::InvalidPayload(_))
        ));
    }

    fn json_leaf() -> BoxedStrategy<Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            ".*".prop_map(Value::String),
        ]
        .boxed()
    }

    fn json_value() -> BoxedStrategy<Value> {
        json_leaf()
            .prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(".*".prop_map(String::from), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
            .boxed()
    }

    fn nsp() -> BoxedStrategy<String> {
        prop_oneof![
            Just("/".to_owned()),
            "/[a-z0-9_:-]{1,12}".prop_map(String::from)
        ]
        .boxed()
    }

    /// Packets that obey the validity rules, so that decode∘encode is the identity.
    fn packet() -> impl Strategy<Value = Packet> {
        let attachments = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 1..4)
            .prop_map(|v| v.into_iter().map(Bytes::from).collect::<Vec<_>>())
            .boxed();
        let args = (
            ".*".prop_map(String::from),
            prop::collection::vec(json_value(), 0..4),
        )
            .prop_map(|(name, rest)| {
                let mut a = vec![Value::String(name)];
                a.extend(rest);
                Value::Array(a)
            })
            .boxed();
        let object =
            prop::collection::btree_map("[a-z]{1,6}".prop_map(String::from), json_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
                .boxed();
        let ack_args = prop::collection::vec(json_value(), 0..4)
            .prop_map(Value::Array)
            .boxed();
        let id = prop::option::of(0..=MAX_ACK_ID);
        prop_oneof![
            (nsp(), prop::option::of(object.clone())).prop_map(|(n, d)| Packet::new(
                PacketType::Connect,
                &n,
                d
            )),
            nsp().prop_map(|n| Packet::new(PacketType::Disconnect, &n, None)),
            (nsp(), object).prop_map(|(n, d)| Packet::new(PacketType::ConnectError, &n, Some(d))),
            (nsp(), id.clone(), args.clone()).prop_map(|(n, id, d)| Packet {
                id,
                ..Packet::new(PacketType::Event, &n, Some(d))
            }),
            (nsp(), 0..=MAX_ACK_ID, ack_args.clone()).prop_map(|(n, id, d)| Packet {
                id: Some(id),
                ..Packet::new(PacketType::Ack, &n, Some(d))
            }),
            (nsp(), id, args, attachments.clone()).prop_map(|(n, id, d, att)| Packet {
                id,
                attachments: att,
                ..Packet::new(PacketType::BinaryEvent, &n, Some(d))
            }),
            (nsp(), 0..=MAX_ACK_ID, ack_args, attachments).prop_map(|(n, id, d, att)| Packet {
                id: Some(id),
                attachments: att,
                ..Packet::new(PacketType::BinaryAck, &n, Some(d))
            }),
        ]
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(p in packet()) {
            let text = p.encode();
            let decoded = match Packet::decode(&text).unwrap() {
                Decoded::Complete(done) => done,
                Decoded::NeedsAttachments(mut partial) => {
                    let mut out = None;
                    for a in &p.attachments {
                        out = partial.push(a.clone());
                    }
                    out.expect("all attachments pushed")
                }
            };
            prop_assert_eq!(decoded, p);
        }

        #[test]
        fn decode_never_panics(s in "\\PC*") {
            let _ = Packet::decode(&s);
        }

        #[test]
        fn decode_never_panics_on_packet_like_input(
            kind in "[0-6]", att in "[0-9-]{0,3}", n in "(/[a-z]{0,4},?)?", id in "[0-9]{0,20}", rest in ".{0,12}"
        ) {
            let _ = Packet::decode(&format!("{kind}{att}{n}{id}{rest}"));
        }
    }
}
