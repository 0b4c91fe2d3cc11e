//! The session's side of pod locks (the rules are in
//! `flowgate_engine::locks`): the relay table's lock rules before and after
//! a relay, `flow:locks` to a joiner, and the socket's locks over its life.
//!
//! The socket remembers which pods it holds ([`HeldLocks`], in its
//! [`Joined`](super::Joined) state, not in a node-wide map): its connection
//! refreshes them every presence-refresh interval from its own timer, which
//! keeps the holder alive in the store and puts back what a Redis restart
//! lost. Leaving the flow (on purpose, for another flow, or evicted) and an
//! unrecoverable end release them at once; a recoverable end only cuts
//! their life to the recovery window, and a recovery adopts them again.
//! What the store releases on its own (expired holders, dead nodes) the
//! node's sweep announces; all announcements are in [`crate::lock_keeper`].

use std::time::Instant;

use serde_json::Value;
use tracing::{debug, info};

use super::{Refusal, Session};
use crate::app::App;
use crate::engine::{Acquired, LockHolder, Unlocked, INTEGER_POD};
use crate::events::{LockAction, RelayRule};
use crate::ids::iso_now;

/// Pods one socket may hold at once. Far above what a person drags; it
/// bounds what one client can make the store and every refresh carry.
pub(crate) const MAX_HELD: usize = 100;

/// The pods one socket holds in its flow.
#[derive(Debug, Default)]
pub(crate) struct HeldLocks {
    /// The store's generation of the room's locks when last seen.
    epoch: String,
    /// (pod, lock time), in the order they were taken.
    pods: Vec<(String, String)>,
    /// When the connection refreshes them next; `None` while none is held.
    next_refresh: Option<Instant>,
}

impl HeldLocks {
    fn add(&mut self, pod: &str, locked_at: &str, epoch: &str, next: Instant) {
        if !self.pods.iter().any(|(p, _)| p == pod) {
            self.pods.push((pod.to_owned(), locked_at.to_owned()));
        }
        self.epoch = epoch.to_owned();
        self.next_refresh.get_or_insert(next);
    }

    fn remove(&mut self, pod: &str) {
        self.pods.retain(|(p, _)| p != pod);
        if self.pods.is_empty() {
            self.next_refresh = None;
        }
    }

    /// Whether the socket holds `pod`, as far as it knows.
    #[cfg(test)]
    pub(crate) fn holds(&self, pod: &str) -> bool {
        self.pods.iter().any(|(p, _)| p == pod)
    }
}

/// What a lock rule decided before the relay.
#[derive(Debug)]
pub(crate) enum LockStep {
    /// Not a lock rule: relay as usual.
    None,
    /// Acked, nothing relayed (re-lock, unlock of a free pod).
    Skip,
    /// Taken: relay, then remember it (or give it back if the relay failed).
    Took {
        pod: String,
        locked_at: String,
        epoch: String,
    },
    /// Released or deleted: relay, and forget it.
    Gone { pod: String },
}

/// The lock key of a payload: a string of 1-256 characters (no NUL), or
/// an integer, keyed with [`INTEGER_POD`] in front so that its events give
/// it back as an integer.
fn lock_key(payload: Option<&Value>, key: &str) -> Result<String, Refusal> {
    match payload.and_then(|p| p.get(key)) {
        Some(Value::String(s))
            if !s.is_empty() && s.chars().count() <= 256 && !s.contains(INTEGER_POD) =>
        {
            Ok(s.clone())
        }
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(format!("{INTEGER_POD}{n}")),
        _ => Err(Refusal::new(
            "INVALID_PAYLOAD",
            format!("{key} must be a string of 1-256 characters or an integer"),
        )),
    }
}

fn unavailable(app: &App, e: &crate::engine::EngineError, room: &str) -> Refusal {
    app.metrics
        .engine_failed("locks", e, room, "lock store unavailable");
    Refusal::new("UNAVAILABLE", "Locks are unavailable; try again")
}

impl Session {
    /// This socket as a lock holder.
    fn lock_holder(&self) -> Option<LockHolder> {
        let s = self.socket.as_ref()?;
        Some(LockHolder {
            user_id: s.user_id.to_string(),
            socket_id: s.id.to_string(),
            owner: s.owner.to_string(),
        })
    }

