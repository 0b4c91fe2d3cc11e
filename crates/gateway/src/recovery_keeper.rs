//! Keeps the recovery records of this node's live sessions alive.
//!
//! A record's TTL is the recovery window plus a margin of two refresh
//! intervals; while its connection lives, this task extends it every
//! interval — a quarter of the window (30 s by default), not every
//! presence refresh: each refresh costs Redis one command per session, so
//! it is done as rarely as the window allows. When the node dies nothing
//! extends it any more, so the session stays recoverable for at most the
//! window and two intervals after the node's last refresh, and no longer:
//! no record outlives a dead node for good.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::app::App;

/// Runs until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let cfg = &app.config;
    let every = interval(cfg.recovery_window, cfg.presence_refresh);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ttl = record_ttl(cfg);
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

/// The TTL of a live session's recovery record.
pub fn record_ttl(cfg: &crate::config::Config) -> std::time::Duration {
    cfg.recovery_window + interval(cfg.recovery_window, cfg.presence_refresh) * 2
}

/// How often records are extended: a quarter of the window, never more
/// often than presence is refreshed.
fn interval(
    window: std::time::Duration,
    presence_refresh: std::time::Duration,
) -> std::time::Duration {
    (window / 4).max(presence_refresh)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn records_are_extended_a_quarter_window_apart() {
        let s = Duration::from_secs;
        assert_eq!(super::interval(s(120), s(5)), s(30));
        assert_eq!(super::interval(s(8), s(5)), s(5));
    }
}
