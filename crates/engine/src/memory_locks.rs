//! Pod locks of the in-memory engine: the same rules as the Redis engine
//! (see [`crate::locks`]), in one map shared by the nodes of a hub. The
//! store never loses data, so its lock generation never changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::locks::{Acquired, LockHolder, LockInfo, PodLocks, Refreshed, Unlocked};
use crate::{owns, EngineError};

/// The one generation of a store that never loses its data.
const EPOCH: &str = "memory";

#[derive(Debug)]
struct Lock {
    user_id: String,
    locked_at: String,
    /// Sockets keeping it, in the order they asked.
    holders: Vec<String>,
}

#[derive(Debug, Default)]
struct RoomLocks {
    locks: HashMap<String, Lock>,
    /// Holding socket → (owner, expiry).
    holders: HashMap<String, (String, Instant)>,
}

impl RoomLocks {
    fn info(pod: &str, l: &Lock) -> LockInfo {
        LockInfo {
            pod_id: pod.to_owned(),
            user_id: l.user_id.clone(),
            locked_at: l.locked_at.clone(),
        }
    }

    /// Removes `sid` from every lock; returns the locks it freed.
    fn drop_holder(&mut self, sid: &str) -> Vec<LockInfo> {
        self.holders.remove(sid);
        let mut freed = Vec::new();
        self.locks.retain(|pod, l| {
            l.holders.retain(|h| h != sid);
            if l.holders.is_empty() {
                freed.push(Self::info(pod, l));
                false
            } else {
                true
            }
        });
        freed.sort_by(|a, b| (&a.locked_at, &a.pod_id).cmp(&(&b.locked_at, &b.pod_id)));
        freed
    }

    /// Removes a lock and forgets holders that hold nothing else.
    fn remove(&mut self, pod: &str) -> Option<LockInfo> {
        let l = self.locks.remove(pod)?;
        for h in &l.holders {
            if !self.locks.values().any(|o| o.holders.contains(h)) {
                self.holders.remove(h);
            }
        }
        Some(Self::info(pod, &l))
    }

    fn owned_by(&self, sid: &str, owner: &str) -> bool {
        self.holders.get(sid).is_some_and(|(o, _)| owns(owner, o))
    }
}

/// The locks of every room of a hub.
#[derive(Debug, Default)]
pub struct MemoryLocks {
    rooms: Mutex<HashMap<String, RoomLocks>>,
}

impl MemoryLocks {
    fn with<T>(&self, room: &str, f: impl FnOnce(&mut RoomLocks) -> T) -> T {
        let mut rooms = self.rooms.lock();
        let r = rooms.entry(room.to_owned()).or_default();
        let out = f(r);
        if r.locks.is_empty() && r.holders.is_empty() {
            rooms.remove(room);
        }
        out
    }
}

#[async_trait]
impl PodLocks for MemoryLocks {
    async fn acquire(
        &self,
        room: &str,
        pod: &str,
        holder: &LockHolder,
        locked_at: &str,
        ttl: Duration,
    ) -> Result<Acquired, EngineError> {
        Ok(self.with(room, |r| {
            let until = Instant::now() + ttl;
            match r.locks.get_mut(pod) {
                Some(l) if l.user_id != holder.user_id => Acquired::Locked {
                    by: l.user_id.clone(),
                },
                Some(l) => {
                    if !l.holders.contains(&holder.socket_id) {
                        l.holders.push(holder.socket_id.clone());
                    }
                    let locked_at = l.locked_at.clone();
                    r.holders
                        .insert(holder.socket_id.clone(), (holder.owner.clone(), until));
                    Acquired::AlreadyHeld {
                        epoch: EPOCH.into(),
                        locked_at,
                    }
                }
                None => {
                    r.locks.insert(
                        pod.to_owned(),
                        Lock {
                            user_id: holder.user_id.clone(),
                            locked_at: locked_at.to_owned(),
                            holders: vec![holder.socket_id.clone()],
                        },
                    );
                    r.holders
                        .insert(holder.socket_id.clone(), (holder.owner.clone(), until));
                    Acquired::Taken {
                        epoch: EPOCH.into(),
                    }
                }
            }
        }))
    }

