//! The lock rules of the relay table: what a lock event does, how the
//! server announces lock changes nobody relayed, and the checks a table's
//! lock rules must pass.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::RelayRule;

/// What a relayed event does to a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LockAction {
    /// Takes the lock (`LOCKED` when another user holds it); relayed only
    /// when it was free.
    Acquire,
    /// Releases the sender's lock (`NOT_LOCK_OWNER` when another user
    /// holds it); relayed only when it was held.
    Release,
    /// The thing is gone: its lock goes too, with no release announced.
    ReleaseOnDelete,
}

/// How the server announces a lock change nobody relayed: a lock released
/// for a holder that is gone, or put back after the store lost it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockAnnouncement {
    /// The event name (the rule's `emit`).
    pub emit: String,
    /// The payload field of the locked thing (the rule's `lockKey`).
    pub key: String,
    /// Whether the event log keeps it (the rule's `persist`).
    pub persist: bool,
}

/// The announcements of the table's lock rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEvents {
    /// As the acquire rule relays a lock.
    pub acquired: Option<LockAnnouncement>,
    /// As the release rule relays an unlock (the contract's `pod:unlocked`
    /// when the table has no release rule).
    pub released: LockAnnouncement,
}

pub(super) fn check_lock(r: &RelayRule) -> Result<(), String> {
    match (&r.lock, &r.lock_key) {
        (None, None) => Ok(()),
        (Some(_), Some(key)) if r.fields.contains(key) && !r.volatile => Ok(()),
        (Some(_), Some(_)) if r.volatile => Err(format!(
            "{:?}: a lock event cannot be volatile (it must reach everyone, in order)",
            r.event
        )),
        (Some(_), Some(key)) => Err(format!(
            "{:?}: lockKey {key:?} must be one of fields",
            r.event
        )),
        _ => Err(format!("{:?}: lock and lockKey go together", r.event)),
    }
}

/// The one acquire and one release rule, if any, as announcements.
pub(super) fn lock_events(rules: &HashMap<String, Arc<RelayRule>>) -> Result<LockEvents, String> {
    let one = |action: LockAction| -> Result<Option<LockAnnouncement>, String> {
        let mut found = rules.values().filter(|r| r.lock == Some(action));
        let first = found.next().map(|r| LockAnnouncement {
            emit: r.emit.clone(),
            key: r.lock_key.clone().unwrap_or_default(),
            persist: r.persist,
        });
        match found.next() {
            Some(_) => Err(format!("at most one event may have lock {action:?}")),
            None => Ok(first),
        }
    };
    Ok(LockEvents {
        acquired: one(LockAction::Acquire)?,
        released: one(LockAction::Release)?.unwrap_or_else(|| LockAnnouncement {
            emit: "pod:unlocked".into(),
            key: "podId".into(),
            persist: false,
        }),
    })
}
