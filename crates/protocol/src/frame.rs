//! Encoding of the frames the server sends most: a Socket.IO EVENT inside an
//! Engine.IO `message`, with its single argument already JSON text.
//!
//! This is the fan-out path: the argument was serialized once by whoever
//! produced the event and is copied into the frame as is, never parsed
//! again. An optional room offset is appended as the last argument, which is
//! how Socket.IO's connection state recovery tells the client where it is in
//! the room (the stock client keeps a trailing string argument as
//! `_lastOffset`).

/// Appends a JSON string literal for `s` to `out`.
fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// The text frame `4` + `2/nsp,["event",<data>(,"offset")]`, or
/// `45N-/nsp,[…]` when `attachments` binary frames follow it.
pub fn event_frame(
    nsp: &str,
    event: &str,
    data_json: &str,
    attachments: usize,
    offset: Option<&str>,
) -> String {
    let mut text = event_frame_head(
        nsp,
        event,
        data_json,
        attachments,
        offset.map_or(0, str::len),
    );
    finish_frame(&mut text, offset);
    text
}

/// The frame of [`event_frame`] up to its data argument: what a publisher
/// builds once, before the room log gives the event its offset. `spare` is
/// extra capacity to reserve for the rest.
pub fn event_frame_head(
    nsp: &str,
    event: &str,
    data_json: &str,
    attachments: usize,
    spare: usize,
) -> String {
    let mut text = String::with_capacity(24 + nsp.len() + event.len() + data_json.len() + spare);
    if attachments == 0 {
        text.push_str("42");
    } else {
        text.push_str("45");
        text.push_str(&attachments.to_string());
        text.push('-');
    }
    if nsp != "/" {
        text.push_str(nsp);
        text.push(',');
    }
    text.push('[');
    push_json_str(&mut text, event);
    text.push(',');
    text.push_str(data_json);
    text
}

/// Completes a frame head: the offset as the trailing argument (when
/// there is one), then the closing bracket.
pub fn finish_frame(head: &mut String, offset: Option<&str>) {
    if let Some(offset) = offset {
        head.push(',');
        push_json_str(head, offset);
    }
    head.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Decoded, EnginePacket, Packet, PacketType};
    use proptest::prelude::*;

    #[test]
    fn plain_binary_and_offset() {
        assert_eq!(
            event_frame("/flows", "pod:moved", r#"{"x":1}"#, 0, None),
            r#"42/flows,["pod:moved",{"x":1}]"#
        );
        assert_eq!(
            event_frame("/flows", "a", "1", 2, None),
            r#"452-/flows,["a",1]"#
        );
        assert_eq!(
            event_frame("/flows", "a", "{}", 0, Some("17-0")),
            r#"42/flows,["a",{},"17-0"]"#
        );
        assert_eq!(event_frame("/", "a", "null", 0, None), r#"42["a",null]"#);
    }

    proptest! {
        /// Whatever the name, data and offset, the frame decodes back to
        /// them with the stock packet decoder.
        #[test]
        fn decodes_back(event in ".{1,20}", n in any::<i64>(), offset in proptest::option::of("[0-9]{1,13}-[0-9]{1,3}")) {
            let frame = event_frame("/flows", &event, &n.to_string(), 0, offset.as_deref());
            let EnginePacket::Message(m) = EnginePacket::decode(&frame).unwrap() else {
                panic!("not a message")
            };
            let Decoded::Complete(p) = Packet::decode(m).unwrap() else { panic!("binary") };
            prop_assert_eq!(p.kind, PacketType::Event);
            prop_assert_eq!(p.nsp.as_str(), "/flows");
            let args = p.data.unwrap();
            let args = args.as_array().unwrap();
            prop_assert_eq!(args[0].as_str().unwrap(), event.as_str());
            prop_assert_eq!(args[1].as_i64().unwrap(), n);
            prop_assert_eq!(args.get(2).and_then(|v| v.as_str()), offset.as_deref());
        }
    }
}
