//! The bounded outgoing queue of one connection.
//!
//! Fan-out never waits on a client: frames are offered with `try_send`. A
//! full queue drops volatile frames (cursors, selections); if it stays full
//! longer than the slow-consumer grace, or a non-volatile frame does not fit
//! (it must not be lost silently), the connection is closed as a slow
//! consumer — the client reconnects and reloads. Memory per connection is
//! therefore bounded by the queue length.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A frame (or frame group) waiting to be written.
#[derive(Debug, Clone)]
pub enum OutFrame {
    /// One text frame.
    Text(Utf8Bytes),
    /// An encoded event shared by every recipient: the text frame and its
    /// binary attachments, written back to back.
    Shared(Arc<EncodedEvent>),
}

/// An event encoded once per node.
#[derive(Debug)]
pub struct EncodedEvent {
    /// `42/flows,[…]` or `45N-/flows,[…]`.
    pub text: Utf8Bytes,
    /// The binary frames following a binary event.
    pub attachments: Vec<Bytes>,
}

/// Why the gateway closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// The client did not read its frames.
    SlowConsumer,
    /// Room messages for this node were lost on the way (the bus fell
    /// behind): the client must reconnect and reload rather than go on
    /// silently out of date.
    Resync,
}

/// Shared between the connection and every room it is in.
#[derive(Debug)]
struct Shared {
    /// Milliseconds (since `epoch`) at which the queue was first found full;
    /// 0 while it has room.
    full_since_ms: AtomicU64,
    /// Reference point of `full_since_ms`.
    epoch: Instant,
    /// Cancelled to close the connection.
    kick: CancellationToken,
    /// Why it was kicked.
    reason: OnceLock<Kick>,
    grace: Duration,
    metrics: Metrics,
}

/// The sending side of a connection's queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: mpsc::Sender<OutFrame>,
    shared: Arc<Shared>,
}

impl Outbound {
    /// A queue of `capacity` frames; returns the receiver for the writer.
    pub fn new(
        capacity: usize,
        grace: Duration,
        metrics: Metrics,
    ) -> (Self, mpsc::Receiver<OutFrame>) {
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            full_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            kick: CancellationToken::new(),
            reason: OnceLock::new(),
            grace,
            metrics,
        });
        (Outbound { tx, shared }, rx)
    }

    /// Offers a frame. Returns `false` if it was not queued.
    pub fn push(&self, frame: OutFrame, volatile: bool) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => {
                if self.shared.full_since_ms.load(Ordering::Relaxed) != 0 {
                    self.shared.full_since_ms.store(0, Ordering::Relaxed);
                }
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if volatile {
                    self.shared.metrics.queue_drops.inc();
                    let now = self.shared.epoch.elapsed().as_millis() as u64 + 1;
                    let since = self.shared.full_since_ms.load(Ordering::Relaxed);
                    if since == 0 {
                        self.shared.full_since_ms.store(now, Ordering::Relaxed);
                    } else if Duration::from_millis(now - since) > self.shared.grace {
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
        let (out, _rx) = Outbound::new(2, Duration::from_millis(30), m.clone());
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
        let (out, mut rx) = Outbound::new(1, Duration::from_secs(60), m.clone());
        assert!(out.push(text("a"), false));
        assert!(!out.push(text("b"), false));
        assert_eq!(out.kicked().await, Kick::SlowConsumer);
        assert!(matches!(rx.recv().await, Some(OutFrame::Text(t)) if t.as_str() == "a"));
    }

    #[tokio::test]
    async fn room_again_resets_the_grace() {
        let m = Metrics::new([]);
        let (out, mut rx) = Outbound::new(1, Duration::from_millis(30), m.clone());
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
