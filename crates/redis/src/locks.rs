//! Pod locks in Redis (the rules are in `flowgate_engine::locks`).
//!
//! Per room, under the room's hash tag (`keys::lock_keys`): a hash of
//! locks (pod → user, lock time, holding sockets), the holders' owners and
//! expiries, and an epoch. Every change is one Lua script over those keys,
//! so concurrent attempts on any nodes have exactly one winner.
//!
//! **Expiry and the sweep.** A holder's expiry is Redis time: extended by
//! its live connection, cut to the recovery window when the connection is
//! lost, set to now by the reaper when its node dies. A global sorted set
//! (`keys::LOCKS_DUE_KEY`) lists rooms with holders by the earliest time
//! one may expire. It may be early, never late: each change that can make
//! a holder expire sooner lowers it (`ZADD LT`), refreshes leave it alone,
//! and the sweep re-scores a room after visiting it. The sweep runs on one
//! node per heartbeat (a short `SET NX` claim) and visits only due rooms,
//! so its cost follows the rooms whose holders may be gone, not every room
//! with locks.
//!
//! **A Redis restart** empties everything. The epoch (a random value set
//! when the room's first lock was taken) is gone too, which tells each
//! holder's connection at its next refresh that the store lost the locks,
//! not that someone released them: it puts its locks back if still free.

use std::time::Duration;

use async_trait::async_trait;
use flowgate_engine::{
    now_us, Acquired, EngineError, LockHolder, LockInfo, PodLocks, Refreshed, Unlocked,
};
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::sorted_sets::Ordering;
use fred::types::{Expiration, SetOptions};
use tracing::{debug, warn};

use crate::keys::{lock_keys, LOCKS_DUE_KEY, LOCKS_SWEEP_KEY};
use crate::{err, RedisEngine};

/// How long a room's epoch outlives its last lock activity; any holder
/// refreshes it long before.
const EPOCH_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Due rooms visited per sweep at most; the rest wait one heartbeat.
const SWEEP_BATCH: usize = 500;

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

fn parse_infos(list: Vec<String>) -> Vec<LockInfo> {
    let mut out: Vec<LockInfo> = list
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    out.sort_by(|a, b| (&a.locked_at, &a.pod_id).cmp(&(&b.locked_at, &b.pod_id)));
    out
}

impl RedisEngine {
    /// A value no earlier generation of a room's locks had.
    fn fresh_epoch(&self) -> String {
        format!("{}-{}", self.0.settings.node_id, now_us())
    }

    /// The room may have a holder expiring at `expiry` (Redis ms): make
    /// sure the sweep visits it by then.
    async fn due_by(&self, room: &str, expiry: &str) {
        let Ok(at) = expiry.parse::<f64>() else {
            return;
        };
        let r: Result<i64, _> = self
            .0
            .client
            .zadd(
                LOCKS_DUE_KEY,
                None,
                Some(Ordering::LessThan),
                false,
                false,
                (at, room.to_owned()),
            )
            .await;
        if let Err(e) = r {
            warn!(room, error = %e, "lock sweep schedule not updated");
        }
    }

    async fn run(
        &self,
        script: &Script,
        room: &str,
        args: Vec<String>,
    ) -> Result<Value, EngineError> {
        self.ensure_up()?;
        script
            .evalsha_with_reload(&self.0.client, lock_keys(room), args)
            .await
            .map_err(err)
    }

    /// The reaper's hook: the holder `socket_id` owned by the dead `node`
    /// expires now, so the next sweep releases its locks.
    pub(crate) async fn expire_lock_holder(&self, room: &str, socket_id: &str, node: &str) {
        let args = vec![socket_id.to_owned(), format!("{node}/"), "0".to_owned()];
        match self.run(&self.0.scripts.locks.suspend, room, args).await {
            Ok(v) => {
                if let Some(exp) = v.as_string() {
                    self.due_by(room, &exp).await;
                }
            }
            Err(e) => warn!(room, error = %e, "a dead node's lock holder not expired"),
        }
    }