    async fn unlock(&self, room: &str, pod: &str, user_id: &str) -> Result<Unlocked, EngineError> {
        Ok(self.with(room, |r| match r.locks.get(pod) {
            None => Unlocked::NotHeld,
            Some(l) if l.user_id != user_id => Unlocked::NotOwner,
            Some(_) => {
                r.remove(pod);
                Unlocked::Released
            }
        }))
    }

    async fn remove(&self, room: &str, pod: &str) -> Result<Option<LockInfo>, EngineError> {
        Ok(self.with(room, |r| r.remove(pod)))
    }

    async fn release_session(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Vec<LockInfo>, EngineError> {
        Ok(self.with(room, |r| {
            if r.owned_by(socket_id, owner) {
                r.drop_holder(socket_id)
            } else {
                Vec::new()
            }
        }))
    }

    async fn release_user(&self, room: &str, user_id: &str) -> Result<Vec<LockInfo>, EngineError> {
        Ok(self.with(room, |r| {
            let mut pods: Vec<String> = r
                .locks
                .iter()
                .filter(|(_, l)| l.user_id == user_id)
                .map(|(p, _)| p.clone())
                .collect();
            pods.sort();
            pods.iter().filter_map(|p| r.remove(p)).collect()
        }))
    }

    async fn suspend(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
        window: Duration,
    ) -> Result<(), EngineError> {
        self.with(room, |r| {
            if let Some((o, until)) = r.holders.get_mut(socket_id) {
                if owns(owner, o) {
                    *until = Instant::now() + window;
                }
            }
        });
        Ok(())
    }

    async fn adopt(
        &self,
        room: &str,
        holder: &LockHolder,
        ttl: Duration,
    ) -> Result<(String, Vec<(String, String)>), EngineError> {
        Ok(self.with(room, |r| {
            let Some(entry) = r.holders.get_mut(&holder.socket_id) else {
                return (EPOCH.into(), Vec::new());
            };
            *entry = (holder.owner.clone(), Instant::now() + ttl);
            let mut held: Vec<(String, String)> = r
                .locks
                .iter()
                .filter(|(_, l)| l.holders.contains(&holder.socket_id))
                .map(|(p, l)| (p.clone(), l.locked_at.clone()))
                .collect();
            held.sort();
            (EPOCH.into(), held)
        }))
    }

    async fn refresh(
        &self,
        room: &str,
        holder: &LockHolder,
        _epoch: &str,
        held: &[(String, String)],
        ttl: Duration,
    ) -> Result<Refreshed, EngineError> {
        Ok(self.with(room, |r| {
            let mine = r.owned_by(&holder.socket_id, &holder.owner);
            let dropped = held
                .iter()
                .filter(|(pod, _)| {
                    !mine
                        || !r
                            .locks
                            .get(pod)
                            .is_some_and(|l| l.holders.contains(&holder.socket_id))
                })
                .map(|(pod, _)| pod.clone())
                .collect();
            if mine {
                if let Some(e) = r.holders.get_mut(&holder.socket_id) {
                    e.1 = Instant::now() + ttl;
                }
            }
            Refreshed {
                epoch: EPOCH.into(),
                dropped,
                restored: Vec::new(),
            }
        }))
    }

    async fn list(&self, room: &str) -> Result<Vec<LockInfo>, EngineError> {
        let rooms = self.rooms.lock();
        let mut out: Vec<LockInfo> = rooms
            .get(room)
            .map(|r| r.locks.iter().map(|(p, l)| RoomLocks::info(p, l)).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| (&a.locked_at, &a.pod_id).cmp(&(&b.locked_at, &b.pod_id)));
        Ok(out)
    }

    async fn sweep(&self) -> Result<Vec<(String, LockInfo)>, EngineError> {
        let now = Instant::now();
        let mut rooms = self.rooms.lock();
        let mut out = Vec::new();
        for (room, r) in rooms.iter_mut() {
            let expired: Vec<String> = r
                .holders
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(sid, _)| sid.clone())
                .collect();
            for sid in expired {
                out.extend(r.drop_holder(&sid).into_iter().map(|l| (room.clone(), l)));
            }
        }
        rooms.retain(|_, r| !r.locks.is_empty() || !r.holders.is_empty());
        Ok(out)
    }
}
