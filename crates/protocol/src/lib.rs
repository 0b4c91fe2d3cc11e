//! The wire formats flowgate speaks, with no I/O: Engine.IO v4 (the transport
//! framing: open, ping/pong, message, close) and Socket.IO v5 (namespaces,
//! events, acks, binary attachments) on top of it.
//!
//! Everything here is pure: bytes in, packets out; packets in, bytes out. The
//! gateway owns sockets, timers and state. Decoding never panics on any
//! input; every failure is a [`DecodeError`] the caller turns into a clean
//! close of that one connection.
//!
//! Why hand-written: the only maintained Rust Socket.IO codec lives inside
//! socketioxide's server crate and cannot be used without its server; the
//! formats are small and fully specified, so a focused codec that borrows
//! from the frame and is fuzzed on its own is the smaller dependency.

pub mod engineio;
pub mod frame;
pub mod polling;
pub mod socketio;
mod surrogates;

pub use engineio::{EnginePacket, OpenPacket};
pub use frame::{event_frame, event_frame_head, finish_frame};
pub use polling::{decode_payload, encode_payload, OutPacket, PayloadError, PayloadPacket};
pub use socketio::{DecodeError, Decoded, Packet, PacketType, PartialPacket};
