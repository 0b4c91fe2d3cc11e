//! The socket under a WebSocket ([`Counted`]): it counts the bytes read
//! from it (so the transport knows when tungstenite holds none of the next
//! frame), charges them to the connection's account of held bytes
//! (`read_budget.rs`), and closes lingering when the connection is
//! refused for what it sends.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::read_budget::Held;

/// How long a refused client's bytes are read and dropped after the close
/// frame ([`Counted::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How many of them at most.
const LINGER_BYTES: usize = 16 << 20;

/// A socket that counts the bytes read from it, and charges them to the
/// connection's account of held bytes (`read_budget.rs`): a read past the
/// connection's limit or the node's budget fails with [`OverRead`].
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    read: u64,
    held: Held,
}

impl<S> Counted<S> {
    /// Wraps `inner`, nothing read yet, charging `held`.
    pub fn new(inner: S, held: Held) -> Self {
        Counted {
            inner,
            read: 0,
            held,
        }
    }

    /// Bytes read so far.
    pub fn read_total(&self) -> u64 {
        self.read
    }

    /// After a close frame: says the node is done writing (FIN) and reads
    /// and drops what the client still sends until it closes too, for at
    /// most [`LINGER`] and [`LINGER_BYTES`] (a lingering close, as web
    /// servers do), so the socket is not closed with bytes unread.
    /// Takes the socket without its codec: what the codec held is let go
    /// at once, and nothing read here is kept.
    pub async fn linger(mut self)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.held.settle();
        let inner = &mut self.inner;
        let _ = tokio::time::timeout(LINGER, async {
            if inner.shutdown().await.is_err() {
                return;
            }
            let mut dropped = 0;
            let mut buf = [0u8; 8192];
            while dropped < LINGER_BYTES {
                match inner.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => dropped += n,
                }
            }
        })
        .await;
    }

    /// The connection's account of held bytes.
    pub fn held(&mut self) -> &mut Held {
        &mut self.held
    }

    /// Sets how much of unfinished frames the connection may hold.
    pub fn set_read_limit(&mut self, limit: usize) {
        self.held.set_limit(limit);
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
        if let Err(over) = self.held.charge(n) {
            return Poll::Ready(Err(io::Error::other(over)));
        }
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
