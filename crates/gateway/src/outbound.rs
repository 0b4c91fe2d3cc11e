//! The bounded outgoing queue of one connection, shared between the
//! connection (which drains it) and every room the socket is in (which fill
//! it).
//!
//! Fan-out never waits on a client: frames are offered with `push`, which
//! never blocks. The queue is bounded twice — in frames and in bytes — so a
//! client that does not read holds at most `max_bytes` of queued frames,
//! whatever their size. A full queue drops volatile frames (cursors,
//! selections); if it stays full longer than the slow-consumer grace, or a
//! non-volatile frame does not fit (it must not be lost silently), the
//! connection is closed as a slow consumer: the client reconnects and
//! recovers what it missed from the room log.
//!
//! Hand-written rather than a `tokio::sync::mpsc` channel: a channel
//! allocates its first block of slots (≈1.3 KiB here) for every connection,
//! idle or not, and a kick would need a second primitive. This queue is a
//! `VecDeque` behind a mutex that allocates on the first frame and is freed
//! again once a burst is drained, with one waker: the connection's task is
//! its only consumer, and it waits for frames and for a kick alike.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_engine::Offset;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio_tungstenite::tungstenite::Utf8Bytes;

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
    /// Another connection recovered this connection's session: it owns
    /// the session now.
    Replaced,
}

/// Shared between the connection and every room it is in.
/// A queue that held more than this many frames gives its memory back
/// once drained, so a burst does not stay resident in an idle connection
/// (16 kept 512 bytes in every connection that had seen the joins of its
/// room; 4 keeps 128 at most).
const SHRINK_ABOVE: usize = 4;

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    limits: Arc<QueueLimits>,
}

/// A queue's bounds and counters: the same for every connection of a node,
/// so held once (`App`) rather than in every queue.
#[derive(Debug)]
pub struct QueueLimits {
    max_frames: usize,
    max_bytes: usize,
    grace: Duration,
    drops: IntCounter,
    slow_consumers: IntCounter,
}

impl QueueLimits {
    /// At most `capacity` frames and `max_bytes` bytes; volatile frames
    /// are dropped while a queue is full, for at most `grace`.
    pub fn new(capacity: usize, max_bytes: usize, grace: Duration, metrics: &Metrics) -> Arc<Self> {
        Arc::new(QueueLimits {
            max_frames: capacity.max(1),
            max_bytes,
            grace,
            drops: metrics.queue_drops.clone(),
            slow_consumers: metrics.slow_consumer_disconnects.clone(),
        })
    }
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<OutFrame>,
    bytes: usize,
    /// Since when volatile frames are being dropped (the queue is full).
    full_since: Option<Instant>,
    kicked: Option<Kick>,
    /// The connection is gone: nothing is queued any more.
    closed: bool,
    /// The connection's task, waiting for a frame or a kick.
    waker: Option<Waker>,
}

impl State {
    fn park(&mut self, w: &Waker) {
        match &self.waker {
            Some(old) if old.will_wake(w) => {}
            _ => self.waker = Some(w.clone()),
        }
    }

    fn pop(&mut self) -> Option<OutFrame> {
        let f = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(f.bytes());
        if self.frames.is_empty() && self.frames.capacity() > SHRINK_ABOVE {
            self.frames = VecDeque::new();
        }
        Some(f)
    }
}

/// The filling side: cheap to clone, one per room membership and session.
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
}

/// The draining side, owned by the connection's task.
#[derive(Debug)]
pub struct OutboundRx {
    shared: Arc<Shared>,
}

impl OutboundRx {
    /// The next frame, waiting for one.
    pub async fn recv(&mut self) -> Option<OutFrame> {
        poll_fn(|cx| {
            let mut st = self.shared.state.lock();
            match st.pop() {
                Some(f) => Poll::Ready(Some(f)),
                None => {
                    st.park(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The next frame, if one is queued.
    pub fn try_recv(&mut self) -> Option<OutFrame> {
        self.shared.state.lock().pop()
    }
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.closed = true;
        st.frames = VecDeque::new();
        st.bytes = 0;
    }
}

impl Outbound {
    /// A queue of at most `capacity` frames and `max_bytes` bytes; volatile
    /// frames are dropped while it is full, for at most `grace`.
    pub fn new(
        capacity: usize,
        max_bytes: usize,
        grace: Duration,
        metrics: Metrics,
    ) -> (Self, OutboundRx) {
        Self::with_limits(QueueLimits::new(capacity, max_bytes, grace, &metrics))
    }

    /// A queue under `limits` (a node's connections share one).
    pub fn with_limits(limits: Arc<QueueLimits>) -> (Self, OutboundRx) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            limits,
        });
        (
            Outbound {
                shared: shared.clone(),
            },
            OutboundRx { shared },
        )
    }

    /// Offers a frame without waiting. Returns `false` if it was dropped
    /// (full or closed).
    pub fn push(&self, frame: OutFrame, volatile: bool) -> bool {
        let s = &*self.shared.limits;
        let n = frame.bytes();
        let mut st = self.shared.state.lock();
        if st.closed || st.kicked.is_some() {
            return false;
        }
        // A frame larger than the whole bound still goes into an empty
        // queue: the bound limits what piles up, not what one event may be
        // (that is the max payload's job).
        let fits = st.frames.len() < s.max_frames && (st.bytes == 0 || st.bytes + n <= s.max_bytes);
        if fits {
            st.frames.push_back(frame);
            st.bytes += n;
            st.full_since = None;
            let w = st.waker.take();
            drop(st);
            if let Some(w) = w {
                w.wake();
            }
            return true;
        }
        let kick = if volatile {
            s.drops.inc();
            let now = Instant::now();
            match st.full_since {
                None => {
                    st.full_since = Some(now);
                    false
                }
                Some(since) => now.duration_since(since) > s.grace,
            }
        } else {
            true
        };
        drop(st);
        if kick {
            self.kick(Kick::SlowConsumer);
        }
        false
    }

    /// Closes the connection for `why` (the first reason wins).
    pub fn kick(&self, why: Kick) {
        let mut st = self.shared.state.lock();
        if st.kicked.is_some() {
            return;
        }
        st.kicked = Some(why);
        let w = st.waker.take();
        drop(st);
        if why == Kick::SlowConsumer {
            self.shared.limits.slow_consumers.inc();
        }
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Resolves when the connection must be closed, with the reason. Only
    /// the connection's own task waits on it (the queue has one waker).
    pub async fn kicked(&self) -> Kick {
        poll_fn(|cx| {
            let mut st = self.shared.state.lock();
            match st.kicked {
                Some(k) => Poll::Ready(k),
                None => {
                    st.park(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
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