    /// One due room: release its expired holders and re-score it.
    async fn sweep_room(&self, room: &str) -> Result<Vec<LockInfo>, EngineError> {
        let mut reply: Vec<String> = convert(
            self.run(&self.0.scripts.locks.sweep, room, Vec::new())
                .await?,
        )?;
        let next = if reply.is_empty() {
            String::new()
        } else {
            reply.remove(0)
        };
        let c = &self.0.client;
        let r: Result<i64, _> = match next.parse::<f64>() {
            Ok(at) => {
                c.zadd(
                    LOCKS_DUE_KEY,
                    None,
                    None,
                    false,
                    false,
                    (at, room.to_owned()),
                )
                .await
            }
            Err(_) => c.zrem(LOCKS_DUE_KEY, room.to_owned()).await,
        };
        if let Err(e) = r {
            warn!(room, error = %e, "lock sweep schedule not updated");
        }
        // A holder that expires sooner may have been added between the
        // script and the re-score: lower the score again if so.
        let first: Vec<String> = c
            .zrange(lock_keys(room)[2].clone(), 0, 0, None, false, None, true)
            .await
            .map_err(err)?;
        if let Some(exp) = first.get(1) {
            self.due_by(room, exp).await;
        }
        Ok(parse_infos(reply))
    }
}

fn convert<T: FromValue>(v: Value) -> Result<T, EngineError> {
    v.convert().map_err(err)
}

#[async_trait]
impl PodLocks for RedisEngine {
    async fn acquire(
        &self,
        room: &str,
        pod: &str,
        holder: &LockHolder,
        locked_at: &str,
        ttl: Duration,
    ) -> Result<Acquired, EngineError> {
        let args = vec![
            pod.to_owned(),
            holder.user_id.clone(),
            holder.socket_id.clone(),
            holder.owner.clone(),
            locked_at.to_owned(),
            ms(ttl),
            self.fresh_epoch(),
            EPOCH_TTL_MS.to_string(),
        ];
        let r: Vec<String> = convert(self.run(&self.0.scripts.locks.acquire, room, args).await?)?;
        match r.as_slice() {
            [s, by] if s == "locked" => Ok(Acquired::Locked { by: by.clone() }),
            [s, epoch, at, exp] => {
                self.due_by(room, exp).await;
                Ok(if s == "taken" {
                    Acquired::Taken {
                        epoch: epoch.clone(),
                    }
                } else {
                    Acquired::AlreadyHeld {
                        epoch: epoch.clone(),
                        locked_at: at.clone(),
                    }
                })
            }
            _ => Err(EngineError("unexpected lock reply".into())),
        }
    }

    async fn unlock(&self, room: &str, pod: &str, user_id: &str) -> Result<Unlocked, EngineError> {
        let args = vec![pod.to_owned(), user_id.to_owned()];
        let r: String = convert(self.run(&self.0.scripts.locks.unlock, room, args).await?)?;
        Ok(match r.as_str() {
            "released" => Unlocked::Released,
            "notowner" => Unlocked::NotOwner,
            _ => Unlocked::NotHeld,
        })
    }

