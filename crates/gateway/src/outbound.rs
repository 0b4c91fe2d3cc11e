//! The bounded outgoing queue of one connection, shared between the
//! connection (which drains it) and every room the socket is in (which fill
//! it).
//!
//! Fan-out never waits on a client: frames are offered with `try_send`. The
//! queue is bounded twice — in frames and in bytes — so a client that does
//! not read holds at most `max_bytes` of queued frames, whatever their size.
//! A full queue drops volatile frames (cursors, selections); if it stays full
//! longer than the slow-consumer grace, or a non-volatile frame does not fit
//! (it must not be lost silently), the connection is closed as a slow
//! consumer: the client reconnects and recovers what it missed from the
//! room log.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use flowgate_engine::Offset;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What a connection's queue carries.
#[derive(Debug, Clone)]
pub enum OutFrame {
    /// One Engine.IO text packet for this client alone.
    Text(Utf8Bytes),
    /// A room event encoded once per node and shared by every local
    /// recipient.
    Room(Arc<RoomFrame>),
    /// The socket's membership of this room was revoked: the connection
    /// leaves the room. Travels on the queue so that it is ordered with the
    /// room's events and costs no channel of its own.
    Evict(Arc<str>),
}

/// A room event encoded once per node.
#[derive(Debug)]
pub struct RoomFrame {
    /// The room it belongs to: a frame of a room the socket has left since
    /// it was queued is not written.
    pub room: Arc<str>,
    /// `42/flows,[…]` or `45N-/flows,[…]`.
    pub text: Utf8Bytes,
    /// The binary frames following a binary event.
    pub attachments: Vec<Bytes>,
    /// The event's room offset; `None` for volatile events, which are not
    /// in the room log. The connection skips an event at or before the last
    /// offset it delivered (the overlap of a replay and live delivery).
    pub offset: Option<Offset>,
}

impl OutFrame {
    /// What the frame holds in memory, for the byte bound.
    pub fn bytes(&self) -> usize {
        match self {
            OutFrame::Text(t) => t.len(),
            OutFrame::Room(r) => r.text.len() + r.attachments.iter().map(Bytes::len).sum::<usize>(),
            OutFrame::Evict(r) => r.len(),
        }
    }
}

/// Why the gateway closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The client did not read its frames.
    SlowConsumer,
    /// Room messages for this node were lost on the way and could not be
    /// refilled from the room log: the client must reconnect and recover.
    Resync,
}

/// Shared between the connection and every room it is in.
#[derive(Debug)]
struct Shared {
    /// Bytes of the frames now in the queue.
    queued_bytes: AtomicUsize,
    /// The byte bound of the queue.
    max_bytes: usize,
    /// Milliseconds (since `epoch`) at which the queue was first found full;
    /// 0 while it has room.
    full_since_ms: AtomicU64,
    /// Reference point of `full_since_ms`.
    epoch: Instant,
    /// Cancelled to close the connection.
    kick: CancellationToken,
    /// Why it was kicked.
    reason: OnceLock<Kick>,
    /// How long a full queue is tolerated while volatile frames drop.
    grace: Duration,
    metrics: Metrics,
}

/// The sending side of a connection's queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<OutFrame>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection task.
#[derive(Debug)]
pub struct OutboundRx {
    rx: mpsc::Receiver<OutFrame>,
    shared: Arc<Shared>,
}

impl OutboundRx {
    fn taken(&self, f: &OutFrame) {
        self.shared
            .queued_bytes
            .fetch_sub(f.bytes(), Ordering::Relaxed);
    }

    /// The next frame; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<OutFrame> {
        let f = self.rx.recv().await?;
        self.taken(&f);
        Some(f)
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<OutFrame> {
        let f = self.rx.try_recv().ok()?;
        self.taken(&f);
        Some(f)
    }
}

