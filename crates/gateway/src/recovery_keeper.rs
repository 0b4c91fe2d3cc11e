//! Keeps the recovery records of this node's live sessions alive.
//!
//! A record's TTL is the recovery window plus a margin; while its
//! connection lives, this task extends it every presence-refresh interval.
//! When the node dies nothing extends it any more, so the session stays
//! recoverable for one window after the node's last refresh, and no
//! longer: no record outlives a dead node for good.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::app::App;

/// Runs until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let cfg = &app.config;
    let mut tick = tokio::time::interval(cfg.presence_refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl = cfg.recovery_window + cfg.presence_refresh * 2;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pids = app.rooms.local_pids();
        if pids.is_empty() {
            continue;
        }
        if let Err(e) = app.engine.sessions.refresh(&pids, ttl).await {
            debug!(error = %e, sessions = pids.len(), "recovery records not refreshed");
        }
    }
}
