//! Releases the pod locks of holders that are gone for good, and tells
//! their rooms.
//!
//! A holder's locks outlive its connection only by the recovery window
//! (or not at all when its node died: the reaper expires them at once).
//! Nobody is left to release them then, so every node asks the engine to
//! sweep on each heartbeat interval; the engine lets one node do the work
//! per interval (see `PodLocks::sweep`), and that node announces
//! `pod:unlocked {…, reason: "released"}` for each lock freed. A lock of a
//! socket that is not recovered is thus released at most one window plus
//! one interval after its connection was lost.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::app::App;

/// Runs until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(app.config.node_heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match app.engine.locks.sweep().await {
            Ok(freed) => {
                for (room, lock) in freed {
                    crate::session::announce_released(&app, &room, std::slice::from_ref(&lock))
                        .await;
                }
            }
            Err(e) => debug!(error = %e, "lock sweep failed; retrying at the next interval"),
        }
    }
}
