//! The room bus's wire format: how a [`RoomMessage`] travels between nodes
//! (the live channel) and sits in a room's log (the stream).
//!
//! **Version 1** is binary and carries the event's Socket.IO frame, built
//! once by the publisher, so that receiving nodes parse no JSON: they check
//! a small header and slice the frame out of the message. All integers are
//! big-endian:
//!
//! ```text
//! "FG" 0x01                     magic and version
//! flags: u8                     1 volatile, 2 control, 4 except present
//! published_at_us: u64
//! [except: u8 length, bytes]    if flag 4
//! event: u16 length, bytes      the event name (metrics label)
//! attachments: u16 count, then per attachment u32 length, bytes
//! body: u32 length, bytes       the frame up to its data argument (a
//!                               volatile event's whole frame; a control
//!                               message's JSON)
//! suffix                        the rest: `,"<offset>"]`, appended by the
//!                               publish script on the live channel only
//! ```
//!
//! The offset is known only inside Redis (it is the stream id), so the
//! publish script appends it; a node then delivers `body + suffix`, one
//! contiguous slice of what it received. A message read back from the log
//! has no suffix and is completed with its entry id.
//!
//! **Version 0** is the JSON of the first releases (`"<offset> <json>"` on
//! the channel, the JSON alone in the log). It is still understood, so a
//! rolling upgrade from it loses nothing once every node reads both; nodes
//! publish it while `FLOWGATE_BUS_FORMAT=json` (the first step of such an
//! upgrade). Any other version is refused, never guessed at.
//!
//! Hand-written rather than a serialization crate: the layout must put the
//! frame last and contiguous with the suffix Lua appends, which no generic
//! format guarantees.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::{Body, Control, Offset, RoomMessage};

const MAGIC: [u8; 2] = *b"FG";
/// The version this build writes.
pub const VERSION: u8 = 1;

const VOLATILE: u8 = 1;
const CONTROL: u8 = 2;
const EXCEPT: u8 = 4;

/// A bus message this node cannot read: skipped and counted, never
/// delivered half-understood.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// A later (or unknown) format.
    #[error("room message of unknown format version {0}")]
    Version(u8),
    /// Truncated or inconsistent.
    #[error("malformed room message: {0}")]
    Malformed(&'static str),
}

/// Encodes `msg` as version 1.
pub fn encode(msg: &RoomMessage) -> Result<Bytes, WireError> {
    let mut body = if let Some(c) = &msg.control {
        Bytes::from(serde_json::to_vec(c).map_err(|_| WireError::Malformed("control"))?)
    } else {
        msg.frame_head()
    };
    if msg.volatile && msg.control.is_none() {
        // Never in the log and never given an offset: sent whole.
        let mut whole = BytesMut::with_capacity(body.len() + 1);
        whole.put_slice(&body);
        whole.put_u8(b']');
        body = whole.freeze();
    }
    let except = msg.except.as_deref().unwrap_or("");
    let attached: usize = msg.attachments.iter().map(|a| a.len() + 4).sum();
    let mut out =
        BytesMut::with_capacity(32 + except.len() + msg.event.len() + attached + body.len() + 24);
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    let mut flags = 0;
    if msg.volatile {
        flags |= VOLATILE;
    }
    if msg.control.is_some() {
        flags |= CONTROL;
    }
    if msg.except.is_some() {
        flags |= EXCEPT;
    }
    out.put_u8(flags);
    out.put_u64(msg.published_at_us);
    if msg.except.is_some() {
        let len = u8::try_from(except.len()).map_err(|_| WireError::Malformed("except"))?;
        out.put_u8(len);
        out.put_slice(except.as_bytes());
    }
    let len = u16::try_from(msg.event.len()).map_err(|_| WireError::Malformed("event"))?;
    out.put_u16(len);
    out.put_slice(msg.event.as_bytes());
    let n =
        u16::try_from(msg.attachments.len()).map_err(|_| WireError::Malformed("attachments"))?;
    out.put_u16(n);
    for a in &msg.attachments {
        let len = u32::try_from(a.len()).map_err(|_| WireError::Malformed("attachment"))?;
        out.put_u32(len);
        out.put_slice(a);
    }
    let len = u32::try_from(body.len()).map_err(|_| WireError::Malformed("body"))?;
    out.put_u32(len);
    out.put_slice(&body);
    Ok(out.freeze())
}

