//! Releases the pod locks of holders that are gone for good, and tells
//! their rooms; and every announcement of a lock change that no client
//! event relayed (released for a holder that is gone, put back after the
//! store lost it).
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

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::app::App;
use crate::engine::locks::{lock_payload, released_payload};
use crate::engine::{LockInfo, QueuedEvent, RoomMessage};
use crate::events::LockAnnouncement;
use crate::ids::iso_now;

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
                    announce_released(&app, &room, std::slice::from_ref(&lock)).await;
                }
            }
            Err(e) => debug!(error = %e, "lock sweep failed; retrying at the next interval"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announce {
    Released,
    Restored,
}

/// `pod:unlocked {…, reason: "released"}` to the room for each lock
/// released for a holder that is gone.
pub(crate) async fn announce_released(app: &App, room: &str, locks: &[LockInfo]) {
    announce(app, room, locks, Announce::Released).await;
}

async fn announce(app: &App, room: &str, locks: &[LockInfo], what: Announce) {
    let events = app.table.lock_events();
    let a: &LockAnnouncement = match what {
        Announce::Released => &events.released,
        Announce::Restored => match &events.acquired {
            Some(a) => a,
            None => return,
        },
    };
    for lock in locks {
        let now = iso_now();
        let data: Map<String, Value> = match what {
            Announce::Released => released_payload(&a.key, lock, &now),
            Announce::Restored => lock_payload(&a.key, lock, &now),
        };
        let data = crate::engine::raw_json(&Value::Object(data));
        let logged = (a.persist && app.store.is_some()).then(|| data.clone());
        let offset = match app
            .engine
            .bus
            .publish(room, RoomMessage::with_raw(a.emit.clone(), data))
            .await
        {
            Ok(o) => o,
            Err(e) => {
                warn!(room, pod = ?lock.pod_id, error = %e, "lock change not announced");
                continue;
            }
        };
        if let (Some(data), Some(offset)) = (logged, offset) {
            let queued = QueuedEvent {
                flow_id: room.strip_prefix("flow:").unwrap_or(room).to_owned(),
                offset: offset.to_string(),
                event: a.emit.clone(),
                data,
                user_id: Some(lock.user_id.clone()),
            };
            if let Err(e) = crate::eventlog::enqueue(app, &queued).await {
                warn!(room, error = %e, "lock change not queued for the event log");
            }
        }
    }
}

/// Locks the store had lost and a holder put back, announced again as
/// taken, for members that joined meanwhile.
pub(crate) async fn announce_restored(app: &App, room: &str, locks: &[LockInfo]) {
    announce(app, room, locks, Announce::Restored).await;
}

/// A revoked membership: every lock of `user_id` in `room` is released and
/// announced, whether or not the user is connected anywhere.
pub(crate) async fn release_user_locks(app: &App, room: &str, user_id: &str) {
    match app.engine.locks.release_user(room, user_id).await {
        Ok(freed) => announce_released(app, room, &freed).await,
        Err(e) => app
            .metrics
            .engine_failed("locks", &e, room, "revoked user's locks not released"),
    }
}
