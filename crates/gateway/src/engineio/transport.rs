//! What the connection task needs of a transport: frames in, frames out.

use std::future::Future;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::End;

/// One inbound frame.
#[derive(Debug)]
pub enum Incoming {
    /// One Engine.IO text packet.
    Text(Utf8Bytes),
    /// One binary `message` (an attachment of a binary Socket.IO packet).
    Binary(Bytes),
}

/// A carrier of Engine.IO packets. `recv` must be cancel-safe: the
/// connection task polls it in a `select!` with its queue and timers.
pub trait Transport: Send {
    /// The next frame; `None` when the client closed the transport.
    fn recv(&mut self) -> impl Future<Output = Option<Result<Incoming, End>>> + Send;
    /// Buffers a text packet (written by `flush`).
    fn feed_text(&mut self, text: Utf8Bytes) -> impl Future<Output = Result<(), End>> + Send;
    /// Buffers a binary packet.
    fn feed_binary(&mut self, data: Bytes) -> impl Future<Output = Result<(), End>> + Send;
    /// Writes what was buffered.
    fn flush(&mut self) -> impl Future<Output = Result<(), End>> + Send;
    /// Closes the transport, with a close code where the transport has one.
    fn close(&mut self, code: Option<(u16, &'static str)>) -> impl Future<Output = ()> + Send;
    /// Called when the connection has read a frame and has nothing to
    /// write: a transport may give back what it holds only while reading
    /// (the WebSocket's codec and read buffer).
    fn rest(&mut self) {}
    /// The session's CONNECT was accepted (called for every frame read
    /// after it): from now on the client may hold `read_limit` bytes of
    /// unfinished frames, not the smaller limit of an unauthenticated
    /// socket (`read_budget.rs`).
    fn connected(&mut self, _read_limit: usize) {}
    /// `websocket` or `polling`, for metrics and logs.
    fn name(&self) -> &'static str;
    /// The transports the client may upgrade to, for the open packet.
    fn upgrades(&self) -> &'static [&'static str] {
        &[]
    }
}
