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
//! tungstenite keeps a read buffer per connection (1 KiB here, grown to
//! the largest frame received), though most connections are idle most of
//! the time. So between frames the transport holds the bare socket: once
//! the connection is flushed and tungstenite holds no byte of the next
//! frame, its codec is dropped ([`Codec::Idle`]); when the client sends
//! again, the first bytes are read into a buffer on the stack of the poll
//! (not in the connection's future) and handed to a new codec as already
//! read. An idle connection keeps no read buffer; a frame in costs one
//! small allocation more.
//!
//! "Holds no byte of the next frame" is known by counting: [`Counted`]
//! counts the bytes read from the socket, and the transport adds up the
//! wire size of every message tungstenite returned. The sum assumes the
//! shortest header, so a client that fragments or pads a header only makes
//! the sum smaller than what was read: the codec is then kept, never
//! dropped with bytes pending.

use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::Data;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::end::INVALID_UTF8;
pub use super::ws_io::Counted;
use super::ws_out::{write_pending, Pending};
use super::{End, Incoming, Transport};
use crate::read_budget::OverRead;

/// The socket of an upgraded HTTP connection.
pub type WsIo = Counted<TokioIo<hyper::upgrade::Upgraded>>;

/// The WebSocket of an upgraded HTTP connection.
pub type WsStream = WebSocketStream<WsIo>;

/// tungstenite's read buffer ([`config`]), and the most
/// an idle connection reads at once when the client sends again: 1 KiB
/// holds the usual event (a cursor, a pod move: tens to hundreds of bytes)
/// in one read. Only a connection reading holds it (see [`Codec`]).
pub const READ_BUFFER: usize = 1024;

/// The codec's settings. tungstenite's default buffers are 128 KiB each
/// per connection; most frames here are tens of bytes, so a small read
/// buffer (a large frame grows it; the codec is dropped between frames
/// anyway) keeps a reading connection cheap. tungstenite writes only
/// control frames (pongs, the close), each at once. A message may be at
/// most the max payload.
pub fn config(max_payload: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_payload))
        .max_frame_size(Some(max_payload))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

/// Bytes queued past which a feed writes them out before queueing more.
const WRITE_AT: usize = 64 * 1024;

/// The fewest bytes a client frame with this payload takes on the wire:
/// the shortest header with its 4-byte mask, and the payload.
pub fn min_wire_len(payload: usize) -> u64 {
    let masked = FrameHeader {
        mask: Some([0; 4]),
        ..FrameHeader::default()
    };
    (masked.len(payload as u64) + payload) as u64
}

/// The socket, with tungstenite's codec on it while the client sends.
#[derive(Debug)]
enum Codec {
    /// tungstenite reads frames (and holds its read buffer). Boxed: the
    /// stream is ~300 bytes that an idle connection would otherwise carry.
    Open(Box<WsStream>),
    /// Between frames: the bare socket, no read buffer, and the max
    /// payload to build the codec again with (the rest of its settings is
    /// [`config`]'s; the whole `WebSocketConfig` would cost every idle
    /// connection ~80 bytes).
    Idle(WsIo, usize),
    /// The codec could not be built again (never expected): the
    /// connection ends.
    Gone,
}

impl Codec {
    fn io(&mut self) -> Option<&mut WsIo> {
        match self {
            Codec::Open(ws) => Some(ws.get_mut()),
            Codec::Idle(io, _) => Some(io),
            Codec::Gone => None,
        }
    }
}

/// An upgraded WebSocket as a [`Transport`].
#[derive(Debug)]
pub struct WsTransport {
    codec: Codec,
    /// Data frames not yet written.
    pending: Pending,
    /// A write of the pending frames was given up part-way: they are
    /// finished before tungstenite may write anything.
    torn: bool,
    /// Wire bytes of the messages tungstenite returned, at least.
    consumed: u64,
}

impl WsTransport {
    /// The transport of `ws`, nothing read from it yet through tungstenite
    /// (a probe socket hands over what it read: `consumed`).
    pub fn new(ws: WsStream, consumed: u64) -> Self {
        WsTransport {
            codec: Codec::Open(Box::new(ws)),
            pending: Pending::default(),
            torn: false,
            consumed,
        }
    }

