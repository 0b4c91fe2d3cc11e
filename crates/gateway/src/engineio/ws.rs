//! The WebSocket transport: one text frame per Engine.IO packet, binary
//! frames for attachments — written from the shared frame bytes, and with
//! memory per connection that a burst does not leave behind.
//!
//! Reading (frames, masks, control frames, limits) is tungstenite's. Data
//! frames going out are not: tungstenite copies every frame into a write
//! buffer of its own, which grows to the largest batch ever written and
//! never shrinks — one 64 KiB `pod:update` relayed to a room would leave
//! 64 KiB in every member's connection, and every delivery would cost a
//! copy. So [`WsTransport`] queues a 2–10 byte header and the payload
//! `Bytes` (the one frame the room built, shared by every member) and
//! writes them with vectored writes straight to the socket, after
//! tungstenite has written what it queued itself (an automatic pong). A
//! server's frames are not masked (RFC 6455 §5.1), so nothing is copied.
//!
//! tungstenite's read buffer grows to the largest frame received. After a
//! frame larger than the buffer came in, once the connection is flushed and
//! tungstenite holds no byte of the next frame, the codec is rebuilt on the
//! same socket, dropping the grown buffer.
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
use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::ws_out::{write_pending, Pending};
use super::{End, Incoming, Transport};

/// The WebSocket of an upgraded HTTP connection.
pub type WsStream = WebSocketStream<Counted<TokioIo<hyper::upgrade::Upgraded>>>;

/// tungstenite's read buffer (`http/ws_upgrade.rs` `config`): a frame
/// larger may have grown it, and the codec is rebuilt once it is read.
/// 1 KiB holds the usual event (a cursor, a pod move: tens to hundreds of
/// bytes) and costs every idle connection 1 KiB less than 2 KiB did
/// (measured: 11.95 → 11.04 KiB of RSS per connection, docs/benchmarks.md).
pub const READ_BUFFER: usize = 1024;

/// Bytes queued past which a feed writes them out before queueing more.
const WRITE_AT: usize = 64 * 1024;

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
/// the shortest header with its 4-byte mask, and the payload.
pub fn min_wire_len(payload: usize) -> u64 {
    let masked = FrameHeader {
        mask: Some([0; 4]),
        ..FrameHeader::default()
    };
    (masked.len(payload as u64) + payload) as u64
}

/// An upgraded WebSocket as a [`Transport`].
#[derive(Debug)]
pub struct WsTransport {
    /// Always `Some` between calls; taken only while the codec is rebuilt.
    ws: Option<WsStream>,
    /// Data frames not yet written.
    pending: Pending,
    /// A write of the pending frames was given up part-way: they are
    /// finished before tungstenite may write anything.
    torn: bool,
    /// Wire bytes of the messages tungstenite returned, at least.
    consumed: u64,
    /// A frame above [`READ_BUFFER`] came in since the last rebuild:
    /// rebuild after the next flush.
    grown: bool,
}

impl WsTransport {
    /// The transport of `ws`, nothing read from it yet through tungstenite
    /// (a probe socket hands over what it read: `consumed`).
    pub fn new(ws: WsStream, consumed: u64) -> Self {
        WsTransport {
            ws: Some(ws),
            pending: Pending::default(),
            torn: false,
            consumed,
            grown: false,
        }
    }

    /// Rebuilds the codec if a large frame grew its read buffer and it
    /// holds nothing: called after a successful
    /// flush (so nothing is waiting to be written, not even an automatic
    /// pong), and only when every byte read from the socket belongs to a
    /// message already returned.
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

    /// Writes what tungstenite queued itself (an automatic pong), then the
    /// pending frames. A write given up part-way through a frame is
    /// finished first: tungstenite's frames go only between whole frames.
    async fn write_out(&mut self) -> Result<(), End> {
        let ws = self.ws.as_mut().ok_or(End::WriteFailed)?;
        if !self.torn {
            ws.flush().await.map_err(|_| End::WriteFailed)?;
        }
        if self.pending.len == 0 {
            return Ok(());
        }
        self.torn = true;
        write_pending(ws.get_mut(), &mut self.pending)
            .await
            .map_err(|_| End::WriteFailed)?;
        self.torn = false;
        self.pending.shrink();
        Ok(())
    }

    async fn queue(&mut self, data: Data, payload: Bytes) -> Result<(), End> {
        if self.pending.len > WRITE_AT {
            self.write_out().await?;
        }
        self.pending.push(data, payload);
        Ok(())
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
                self.grown |= len > READ_BUFFER;
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
        self.queue(Data::Text, Bytes::from(text)).await
    }

    async fn feed_binary(&mut self, data: Bytes) -> Result<(), End> {
        self.queue(Data::Binary, data).await
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.write_out().await?;
        self.compact();
        Ok(())
    }

    async fn close(&mut self, code: Option<(u16, &'static str)>) {
        // What was handed to the socket goes before the close frame, as a
        // client that reads again expects it (the caller bounds the wait).
        if self.write_out().await.is_err() {
            return;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_wire_len_is_the_shortest_client_header() {
        assert_eq!(min_wire_len(0), 6);
        assert_eq!(min_wire_len(125), 131);
        assert_eq!(min_wire_len(126), 134);
        assert_eq!(min_wire_len(65_536), 65_550);
    }
}
