//! Graceful drain. On SIGTERM the node turns `/health` to 503 and refuses
//! new upgrades, waits for the load balancer to notice, closes its sockets
//! spread over a window (so their reconnects do not land on the other nodes
//! as one storm), and exits by a deadline.
//!
//! axum does not track upgraded WebSocket connections for graceful
//! shutdown (axum#3003), so every connection task is spawned on the
//! [`TaskTracker`] here and shutdown waits on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug)]
struct Inner {
    draining: AtomicBool,
    close: CancellationToken,
    tracker: TaskTracker,
    window: Duration,
}

/// Drain state shared by the HTTP handlers and every connection.
#[derive(Debug, Clone)]
pub struct Drain(Arc<Inner>);

impl Drain {
    /// Serving; sockets will be closed over `window` when asked.
    pub fn new(window: Duration) -> Self {
        Drain(Arc::new(Inner {
            draining: AtomicBool::new(false),
            close: CancellationToken::new(),
            tracker: TaskTracker::new(),
            window,
        }))
    }

    /// Whether the node is draining (`/health` 503, upgrades refused).
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// Starts draining.
    pub fn begin(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }

    /// Tells every connection to close within the window.
    pub fn close_sockets(&self) {
        self.0.close.cancel();
    }

    /// Resolves once sockets must close; gives this connection's delay
    /// within the window.
    pub async fn closing(&self) -> Duration {
        self.0.close.cancelled().await;
        if self.0.window.is_zero() {
            Duration::ZERO
        } else {
            rand::rng().random_range(Duration::ZERO..self.0.window)
        }
    }

    /// Where connection tasks are spawned.
    pub fn tracker(&self) -> &TaskTracker {
        &self.0.tracker
    }
}
