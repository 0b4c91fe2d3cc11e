//! The WebSocket's outgoing data frames: a header kept inline and the
//! payload `Bytes` the room built once, queued per connection and written
//! with vectored writes, copied nowhere (see `ws.rs` for why tungstenite's
//! own write path is not used).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// One piece of an outgoing frame: its header, kept inline (no
/// allocation per frame), or its payload.
#[derive(Debug)]
enum Part {
    Header([u8; 10], u8),
    Payload(Bytes),
}

impl Part {
    /// The header of an unmasked, final data frame (RFC 6455 §5.2),
    /// formatted by tungstenite into an inline array.
    fn header(data: Data, len: usize) -> Part {
        let h = FrameHeader {
            opcode: OpCode::Data(data),
            ..FrameHeader::default()
        };
        let mut buf = [0u8; 10];
        let n = h.len(len as u64);
        // At most 10 bytes unmasked: the array always has the room.
        let _ = h.format(len as u64, &mut &mut buf[..]);
        Part::Header(buf, n as u8)
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Part::Header(h, n) => &h[..usize::from(*n)],
            Part::Payload(b) => b,
        }
    }
}

/// Frames queued for the socket, and how far the first one is written.
///
/// Written by hand: tokio's `write_all_buf` would need one `Buf` over many
/// `Bytes` with inline headers, which no well-kept crate offers as such.
#[derive(Debug, Default)]
pub(super) struct Pending {
    parts: VecDeque<Part>,
    /// Bytes of the first part already written.
    at: usize,
    /// Bytes still to write.
    pub(super) len: usize,
}

impl Pending {
    pub(super) fn push(&mut self, data: Data, payload: Bytes) {
        self.len += payload.len();
        self.parts.push_back(Part::header(data, payload.len()));
        if let Some(Part::Header(_, n)) = self.parts.back() {
            self.len += usize::from(*n);
        }
        if !payload.is_empty() {
            self.parts.push_back(Part::Payload(payload));
        }
    }

    /// Fills `out` with what is left to write, in order; how many.
    fn slices<'a>(&'a self, out: &mut [io::IoSlice<'a>]) -> usize {
        let mut k = 0;
        for (i, p) in self.parts.iter().enumerate() {
            if k == out.len() {
                break;
            }
            let b = p.bytes();
            out[k] = io::IoSlice::new(if i == 0 { &b[self.at..] } else { b });
            k += 1;
        }
        k
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.parts.front() else {
                return;
            };
            let left = front.bytes().len() - self.at;
            if n < left {
                self.at += n;
                return;
            }
            n -= left;
            self.at = 0;
            self.parts.pop_front();
        }
    }

    /// Once empty: gives the queue's allocation back, so an idle
    /// connection holds none (the next write allocates a small one again:
    /// cheap beside the write itself).
    pub(super) fn shrink(&mut self) {
        if self.parts.capacity() > 0 {
            self.parts = Default::default();
        }
    }
}

/// Writes `pending` to `io` with vectored writes. The slices live on the
/// stack of each poll, not in the future, so a resident connection task
/// does not carry them.
pub(super) async fn write_pending<W: AsyncWrite + Unpin>(
    io: &mut W,
    pending: &mut Pending,
) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        while pending.len > 0 {
            let mut slices = [io::IoSlice::new(&[]); 32];
            let k = pending.slices(&mut slices);
            match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => pending.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(p: &mut Pending, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while p.len > 0 {
            let mut slices = [io::IoSlice::new(&[]); 3];
            let k = p.slices(&mut slices);
            // A socket that takes at most `chunk` bytes per write.
            let mut n = 0;
            for s in &slices[..k] {
                let take = s.len().min(chunk - n);
                out.extend_from_slice(&s[..take]);
                n += take;
                if n == chunk {
                    break;
                }
            }
            p.advance(n);
        }
        out
    }

    #[test]
    fn frames_are_written_whole_and_in_order_however_the_socket_splits_them() {
        for chunk in [1, 3, 7, 200, 70_000, 1 << 20] {
            let mut p = Pending::default();
            let sizes = [0usize, 5, 125, 126, 65_535, 65_536];
            for (i, n) in sizes.iter().enumerate() {
                p.push(
                    if i % 2 == 0 { Data::Text } else { Data::Binary },
                    Bytes::from(vec![i as u8; *n]),
                );
            }
            let wire = written(&mut p, chunk);
            // Read back with tungstenite's own frame parser.
            let mut cur = std::io::Cursor::new(wire.as_slice());
            for (i, n) in sizes.iter().enumerate() {
                use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
                let (h, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
                assert!(h.is_final && h.mask.is_none());
                assert_eq!(len, *n as u64, "chunk {chunk}, frame {i}");
                let at = cur.position() as usize;
                assert!(wire[at..at + n].iter().all(|b| *b == i as u8));
                cur.set_position((at + n) as u64);
            }
            assert_eq!(cur.position() as usize, wire.len());
            assert!(p.parts.is_empty() && p.at == 0);
        }
    }
}