impl Outbound {
    /// A queue of at most `capacity` frames and `max_bytes` bytes.
    pub fn new(
        capacity: usize,
        max_bytes: usize,
        grace: Duration,
        metrics: Metrics,
    ) -> (Self, OutboundRx) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared {
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            full_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            kick: CancellationToken::new(),
            reason: OnceLock::new(),
            grace,
            metrics,
        });
        (
            Outbound {
                tx,
                shared: shared.clone(),
            },
            OutboundRx { rx, shared },
        )
    }

    /// Offers a frame. Returns `false` if it was not queued.
    pub fn push(&self, frame: OutFrame, volatile: bool) -> bool {
        let n = frame.bytes();
        let s = &self.shared;
        let before = s.queued_bytes.fetch_add(n, Ordering::Relaxed);
        // A frame larger than the whole bound still goes into an empty
        // queue: the bound limits what piles up, not what one event may be
        // (that is the max payload's job).
        let fits = before == 0 || before + n <= s.max_bytes;
        let sent = if fits {
            self.tx.try_send(frame).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => true,
                mpsc::error::TrySendError::Closed(_) => false,
            })
        } else {
            Err(true)
        };
        match sent {
            Ok(()) => {
                if s.full_since_ms.load(Ordering::Relaxed) != 0 {
                    s.full_since_ms.store(0, Ordering::Relaxed);
                }
                true
            }
            Err(full) => {
                s.queued_bytes.fetch_sub(n, Ordering::Relaxed);
                if !full {
                    return false;
                }
                if volatile {
                    s.metrics.queue_drops.inc();
                    let now = s.epoch.elapsed().as_millis() as u64 + 1;
                    let since = s.full_since_ms.load(Ordering::Relaxed);
                    if since == 0 {
                        s.full_since_ms.store(now, Ordering::Relaxed);
                    } else if Duration::from_millis(now - since) > s.grace {
                        self.kick(Kick::SlowConsumer);
                    }
                } else {
                    self.kick(Kick::SlowConsumer);
                }
                false
            }
        }
    }

    /// Closes the connection for `why` (the first reason wins).
    pub fn kick(&self, why: Kick) {
        if self.shared.reason.set(why).is_ok() {
            if why == Kick::SlowConsumer {
                self.shared.metrics.slow_consumer_disconnects.inc();
            }
            self.shared.kick.cancel();
        }
    }

    /// Resolves when the connection must be closed, with the reason.
    pub async fn kicked(&self) -> Kick {
        self.shared.kick.cancelled().await;
        self.shared
            .reason
            .get()
            .copied()
            .unwrap_or(Kick::SlowConsumer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &'static str) -> OutFrame {
        OutFrame::Text(Utf8Bytes::from_static(s))
    }

    #[tokio::test]
    async fn volatile_frames_drop_then_kick_after_grace() {
        let m = Metrics::new([]);
        let (out, _rx) = Outbound::new(2, 1 << 20, Duration::from_millis(30), m.clone());
        assert!(out.push(text("a"), true));
        assert!(out.push(text("b"), true));
        assert!(!out.push(text("c"), true));
        assert_eq!(m.queue_drops.get(), 1);
        assert_eq!(m.slow_consumer_disconnects.get(), 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!out.push(text("d"), true));
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(1), out.kicked())
                .await
                .unwrap(),
            Kick::SlowConsumer
        );
        assert_eq!(m.slow_consumer_disconnects.get(), 1);
    }

    #[tokio::test]
    async fn a_non_volatile_frame_that_does_not_fit_kicks_at_once() {
        let m = Metrics::new([]);
        let (out, mut rx) = Outbound::new(1, 1 << 20, Duration::from_secs(60), m.clone());
        assert!(out.push(text("a"), false));
        assert!(!out.push(text("b"), false));
        assert_eq!(out.kicked().await, Kick::SlowConsumer);
        assert!(matches!(rx.recv().await, Some(OutFrame::Text(t)) if t.as_str() == "a"));
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes() {
        let m = Metrics::new([]);
        let (out, mut rx) = Outbound::new(1000, 10, Duration::from_secs(60), m.clone());
        assert!(out.push(text("123456"), true));
        assert!(out.push(text("7890"), true));
        // 10 bytes queued: one more byte does not fit, however many frames
        // the queue could still hold.
        assert!(!out.push(text("x"), true));
        assert_eq!(m.queue_drops.get(), 1);
        rx.recv().await.unwrap();
        assert!(out.push(text("abcdef"), true));
        // An oversize frame still enters an empty queue.
        let (out, _rx) = Outbound::new(1000, 10, Duration::from_secs(60), m.clone());
        assert!(out.push(text("0123456789abcdef"), false));
    }

    #[tokio::test]
    async fn room_again_resets_the_grace() {
        let m = Metrics::new([]);
        let (out, mut rx) = Outbound::new(1, 1 << 20, Duration::from_millis(30), m.clone());
        assert!(out.push(text("a"), true));
        assert!(!out.push(text("b"), true));
        rx.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(out.push(text("c"), true));
        rx.recv().await.unwrap();
        assert!(out.push(text("d"), true));
        assert!(!out.push(text("e"), true));
        assert_eq!(m.slow_consumer_disconnects.get(), 0);
    }
}
