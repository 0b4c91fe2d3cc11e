//! The upgrade probe: a WebSocket opened with a polling session's `sid`
//! proves it works (`2probe` → `3probe`) while polling goes on, then
//! carries the session once the client sends `5`.
//!
//! It runs in its own task, not the connection's, so the session keeps
//! being served over polling while the probe waits; only a completed probe
//! reaches the connection task (as [`Control::Upgraded`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tracing::debug;

use super::shared::{Control, Shared};

/// Runs the probe on `socket` for at most `timeout`.
pub(crate) async fn probe(mut socket: WebSocket, shared: Arc<Shared>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut probed = false;
    loop {
        let msg = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break debug!("probe socket closed"),
            Err(_) => break debug!("upgrade timed out"),
        };
        match msg {
            Message::Text(t) if t.as_str() == "2probe" && !probed => {
                let pong = Message::Text(Utf8Bytes::from_static("3probe"));
                if socket.send(pong).await.is_err() {
                    break;
                }
                probed = true;
                shared.release_poll();
            }
            Message::Text(t) if t.as_str() == "5" && probed => {
                let up = Control::Upgraded(Box::new(socket));
                if shared.control.send(up).await.is_err() {
                    debug!("session ended during the upgrade");
                }
                return;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => {
                debug!(frame = ?other, "unexpected frame on the probe socket");
                break;
            }
        }
    }
    shared.probe_failed();
    let _ = socket.close().await;
}