    /// This socket as a lock holder, and its room.
    fn holder(&self) -> Option<(LockHolder, std::sync::Arc<str>)> {
        let room = self.socket.as_ref()?.flow.as_ref()?.room.clone();
        Some((self.lock_holder()?, room))
    }

    fn held_mut(&mut self) -> Option<&mut HeldLocks> {
        Some(&mut self.socket.as_mut()?.flow.as_mut()?.locks)
    }

    /// A lock rule's decision, before anything is relayed.
    pub(crate) async fn lock_step(
        &mut self,
        rule: &RelayRule,
        payload: Option<&Value>,
    ) -> Result<LockStep, Refusal> {
        let (Some(action), Some(key)) = (rule.lock, rule.lock_key.as_deref()) else {
            return Ok(LockStep::None);
        };
        let (holder, room) = self
            .holder()
            .ok_or_else(|| Refusal::new("NOT_IN_FLOW", "Join a flow first"))?;
        // The whole payload is checked first: a lock must not change for
        // an event that is then refused.
        rule.build(payload, "", "", "")
            .map_err(|e| Refusal::new("INVALID_PAYLOAD", e.0))?;
        let pod = lock_key(payload, key)?;
        let app = self.app.clone();
        let locks = &app.engine.locks;
        match action {
            LockAction::Acquire => {
                let full = self.held_mut().is_some_and(|h| {
                    h.pods.len() >= MAX_HELD && !h.pods.iter().any(|(p, _)| *p == pod)
                });
                if full {
                    return Err(Refusal::new(
                        "LOCKED",
                        format!("Too many pods locked at once (at most {MAX_HELD})"),
                    ));
                }
                let at = iso_now();
                let ttl = app.config.session_ttl;
                match locks.acquire(&room, &pod, &holder, &at, ttl).await {
                    Ok(Acquired::Taken { epoch }) => Ok(LockStep::Took {
                        pod,
                        locked_at: at,
                        epoch,
                    }),
                    Ok(Acquired::AlreadyHeld { epoch, locked_at }) => {
                        let next = Instant::now() + app.config.presence_refresh;
                        if let Some(h) = self.held_mut() {
                            h.add(&pod, &locked_at, &epoch, next);
                        }
                        Ok(LockStep::Skip)
                    }
                    Ok(Acquired::Locked { .. }) => {
                        Err(Refusal::new("LOCKED", "The pod is locked by another user"))
                    }
                    Err(e) => Err(unavailable(&app, &e, &room)),
                }
            }
            LockAction::Release => match locks.unlock(&room, &pod, &holder.user_id).await {
                Ok(Unlocked::Released) => Ok(LockStep::Gone { pod }),
                Ok(Unlocked::NotHeld) => {
                    if let Some(h) = self.held_mut() {
                        h.remove(&pod);
                    }
                    Ok(LockStep::Skip)
                }
                Ok(Unlocked::NotOwner) => Err(Refusal::new(
                    "NOT_LOCK_OWNER",
                    "The pod is locked by another user",
                )),
                Err(e) => Err(unavailable(&app, &e, &room)),
            },
            LockAction::ReleaseOnDelete => match locks.remove(&room, &pod).await {
                Ok(_) => Ok(LockStep::Gone { pod }),
                Err(e) => Err(unavailable(&app, &e, &room)),
            },
        }
    }

    /// After the relay: remember a lock taken, forget one gone; a lock
    /// taken for an event that was not relayed is given back, so nobody
    /// holds a lock the room was never told about.
    pub(crate) async fn lock_done(&mut self, step: LockStep, relayed: bool) {
        let next = Instant::now() + self.app.config.presence_refresh;
        match step {
            LockStep::Took {
                pod,
                locked_at,
                epoch,
            } => {
                if relayed {
                    if let Some(h) = self.held_mut() {
                        h.add(&pod, &locked_at, &epoch, next);
                    }
                } else if let Some((holder, room)) = self.holder() {
                    let _ = self
                        .app
                        .engine
                        .locks
                        .unlock(&room, &pod, &holder.user_id)
                        .await;
                }
            }
            LockStep::Gone { pod } => {
                if let Some(h) = self.held_mut() {
                    h.remove(&pod);
                }
            }
            LockStep::None | LockStep::Skip => {}
        }
    }