    /// A codec on the idle socket again, `part` already read from it.
    fn open(&mut self, part: Vec<u8>) {
        self.codec = match std::mem::replace(&mut self.codec, Codec::Gone) {
            // Building a stream without a handshake completes on its first
            // poll (it only wraps the socket), so this never waits.
            Codec::Idle(io, max_payload) => {
                let config = Some(config(max_payload));
                match WebSocketStream::from_partially_read(io, part, Role::Server, config)
                    .now_or_never()
                {
                    Some(ws) => Codec::Open(Box::new(ws)),
                    None => {
                        debug!("WebSocket codec not rebuilt; closing");
                        Codec::Gone
                    }
                }
            }
            other => other,
        };
    }

    /// Drops the codec if every byte read from the socket belongs to a
    /// message already returned and tungstenite has nothing left to write
    /// (an automatic pong it could not write at once keeps it).
    fn drop_codec(&mut self) {
        let Codec::Open(ws) = &mut self.codec else {
            return;
        };
        if ws.get_ref().read_total() != self.consumed {
            return;
        }
        if !matches!(ws.flush().now_or_never(), Some(Ok(()))) {
            return;
        }
        if let Codec::Open(ws) = std::mem::replace(&mut self.codec, Codec::Gone) {
            let max_payload = ws.get_config().max_message_size.unwrap_or(usize::MAX);
            self.codec = Codec::Idle(ws.into_inner(), max_payload);
        }
    }