    async fn remove(&self, room: &str, pod: &str) -> Result<Option<LockInfo>, EngineError> {
        let r: Option<String> = convert(
            self.run(&self.0.scripts.locks.remove, room, vec![pod.to_owned()])
                .await?,
        )?;
        Ok(r.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn release_session(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Vec<LockInfo>, EngineError> {
        let args = vec![socket_id.to_owned(), owner.to_owned()];
        let r = self
            .run(&self.0.scripts.locks.release_session, room, args)
            .await?;
        Ok(parse_infos(convert(r)?))
    }

    async fn release_user(&self, room: &str, user_id: &str) -> Result<Vec<LockInfo>, EngineError> {
        let r = self
            .run(
                &self.0.scripts.locks.release_user,
                room,
                vec![user_id.to_owned()],
            )
            .await?;
        Ok(parse_infos(convert(r)?))
    }

    async fn suspend(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
        window: Duration,
    ) -> Result<(), EngineError> {
        let args = vec![socket_id.to_owned(), owner.to_owned(), ms(window)];
        let r = self.run(&self.0.scripts.locks.suspend, room, args).await?;
        if let Some(exp) = r.as_string() {
            self.due_by(room, &exp).await;
        }
        Ok(())
    }

    async fn adopt(
        &self,
        room: &str,
        holder: &LockHolder,
        ttl: Duration,
    ) -> Result<(String, Vec<(String, String)>), EngineError> {
        let args = vec![holder.socket_id.clone(), holder.owner.clone(), ms(ttl)];
        let r: Vec<String> = convert(self.run(&self.0.scripts.locks.adopt, room, args).await?)?;
        let mut it = r.into_iter();
        let (Some(epoch), Some(exp)) = (it.next(), it.next()) else {
            return Ok((String::new(), Vec::new()));
        };
        self.due_by(room, &exp).await;
        let mut held = Vec::new();
        while let (Some(pod), Some(at)) = (it.next(), it.next()) {
            held.push((pod, at));
        }
        Ok((epoch, held))
    }

    async fn refresh(
        &self,
        room: &str,
        holder: &LockHolder,
        epoch: &str,
        held: &[(String, String)],
        ttl: Duration,
    ) -> Result<Refreshed, EngineError> {
        let mut args = vec![
            holder.socket_id.clone(),
            holder.owner.clone(),
            holder.user_id.clone(),
            epoch.to_owned(),
            ms(ttl),
            self.fresh_epoch(),
            EPOCH_TTL_MS.to_string(),
        ];
        for (pod, at) in held {
            args.push(pod.clone());
            args.push(at.clone());
        }
        let r: Vec<String> = convert(self.run(&self.0.scripts.locks.refresh, room, args).await?)?;
        let [epoch, exp, n, rest @ ..] = r.as_slice() else {
            return Err(EngineError("unexpected lock refresh reply".into()));
        };
        self.due_by(room, exp).await;
        let n: usize = n.parse().unwrap_or(0).min(rest.len());
        let (dropped, restored) = rest.split_at(n);
        let restored = restored
            .iter()
            .filter_map(|pod| held.iter().find(|(p, _)| p == pod))
            .map(|(pod, at)| LockInfo {
                pod_id: pod.clone(),
                user_id: holder.user_id.clone(),
                locked_at: at.clone(),
            })
            .collect();
        Ok(Refreshed {
            epoch: epoch.clone(),
            dropped: dropped.to_vec(),
            restored,
        })
    }

    async fn list(&self, room: &str) -> Result<Vec<LockInfo>, EngineError> {
        let r = self
            .run(&self.0.scripts.locks.list, room, Vec::new())
            .await?;
        Ok(parse_infos(convert(r)?))
    }

    async fn sweep(&self) -> Result<Vec<(String, LockInfo)>, EngineError> {
        self.ensure_up()?;
        let c = &self.0.client;
        // One node sweeps per heartbeat; the others find the claim taken.
        let claimed: Option<String> = c
            .set(
                LOCKS_SWEEP_KEY,
                self.0.settings.node_id.clone(),
                Some(Expiration::PX(
                    self.0.settings.heartbeat.as_millis().max(1) as i64
                )),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(err)?;
        if claimed.is_none() {
            return Ok(Vec::new());
        }
        let rooms: Vec<String> = self
            .0
            .scripts
            .locks
            .due
            .evalsha_with_reload(c, vec![LOCKS_DUE_KEY], vec![SWEEP_BATCH.to_string()])
            .await
            .map_err(err)?;
        let mut out = Vec::new();
        for room in rooms {
            match self.sweep_room(&room).await {
                Ok(freed) => out.extend(freed.into_iter().map(|l| (room.clone(), l))),
                Err(e) => debug!(room, error = %e, "lock sweep of a room failed"),
            }
        }
        Ok(out)
    }
}