/// A message from the live channel, with its offset (none for volatile
/// events).
pub fn decode_live(msg: Bytes) -> Result<(Option<Offset>, RoomMessage), WireError> {
    if msg.first().is_some_and(u8::is_ascii_digit) {
        return legacy_live(&msg);
    }
    let (m, suffix) = decode(&msg)?;
    let Some(suffix) = suffix else {
        return Ok((None, m));
    };
    let (offset, whole) = suffix;
    let mut m = m;
    if let Body::Framed { whole: w, .. } = &mut m.body {
        *w = Some(whole);
    }
    Ok((Some(offset), m))
}

/// A message read back from a room's log.
pub fn decode_logged(entry: Bytes) -> Result<RoomMessage, WireError> {
    if entry.first() == Some(&b'{') {
        return legacy(&entry);
    }
    let (m, suffix) = decode(&entry)?;
    if suffix.is_some() {
        return Err(WireError::Malformed("logged message with an offset"));
    }
    Ok(m)
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(WireError::Malformed("truncated"))?;
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }
    fn uint(&mut self, n: usize) -> Result<u64, WireError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    fn text(&mut self, n: usize) -> Result<String, WireError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Malformed("not UTF-8"))
    }
}

/// The message, and — when Redis appended one — its offset and the whole
/// frame (`body + suffix`).
#[allow(clippy::type_complexity)]
fn decode(buf: &Bytes) -> Result<(RoomMessage, Option<(Offset, Bytes)>), WireError> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(2)?[..] != MAGIC {
        return Err(WireError::Malformed("no magic"));
    }
    let version = r.uint(1)? as u8;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let flags = r.uint(1)? as u8;
    let published_at_us = r.uint(8)?;
    let except = if flags & EXCEPT != 0 {
        let n = r.uint(1)? as usize;
        Some(r.text(n)?)
    } else {
        None
    };
    let n = r.uint(2)? as usize;
    let event = r.text(n)?;
    let count = r.uint(2)? as usize;
    let mut attachments = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = r.uint(4)? as usize;
        attachments.push(r.take(n)?);
    }
    let body_len = r.uint(4)? as usize;
    let body_start = r.pos;
    let body = r.take(body_len)?;
    let suffix = buf.slice(r.pos..);
    let volatile = flags & VOLATILE != 0;
    let control = if flags & CONTROL != 0 {
        Some(
            serde_json::from_slice::<Control>(&body)
                .map_err(|_| WireError::Malformed("control"))?,
        )
    } else {
        None
    };
    // The frame goes to clients as a text frame: checked once, here.
    let whole = buf.slice(body_start..);
    if control.is_none() && std::str::from_utf8(&whole).is_err() {
        return Err(WireError::Malformed("frame not UTF-8"));
    }
    let appended = if suffix.is_empty() {
        None
    } else {
        // `,"<offset>"]`
        let s = std::str::from_utf8(&suffix).map_err(|_| WireError::Malformed("suffix"))?;
        let offset = s
            .strip_prefix(",\"")
            .and_then(|s| s.strip_suffix("\"]"))
            .and_then(|o| o.parse::<Offset>().ok())
            .ok_or(WireError::Malformed("suffix"))?;
        Some((offset, whole))
    };
    if volatile && appended.is_some() {
        return Err(WireError::Malformed("volatile message with an offset"));
    }
    let body = if control.is_some() {
        Body::Json(null())
    } else if volatile {
        Body::Framed {
            head: body.slice(..body.len().saturating_sub(1)),
            whole: Some(body),
        }
    } else {
        Body::Framed {
            head: body,
            whole: None,
        }
    };
    Ok((
        RoomMessage {
            event,
            body,
            attachments,
            except,
            volatile,
            published_at_us,
            control,
        },
        appended,
    ))
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("`null` is JSON")
}

