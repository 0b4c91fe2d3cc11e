//! Fuzzes the decoders with arbitrary frames: Engine.IO text packets,
//! Socket.IO packets, binary attachments and placeholder checks. Any panic
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
                for _ in 0..partial.expected() {
                    if let Some(p) = partial.push(bytes::Bytes::from_static(b"x")) {
                        let _ = p.check_placeholders();
                    }
                }
            }
            Err(_) => {}
        }
    }
    let _ = Packet::decode(text);
});