    /// `flow:locks` to this client: every lock of `room`.
    pub(crate) async fn emit_flow_locks(&mut self, room: &str) {
        match self.app.engine.locks.list(room).await {
            Ok(locks) => {
                let v = serde_json::to_value(&locks).unwrap_or_default();
                self.emit("flow:locks", &v);
            }
            // The join itself succeeded; the client keeps what it knew.
            Err(e) => self
                .app
                .metrics
                .engine_failed("locks", &e, room, "flow:locks not sent"),
        }
    }

    /// Leaving the flow for good: the socket's locks are released now.
    pub(crate) async fn release_locks(&self, room: &str, socket_id: &str) {
        let owner = self.owner();
        match self
            .app
            .engine
            .locks
            .release_session(room, socket_id, owner)
            .await
        {
            Ok(freed) => crate::lock_keeper::announce_released(&self.app, room, &freed).await,
            Err(e) => {
                self.app
                    .metrics
                    .engine_failed("locks", &e, room, "locks not released; they expire")
            }
        }
    }

    /// The connection ends recoverably: the socket's locks live for the
    /// recovery window, unless the session is recovered.
    pub(crate) async fn suspend_locks(&self) {
        let Some((holder, room)) = self.holder() else {
            return;
        };
        let window = self.app.config.recovery_window;
        if let Err(e) = self
            .app
            .engine
            .locks
            .suspend(&room, &holder.socket_id, &holder.owner, window)
            .await
        {
            debug!(error = %e, "locks not suspended; they expire with the holder's TTL");
        }
    }

    /// The locks this session's socket left in `room` when its connection
    /// was lost are taken over by this connection and released at once,
    /// announced as `released`: the session was recovered without its flow
    /// (membership revoked while away, as a revocation of a connected
    /// member does) or is given up for a new one. They would otherwise
    /// stay until the recovery window ran out.
    pub(crate) async fn release_lost_locks(&self, room: &str) {
        let Some(holder) = self.lock_holder() else {
            return;
        };
        let app = &self.app;
        if let Err(e) = app
            .engine
            .locks
            .adopt(room, &holder, app.config.session_ttl)
            .await
        {
            app.metrics
                .engine_failed("locks", &e, room, "locks not released; they expire");
            return;
        }
        self.release_locks(room, &holder.socket_id).await;
    }

    /// A recovered session takes its locks back.
    pub(crate) async fn adopt_locks(&mut self) {
        let Some((holder, room)) = self.holder() else {
            return;
        };
        let app = self.app.clone();
        match app
            .engine
            .locks
            .adopt(&room, &holder, app.config.session_ttl)
            .await
        {
            Ok((epoch, held)) => {
                let next = Instant::now() + app.config.presence_refresh;
                if let Some(h) = self.held_mut() {
                    for (pod, at) in &held {
                        h.add(pod, at, &epoch, next);
                    }
                }
                if !held.is_empty() {
                    info!(room = %room, locks = held.len(), "recovered session keeps its locks");
                }
            }
            Err(e) => {
                app.metrics
                    .engine_failed("locks", &e, &room, "locks not adopted; they expire")
            }
        }
    }

    /// When the socket's locks are refreshed next.
    pub(crate) fn locks_deadline(&self) -> Option<Instant> {
        self.socket.as_ref()?.flow.as_ref()?.locks.next_refresh
    }

    /// The refresh timer: keeps the holder alive, drops what others
    /// released, puts back (and announces) what the store lost.
    pub(crate) async fn on_locks_timer(&mut self, now: Instant) {
        if self.locks_deadline().is_none_or(|t| t > now) {
            return;
        }
        let app = self.app.clone();
        let Some((holder, room)) = self.holder() else {
            return;
        };
        let (epoch, pods) = match self.held_mut() {
            Some(h) => {
                h.next_refresh = Some(now + app.config.presence_refresh);
                (h.epoch.clone(), h.pods.clone())
            }
            None => return,
        };
        let r = app
            .engine
            .locks
            .refresh(&room, &holder, &epoch, &pods, app.config.session_ttl)
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "locks not refreshed; retrying at the next interval");
                return;
            }
        };
        if let Some(h) = self.held_mut() {
            h.epoch = r.epoch;
            for pod in &r.dropped {
                h.remove(pod);
            }
        }
        if !r.restored.is_empty() {
            info!(room = %room, locks = r.restored.len(), "locks the store lost are back");
            crate::lock_keeper::announce_restored(&app, &room, &r.restored).await;
        }
    }
}