/// Version 0: the JSON of the first releases.
#[derive(Serialize, Deserialize)]
struct Legacy {
    event: String,
    data: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    attachments: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    except: Option<String>,
    #[serde(default)]
    volatile: bool,
    published_at_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<Control>,
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Encodes `msg` as version 0 (JSON; attachments in base64), for a
/// cluster that still has nodes of the first releases.
pub fn encode_legacy(msg: &RoomMessage) -> Result<String, WireError> {
    let data = match &msg.body {
        Body::Json(d) => d.clone(),
        Body::Framed { .. } => return Err(WireError::Malformed("framed message re-encoded")),
    };
    serde_json::to_string(&Legacy {
        event: msg.event.clone(),
        data,
        attachments: msg.attachments.iter().map(|a| B64.encode(a)).collect(),
        except: msg.except.clone(),
        volatile: msg.volatile,
        published_at_us: msg.published_at_us,
        control: msg.control.clone(),
    })
    .map_err(|_| WireError::Malformed("legacy encode"))
}

fn legacy(json: &[u8]) -> Result<RoomMessage, WireError> {
    let l: Legacy =
        serde_json::from_slice(json).map_err(|_| WireError::Malformed("legacy JSON"))?;
    let attachments = l
        .attachments
        .iter()
        .map(|a| B64.decode(a).map(Bytes::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| WireError::Malformed("legacy attachment"))?;
    Ok(RoomMessage {
        event: l.event,
        body: Body::Json(l.data),
        attachments,
        except: l.except,
        volatile: l.volatile,
        published_at_us: l.published_at_us,
        control: l.control,
    })
}

fn legacy_live(msg: &[u8]) -> Result<(Option<Offset>, RoomMessage), WireError> {
    let space = msg
        .iter()
        .position(|b| *b == b' ')
        .ok_or(WireError::Malformed("legacy message without offset"))?;
    let offset = std::str::from_utf8(&msg[..space])
        .ok()
        .and_then(|o| o.parse::<Offset>().ok());
    Ok((offset, legacy(&msg[space + 1..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the publish script does: the log keeps the message, the
    /// channel gets it with `,"<id>"]` appended.
    fn as_published(wire: &Bytes, id: &str) -> Bytes {
        let mut b = wire.to_vec();
        b.extend_from_slice(format!(",\"{id}\"]").as_bytes());
        Bytes::from(b)
    }

    #[test]
    fn live_message_is_the_frame_with_its_offset() {
        let mut m = RoomMessage::new("pod:moved", serde_json::json!({"x": 1}));
        m.except = Some("sock".into());
        let wire = encode(&m).unwrap();
        let (offset, back) = decode_live(as_published(&wire, "17-2")).unwrap();
        assert_eq!(offset, Some(Offset { ms: 17, seq: 2 }));
        assert_eq!(
            &back.frame(offset)[..],
            br#"42/flows,["pod:moved",{"x":1},"17-2"]"#
        );
        assert_eq!(back.except.as_deref(), Some("sock"));
        assert_eq!(back.event, "pod:moved");
        assert_eq!(back.published_at_us, m.published_at_us);
        // Read back from the log: completed with the entry id.
        let logged = decode_logged(wire).unwrap();
        assert_eq!(
            logged.frame(Some(Offset { ms: 17, seq: 2 })),
            back.frame(offset)
        );
    }

    #[test]
    fn volatile_binary_and_control_messages() {
        let mut v = RoomMessage::new("cursor:moved", serde_json::json!({"x": 2}));
        v.volatile = true;
        let (o, back) = decode_live(encode(&v).unwrap()).unwrap();
        assert_eq!(o, None);
        assert!(back.volatile);
        assert_eq!(
            &back.frame(None)[..],
            br#"42/flows,["cursor:moved",{"x":2}]"#
        );

        let mut b = RoomMessage::new(
            "pod:updated",
            serde_json::json!({"_placeholder": true, "num": 0}),
        );
        b.attachments = vec![Bytes::from_static(b"\x00\xffbin")];
        let (_, back) = decode_live(as_published(&encode(&b).unwrap(), "1-0")).unwrap();
        assert_eq!(back.attachments, b.attachments);
        assert!(back.frame(None).starts_with(b"451-/flows,"));

        let c = RoomMessage::control(Control::RemoveUser {
            user_id: "u".into(),
        });
        let (o, back) = decode_live(as_published(&encode(&c).unwrap(), "2-0")).unwrap();
        assert_eq!(o, Some(Offset { ms: 2, seq: 0 }));
        assert_eq!(back.control, c.control);
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let m = RoomMessage::new("a", serde_json::json!(1));
        let mut v2 = encode(&m).unwrap().to_vec();
        v2[2] = 2;
        assert_eq!(
            decode_live(Bytes::from(v2)).unwrap_err(),
            WireError::Version(2)
        );
        assert!(decode_live(Bytes::from_static(b"FG")).is_err());
        assert!(decode_logged(Bytes::from_static(b"\x00\x01")).is_err());
        let wire = encode(&m).unwrap();
        let mut bad = wire.to_vec();
        bad.extend_from_slice(b",\"x\"]");
        assert!(
            decode_live(Bytes::from(bad)).is_err(),
            "a suffix that is no offset"
        );
        assert!(decode_logged(as_published(&wire, "1-0")).is_err());
    }

    #[test]
    fn the_first_releases_json_is_understood() {
        let mut m = RoomMessage::new("pod:updated", serde_json::json!({"a": 1}));
        m.attachments = vec![Bytes::from_static(b"\x00\xffbin")];
        m.except = Some("s".into());
        let text = encode_legacy(&m).unwrap();
        assert!(text.contains("\"AP9iaW4=\""), "{text}");
        let back = decode_logged(Bytes::from(text.clone())).unwrap();
        assert_eq!(back.data_json(), Some(r#"{"a":1}"#));
        assert_eq!(back.attachments, m.attachments);
        let (o, live) = decode_live(Bytes::from(format!("5-1 {text}"))).unwrap();
        assert_eq!(o, Some(Offset { ms: 5, seq: 1 }));
        assert_eq!(live.frame(o), m.frame(o));
    }

    proptest! {
        /// Whatever the message, what a node delivers is exactly the frame
        /// the publisher would have built with that offset; and no prefix
        /// of a message decodes (truncation is always caught).
        #[test]
        fn round_trip(event in "[a-z:]{1,12}", n in any::<i64>(), except in proptest::option::of("[a-zA-Z0-9_-]{1,20}"),
                      volatile in any::<bool>(), ms in 0u64..1u64 << 45, seq in 0u64..1000,
                      atts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..3)) {
            let mut m = RoomMessage::new(event, serde_json::json!({"n": n}));
            m.except = except;
            m.volatile = volatile;
            m.attachments = atts.into_iter().map(Bytes::from).collect();
            let wire = encode(&m).unwrap();
            let o = (!volatile).then_some(Offset { ms, seq });
            let live = match o {
                Some(o) => as_published(&wire, &o.to_string()),
                None => wire.clone(),
            };
            let (got, back) = decode_live(live).unwrap();
            prop_assert_eq!(got, o);
            prop_assert_eq!(back.frame(o), m.frame(o));
            prop_assert_eq!(&back.attachments, &m.attachments);
            prop_assert_eq!(&back.except, &m.except);
            for cut in 0..wire.len() {
                prop_assert!(decode_logged(wire.slice(..cut)).is_err());
            }
        }
    }
}
