//! Fuzzes the decoders with arbitrary frames: Engine.IO text packets,
//! polling payloads, Socket.IO packets, binary attachments and placeholder
//! checks. Any panic
//! is a bug (the gateway turns every decode error into a clean close).
//! Run with: `cd crates/protocol/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode`
#![no_main]

use flowgate_protocol::{Decoded, EnginePacket, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(EnginePacket::Message(m)) = EnginePacket::decode(text) {
        match Packet::decode(m) {
            Ok(Decoded::Complete(p)) => {
                let _ = p.check_placeholders();
                let again = Packet::decode(&p.encode());
                assert!(again.is_ok(), "re-encoding a decoded packet must decode");
            }
            Ok(Decoded::NeedsAttachments(mut partial)) => {
                // The count is the client's claim: the gateway refuses more
                // than FLOWGATE_MAX_ATTACHMENTS before collecting any, so the
                // harness collects at most a few.
                for _ in 0..partial.expected().min(16) {
                    if let Some(p) = partial.push(bytes::Bytes::from_static(b"x")) {
                        let _ = p.check_placeholders();
                    }
                }
            }
            Err(_) => {}
        }
    }
    let _ = Packet::decode(text);
    // A polling POST body: every text packet it holds is a frame too.
    if let Ok(packets) = flowgate_protocol::decode_payload(text) {
        for p in packets {
            if let flowgate_protocol::PayloadPacket::Text(t) = p {
                let _ = EnginePacket::decode(t);
            }
        }
    }
});
