//! The WebSocket transport: one text frame per Engine.IO packet, binary
//! frames for attachments — and memory per connection that a large
//! message does not leave behind.
//!
//! tungstenite grows its read buffer to the largest frame received and its
//! write buffer to the largest frame sent, and never shrinks either: one
//! 64 KiB `pod:update` relayed to a room would leave 64 KiB in every
//! member's connection for as long as it stays open. So:
//!
//! - a message larger than [`FRAGMENT`] is sent as fragments (RFC 6455
//!   §5.4) of that size, which bounds what the write buffer ever holds;
//! - after a large message came in (or went out), once the connection is
//!   flushed and tungstenite holds no byte of the next frame, the codec is
//!   rebuilt on the same socket, dropping its grown buffers.
//!
//! "Holds no byte of the next frame" is known by counting: [`Counted`]
//! counts the bytes read from the socket, and the transport adds up the
//! wire size of every message tungstenite returned. The sum assumes the
//! shortest header, so a client that fragments or pads a header only makes
//! the sum smaller than what was read: the rebuild is then skipped, never
//! done with bytes pending.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::{End, Incoming, Transport};

/// The WebSocket of an upgraded HTTP connection.
pub type WsStream = WebSocketStream<Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// Messages above this are sent in fragments of this size, and a message
/// above it (either way) marks the codec's buffers as grown.
pub const FRAGMENT: usize = 4 * 1024;

/// A socket that counts the bytes read from it.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    /// Wraps `inner`, nothing read yet.
    pub fn new(inner: S) -> Self {
        Counted { inner, read: 0 }
    }

    /// Bytes read so far.
    pub fn read_total(&self) -> u64 {
        self.read
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read += n as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The fewest bytes a client frame with this payload takes on the wire:
/// 2 header bytes, the extended length, the 4-byte mask.
pub fn min_wire_len(payload: usize) -> u64 {
    let ext = match payload {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    (2 + ext + 4 + payload) as u64
}

/// An upgraded WebSocket as a [`Transport`].
#[derive(Debug)]
pub struct WsTransport {
    /// Always `Some` between calls; taken only while the codec is rebuilt.
    ws: Option<WsStream>,
    /// Wire bytes of the messages tungstenite returned, at least.
    consumed: u64,
    /// A message above [`FRAGMENT`] went through since the last rebuild.
    grown: bool,
}

impl WsTransport {
    /// The transport of `ws`, nothing read from it yet through tungstenite
    /// (a probe socket hands over what it read: `consumed`).
    pub fn new(ws: WsStream, consumed: u64) -> Self {
        WsTransport {
            ws: Some(ws),
            consumed,
            grown: false,
        }
    }

    fn ws(&mut self) -> Result<&mut WsStream, End> {
        self.ws.as_mut().ok_or(End::WriteFailed)
    }

    /// Rebuilds the codec if a large message grew its buffers and it holds
    /// nothing: called after a successful flush (so nothing is waiting to
    /// be written, not even an automatic pong), and only when every byte
    /// read from the socket belongs to a message already returned.
    fn compact(&mut self) {
        let Some(ws) = self.ws.as_ref() else { return };
        if !self.grown || ws.get_ref().read_total() != self.consumed {
            return;
        }
        let Some(ws) = self.ws.take() else { return };
        let config = *ws.get_config();
        let io = ws.into_inner();
        // Building a stream without a handshake completes on its first
        // poll (it only wraps the socket), so this never waits.
        self.ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).now_or_never();
        if self.ws.is_none() {
            debug!("WebSocket codec not rebuilt; closing");
        }
        self.grown = false;
    }

    /// Sends `data`, larger than [`FRAGMENT`], as one message in
    /// fragments of that size (slices of `data`, not copies).
    async fn feed_fragments(&mut self, data: Bytes, kind: Data) -> Result<(), End> {
        let ws = self.ws()?;
        let mut at = 0;
        while at < data.len() {
            let end = (at + FRAGMENT).min(data.len());
            let op = if at == 0 { kind } else { Data::Continue };
            let frame = Frame::message(data.slice(at..end), OpCode::Data(op), end == data.len());
            ws.feed(Message::Frame(frame))
                .await
                .map_err(|_| End::WriteFailed)?;
            at = end;
        }
        self.grown = true;
        Ok(())
    }

    async fn feed_one(&mut self, msg: Message) -> Result<(), End> {
        self.ws()?.feed(msg).await.map_err(|_| End::WriteFailed)
    }
}

impl Transport for WsTransport {
    async fn recv(&mut self) -> Option<Result<Incoming, End>> {
        loop {
            let msg = self.ws.as_mut()?.next().await?;
            if let Ok(m) = &msg {
                let len = match m {
                    Message::Text(t) => t.len(),
                    Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
                    Message::Close(_) | Message::Frame(_) => 0,
                };
                self.consumed += min_wire_len(len);
                self.grown |= len > FRAGMENT;
            }
            return Some(match msg {
                Ok(Message::Text(t)) => Ok(Incoming::Text(t)),
                Ok(Message::Binary(b)) => Ok(Incoming::Binary(b)),
                Ok(Message::Close(_)) => return None,
                // WebSocket-level pings are answered by tungstenite.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(e) => {
                    let e = e.to_string();
                    if e.contains("too long") || e.contains("Space limit") {
                        Err(End::Oversize)
                    } else {
                        debug!(error = %e, "read failed");
                        return None;
                    }
                }
            });
        }
    }

    async fn feed_text(&mut self, text: Utf8Bytes) -> Result<(), End> {
        if text.len() <= FRAGMENT {
            return self.feed_one(Message::Text(text)).await;
        }
        self.feed_fragments(Bytes::from(text), Data::Text).await
    }

    async fn feed_binary(&mut self, data: Bytes) -> Result<(), End> {
        if data.len() <= FRAGMENT {
            return self.feed_one(Message::Binary(data)).await;
        }
        self.feed_fragments(data, Data::Binary).await
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.ws()?.flush().await.map_err(|_| End::WriteFailed)?;
        self.compact();
        Ok(())
    }

    async fn close(&mut self, code: Option<(u16, &'static str)>) {
        let Some(ws) = self.ws.as_mut() else { return };
        if let Some((code, reason)) = code {
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: code.into(),
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
        }
        let _ = ws.close(None).await;
    }

    fn name(&self) -> &'static str {
        "websocket"
    }
}