    /// Writes what tungstenite queued itself (an automatic pong), then the
    /// pending frames. A write given up part-way through a frame is
    /// finished first: tungstenite's frames go only between whole frames.
    async fn write_out(&mut self) -> Result<(), End> {
        if let Codec::Open(ws) = &mut self.codec {
            if !self.torn {
                ws.flush().await.map_err(|_| End::WriteFailed)?;
            }
        }
        if self.pending.len == 0 {
            return Ok(());
        }
        self.torn = true;
        let io = self.codec.io().ok_or(End::WriteFailed)?;
        write_pending(io, &mut self.pending)
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

/// The first bytes the client sends to an idle socket, at most
/// [`READ_BUFFER`]; empty at the end of the stream.
///
/// The buffer is a local of the poll, on the stack, not a field of the
/// future: the connection waiting here holds no buffer at all.
async fn first_bytes(io: &mut WsIo) -> io::Result<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut buf = [0u8; READ_BUFFER];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(read.filled().to_vec())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

impl Transport for WsTransport {
    async fn recv(&mut self) -> Option<Result<Incoming, End>> {
        loop {
            if let Codec::Idle(io, _) = &mut self.codec {
                match first_bytes(io).await {
                    Ok(part) if !part.is_empty() => self.open(part),
                    Ok(_) => return None,
                    Err(e) => {
                        debug!(error = %e, "read failed");
                        return None;
                    }
                }
            }
            let Codec::Open(ws) = &mut self.codec else {
                return None;
            };
            let msg = ws.next().await?;
            if let Ok(m) = &msg {
                let (len, whole) = match m {
                    Message::Text(t) => (t.len(), true),
                    Message::Binary(b) => (b.len(), true),
                    Message::Ping(b) | Message::Pong(b) => (b.len(), false),
                    Message::Close(_) | Message::Frame(_) => (0, false),
                };
                self.consumed += min_wire_len(len);
                // A whole message: the codec holds nothing of it any more.
                // A control frame may sit inside a fragmented message, whose
                // bytes are still held: only its own are given back.
                let held = ws.get_mut().held();
                if whole {
                    held.settle();
                } else {
                    held.release(min_wire_len(len) as usize);
                }
            }
            return Some(match msg {
                Ok(Message::Text(t)) => Ok(Incoming::Text(t)),
                Ok(Message::Binary(b)) => Ok(Incoming::Binary(b)),
                Ok(Message::Close(_)) => return None,
                // WebSocket-level pings are answered by tungstenite.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(Error::Io(e)) if OverRead::of(&e) == Some(OverRead::Node) => {
                    Err(End::ReadBudget)
                }
                Err(Error::Io(e)) if OverRead::of(&e) == Some(OverRead::Connection) => {
                    Err(End::Oversize)
                }
                Err(Error::Capacity(_)) => Err(End::Oversize),
                // A frame RFC 6455 forbids (unmasked, a reserved opcode or
                // bit, a bad control frame, broken fragmentation): closed
                // with 1002 and counted, not taken for the client leaving.
                Err(Error::Protocol(p)) => Err(End::Protocol("bad websocket frame", p.to_string())),
                Err(Error::Utf8(detail)) => Err(End::Protocol(INVALID_UTF8, detail)),
                Err(e) => {
                    debug!(error = %e, "read failed");
                    return None;
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
        self.drop_codec();
        Ok(())
    }

    async fn close(&mut self, code: Option<(u16, &'static str)>) {
        // What was handed to the socket goes before the close frame, as a
        // client that reads again expects it (the caller bounds the wait).
        if self.write_out().await.is_err() {
            return;
        }
        if matches!(self.codec, Codec::Idle(..)) {
            self.open(Vec::new());
        }
        let Codec::Open(ws) = &mut self.codec else {
            return;
        };
        if let Some((code, reason)) = code {
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code: code.into(),
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
        }
        let _ = WebSocketStream::close(&mut **ws, None).await;
        // A client refused for what it sends may still be sending it:
        // closing the socket with its bytes unread would answer with a
        // reset, and a client library that sees its write fail drops the
        // connection without reading the close frame just written.
        // The codec goes first, with what it buffered of the refused frame.
        if matches!(code, Some((1002 | 1007 | 1009 | 1013, _))) {
            if let Codec::Open(ws) = std::mem::replace(&mut self.codec, Codec::Gone) {
                ws.into_inner().linger().await;
            }
        }
    }

    fn rest(&mut self) {
        self.drop_codec();
    }

    fn connected(&mut self, read_limit: usize) {
        if let Some(io) = self.codec.io() {
            io.set_read_limit(read_limit);
        }
    }

    fn name(&self) -> &'static str {
        "websocket"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_budget::{budget, Held};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A WebSocket transport on a real upgraded connection, and the
    /// client's end of the socket (the upgrade answered and read).
    async fn pair() -> (WsTransport, TcpStream) {
        pair_held(budget(1 << 30).account(usize::MAX)).await
    }

    /// The same, its socket charging `held`.
    async fn pair_held(held: Held) -> (WsTransport, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tx = std::sync::Mutex::new(Some(tx));
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.lock().unwrap().take();
                    async move {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let (Ok(up), Some(tx)) = (on.await, tx) {
                                let _ = tx.send(up);
                            }
                        });
                        let res = hyper::Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .body(http_body_util::Empty::<Bytes>::new())
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(res)
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            client.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let up = rx.await.unwrap();
        let io = Counted::new(TokioIo::new(up), held);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config(1 << 20))).await;
        (WsTransport::new(ws, 0), client)
    }

    /// A masked client text frame.
    fn text_frame(payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn is_idle(t: &WsTransport) -> bool {
        matches!(t.codec, Codec::Idle(..))
    }

    #[tokio::test]
    async fn the_codec_is_dropped_between_frames_and_never_with_bytes_pending() {
        let (mut t, mut client) = pair().await;
        // A write and its flush: nothing read, so nothing is pending.
        t.feed_text(Utf8Bytes::from_static("hello")).await.unwrap();
        t.flush().await.unwrap();
        assert!(is_idle(&t), "flushed with nothing read: idle");
        let mut got = [0u8; 7];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x81\x05hello");

        // A frame read after idle, then rest: idle again.
        client.write_all(&text_frame(b"one")).await.unwrap();
        match t.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.as_str(), "one"),
            other => panic!("{other:?}"),
        }
        assert!(!is_idle(&t), "a codec reads the frame");
        t.rest();
        assert!(is_idle(&t), "nothing pending after the frame: idle");

        // A frame and the first bytes of the next: the codec is kept.
        let mut wire = text_frame(b"two");
        let three = text_frame(b"three");
        wire.extend_from_slice(&three[..3]);
        client.write_all(&wire).await.unwrap();
        match t.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.as_str(), "two"),
            other => panic!("{other:?}"),
        }
        // Let the partial bytes arrive and be read by the codec.
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), t.recv()).await;
        assert!(early.is_err(), "the next frame is not whole yet");
        t.rest();
        assert!(!is_idle(&t), "bytes of the next frame are held: kept");
        client.write_all(&three[3..]).await.unwrap();
        match t.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.as_str(), "three"),
            other => panic!("{other:?}"),
        }
        t.rest();
        assert!(is_idle(&t));

        // The end of the stream while idle ends the transport.
        drop(client);
        assert!(t.recv().await.is_none());
    }

    /// The header of a masked client text frame announcing `len` bytes
    /// (16-bit length), and its mask.
    fn big_header(len: u16) -> Vec<u8> {
        let mut h = vec![0x81, 0x80 | 126];
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    }

    async fn expect_end(t: &mut WsTransport, want: End) {
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), t.recv())
            .await
            .expect("the transport answers");
        match got {
            Some(Err(e)) => assert_eq!(e, want),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unconnected_socket_holds_little_and_a_connected_one_a_max_payload() {
        let b = budget(1 << 30);
        // Before CONNECT: 256 bytes at most. A frame announcing 4,000
        // bytes is refused once more than that of it arrived.
        let (mut t, mut client) = pair_held(b.account(256)).await;
        let mut wire = big_header(4000);
        wire.extend_from_slice(&[b'x'; 300]);
        client.write_all(&wire).await.unwrap();
        expect_end(&mut t, End::Oversize).await;
        drop(t);
        assert_eq!(b.held(), 0, "a closed socket gives its bytes back");

        // The same frame after CONNECT goes through, and once it is whole
        // nothing is held.
        let (mut t, mut client) = pair_held(b.account(256)).await;
        t.connected(crate::read_budget::connected_limit(1 << 20));
        let mut wire = big_header(4000);
        wire.extend(std::iter::repeat_n(b'x', 4000));
        client.write_all(&wire).await.unwrap();
        match t.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.len(), 4000),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.held(), 0);
        // A ping inside nothing: its bytes are given back too.
        client.write_all(&[0x89, 0x80, 0, 0, 0, 0]).await.unwrap();
        client.write_all(&text_frame(b"after")).await.unwrap();
        match t.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.as_str(), "after"),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn unfinished_frames_together_stay_within_the_node_budget() {
        let b = budget(5000);
        let (mut first, mut c1) = pair_held(b.account(usize::MAX)).await;
        let (mut second, mut c2) = pair_held(b.account(usize::MAX)).await;
        // The first client sends 2,000 bytes of a 4,000-byte frame and
        // stops: they are held.
        let mut wire = big_header(4000);
        wire.extend(std::iter::repeat_n(b'x', 2000));
        c1.write_all(&wire).await.unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), first.recv());
        assert!(early.await.is_err(), "the frame is not whole");
        assert!(b.held() >= 2000, "{}", b.held());
        // The second one's frame would take the node past 5,000 bytes.
        let mut wire = big_header(4000);
        wire.extend(std::iter::repeat_n(b'y', 3100));
        c2.write_all(&wire).await.unwrap();
        expect_end(&mut second, End::ReadBudget).await;
        drop(second);
        // The first one finishes its frame: it was never refused.
        c1.write_all(&vec![b'x'; 2000]).await.unwrap();
        match first.recv().await {
            Some(Ok(Incoming::Text(m))) => assert_eq!(m.len(), 4000),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn min_wire_len_is_the_shortest_client_header() {
        assert_eq!(min_wire_len(0), 6);
        assert_eq!(min_wire_len(125), 131);
        assert_eq!(min_wire_len(126), 134);
        assert_eq!(min_wire_len(65_536), 65_550);
    }
}
