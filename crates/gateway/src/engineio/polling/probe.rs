//! The upgrade probe: a WebSocket opened with a polling session's `sid`
//! proves it works (`2probe` → `3probe`) while polling goes on, then
//! carries the session once the client sends `5`.
//!
//! It runs in its own task, not the connection's, so the session keeps
//! being served over polling while the probe waits; only a completed probe
//! reaches the connection task (as [`Control::Upgraded`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::debug;

use super::shared::{Control, Shared};
use crate::engineio::ws::WsTransport;
use crate::engineio::{Incoming, Transport};

/// Runs the probe on `socket` for at most `timeout`.
pub(crate) async fn probe(mut socket: WsTransport, shared: Arc<Shared>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut probed = false;
    loop {
        let msg = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break debug!("probe socket closed"),
            Err(_) => break debug!("upgrade timed out"),
        };
        match msg {
            Incoming::Text(t) if t.as_str() == "2probe" && !probed => {
                let pong = Utf8Bytes::from_static("3probe");
                if socket.feed_text(pong).await.is_err() || socket.flush().await.is_err() {
                    break;
                }
                probed = true;
                shared.release_poll();
            }
            Incoming::Text(t) if t.as_str() == "5" && probed => {
                let up = Control::Upgraded(Box::new(socket));
                if shared.control.send(up).await.is_err() {
                    debug!("session ended during the upgrade");
                }
                return;
            }
            Incoming::Text(t) => {
                debug!(frame = t.as_str(), "unexpected text on the probe socket");
                break;
            }
            Incoming::Binary(_) => {
                debug!("unexpected binary frame on the probe socket");
                break;
            }
        }
    }
    shared.probe_failed();
    socket.close(None).await;
}
