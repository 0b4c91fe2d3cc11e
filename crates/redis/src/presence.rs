//! Presence: who is in a room. Per room a hash and an expiry sorted set
//! (see `keys::presence_keys`); this node lists its sessions in a set of its
//! own and heartbeats so the other nodes know it is alive (the reaper
//! removes the sessions of nodes that stop).
//!
//! A session's liveness is its node's heartbeat: nothing is written per
//! session while it stays, so presence costs Redis O(nodes) per heartbeat,
//! not O(sessions) (measured: one refresh script per room per node every
//! 5 s saturated Redis at 120,000 connections). The entries' expiry is a
//! backstop, three `presence_verify` intervals long, for what no node
//! removes. This node *verifies* its presence — re-registers what Redis
//! lost, removes what a failed leave left, extends the backstop — when
//! something says it may be wrong: Redis came back, the command client
//! reconnected (a failover), or the heartbeat found this node's entry gone
//! (it was reaped while frozen, or Redis lost data); and every
//! `presence_verify` (5 minutes by default) for what none of these reveal.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use flowgate_engine::{EngineError, LocalSession, Presence, RoomBus, RoomMessage, SessionInfo};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::keys::{node_sessions_key, presence_keys, NODES_KEY};
use crate::{err, RedisEngine};

impl RedisEngine {
    /// The heartbeat, alone in its task: reaping a large dead node or
    /// verifying many rooms must not delay it past `dead_after`, or the
    /// other nodes would reap this live one.
    pub(crate) async fn heartbeats(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.0.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.is_up() {
                self.heartbeat().await;
            }
        }
    }

    pub(crate) async fn heartbeat(&self) {
        let r: Result<i64, _> = self
            .0
            .scripts
            .heartbeat
            .evalsha_with_reload(
                &self.0.client,
                vec![NODES_KEY],
                vec![self.0.settings.node_id.clone()],
            )
            .await;
        match r {
            // This node was not listed: it starts, or it was reaped (it
            // was frozen or cut off past the dead-node timeout, and its
            // sessions and session set are gone), or Redis lost data.
            // Verify at the next maintenance tick.
            Ok(1) => {
                self.0.repair_node_set.store(true, Ordering::Relaxed);
                self.0.verify_presence.store(true, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "heartbeat failed"),
        }
    }

    /// The expiry of this node's presence entries: a backstop for entries
    /// no node removes, renewed at each verification.
    fn presence_ttl_ms(&self) -> i64 {
        (self.0.settings.presence_verify * 3).as_millis() as i64
    }

    /// Makes Redis agree with this node's sessions: re-registers (and
    /// announces) any that Redis lost, renews the others' backstop expiry,
    /// and removes the entries of this node's set that no local session
    /// holds (see `remove_leftovers`).
    pub(crate) async fn verify_presence(&self) {
        self.0.metrics.presence_verifications.inc();
        let sessions = self.0.sink.local_sessions();
        let c = &self.0.client;
        let ttl = self.presence_ttl_ms();
        let mut by_room: HashMap<&str, Vec<&LocalSession>> = HashMap::new();
        for l in &sessions {
            by_room.entry(l.room.as_str()).or_default().push(l);
        }
        // Sessions missing from presence mean Redis lost data: this node's
        // session set (what a survivor reaps if this node dies) is rebuilt
        // then, and after a reconnect or a reaping — not on every
        // verification, where it would cost a member per session.
        let mut lost = self.0.repair_node_set.swap(false, Ordering::Relaxed);
        for (room, list) in by_room {
            let mut args = vec![ttl.to_string()];
            args.extend(list.iter().map(|l| l.session.socket_id.clone()));
            let missing: Vec<String> = match self
                .0
                .scripts
                .refresh
                .evalsha_with_reload(c, presence_keys(room), args)
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(room, error = %e, "presence verification failed");
                    self.0.verify_presence.store(true, Ordering::Relaxed);
                    continue;
                }
            };
            lost |= !missing.is_empty();
            for sid in missing {
                let Some(l) = list.iter().find(|l| l.session.socket_id == sid) else {
                    continue;
                };
                let s = &l.session;
                // The snapshot is older than the script: a session that left
                // since (its leave is why it is missing) must not come back
                // as a ghost. A leave removes the member here before it
                // touches presence, so this check, made after the script
                // saw it missing, sees the leave.
                if !self.0.sink.is_member(room, &s.socket_id) {
                    continue;
                }
                // Announced only by the call that put it back: two
                // verifications may overlap (the pinger's on recovery and a
                // tick's after the reconnect that came with it).
                let fresh = self
                    .register(room, s, &l.owner, false)
                    .await
                    .is_ok_and(|r| r.first().is_some_and(|f| f == "1"));
                if fresh {
                    let mut joined = RoomMessage::new(
                        "user:joined",
                        serde_json::to_value(s).unwrap_or_default(),
                    );
                    joined.except = Some(s.socket_id.clone());
                    let _ = self.publish(room, joined).await;
                    debug!(room, socket = %sid, "re-registered a lost session");
                }
            }
        }
        if lost && !sessions.is_empty() {
            let members: Vec<String> = sessions
                .iter()
                .map(|l| format!("{}\n{}", l.room, l.session.socket_id))
                .collect();
            if let Err(e) = c
                .sadd::<i64, _, _>(node_sessions_key(&self.0.settings.node_id), members)
                .await
            {
                warn!(error = %e, "node session set not rebuilt; trying again");
                self.0.repair_node_set.store(true, Ordering::Relaxed);
                self.0.verify_presence.store(true, Ordering::Relaxed);
            }
        }
        self.remove_leftovers().await;
    }

    /// Entries of this node's set that no local session holds: a leave
    /// whose presence step failed (Redis unreachable or late) left them.
    /// Each is checked against the live membership after the set was read
    /// — a join adds its local member before its presence entry — and a
    /// leave racing this removal is told apart by the leave script's owner
    /// check: one of the two gets the entry and announces `user:left`.
    async fn remove_leftovers(&self) {
        let node = &self.0.settings.node_id;
        let key = node_sessions_key(node);
        let listed: Vec<String> = match self.0.client.smembers(&key).await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "node session set unreadable; leftovers wait for the next verification");
                return;
            }
        };
        let mut removed = 0u64;
        for m in listed {
            let Some((room, sid)) = m.split_once('\n') else {
                continue;
            };
            if self.0.sink.is_member(room, sid) {
                continue;
            }
            match self
                .remove_session(node, room, sid, &self.0.metrics.presence_leftovers)
                .await
            {
                Ok(true) => removed += 1,
                Ok(false) => {}
                // The entry may still be there: its set member stays, so
                // the next verification tries again.
                Err(e) => {
                    warn!(room, error = %e, "presence leftover not removed");
                    continue;
                }
            }
            let _: Result<i64, _> = self.0.client.srem(&key, m.as_str()).await;
            if self.0.sink.is_member(room, sid) {
                // It joined again (a recovery keeps its socket id) while
                // this ran: the next tick's verification puts its entry
                // and set member back, with a `user:joined`.
                self.0.repair_node_set.store(true, Ordering::Relaxed);
                self.0.verify_presence.store(true, Ordering::Relaxed);
            }
        }
        if removed > 0 {
            info!(
                sessions = removed,
                "removed presence entries left by failed leaves"
            );
        }
    }

    async fn register(
        &self,
        room: &str,
        s: &SessionInfo,
        owner: &str,
        want_members: bool,
    ) -> Result<Vec<String>, EngineError> {
        let json = serde_json::to_string(s).map_err(err)?;
        self.0
            .scripts
            .join
            .evalsha_with_reload(
                &self.0.client,
                presence_keys(room),
                vec![
                    s.socket_id.clone(),
                    json,
                    self.presence_ttl_ms().to_string(),
                    if want_members { "1" } else { "0" }.to_owned(),
                    owner.to_owned(),
                ],
            )
            .await
            .map_err(err)
    }
}

fn parse_sessions(list: Vec<String>) -> Vec<SessionInfo> {
    list.iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

#[async_trait]
impl Presence for RedisEngine {
    async fn join(
        &self,
        room: &str,
        session: &SessionInfo,
        owner: &str,
    ) -> Result<(Vec<SessionInfo>, bool), EngineError> {
        self.ensure_up()?;
        let _: i64 = self
            .0
            .client
            .sadd(
                node_sessions_key(&self.0.settings.node_id),
                format!("{room}\n{}", session.socket_id),
            )
            .await
            .map_err(err)?;
        let mut reply = self.register(room, session, owner, true).await?;
        let fresh = !reply.is_empty() && reply.remove(0) == "1";
        Ok((parse_sessions(reply), fresh))
    }

    async fn leave(
        &self,
        room: &str,
        socket_id: &str,
        owner: &str,
    ) -> Result<Option<SessionInfo>, EngineError> {
        self.ensure_up()?;
        let left: Option<String> = self
            .0
            .scripts
            .leave
            .evalsha_with_reload(
                &self.0.client,
                presence_keys(room),
                vec![socket_id.to_owned(), owner.to_owned()],
            )
            .await
            .map_err(err)?;
        let _: Result<i64, _> = self
            .0
            .client
            .srem(
                node_sessions_key(&self.0.settings.node_id),
                format!("{room}\n{socket_id}"),
            )
            .await;
        Ok(left.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn members(&self, room: &str) -> Result<Vec<SessionInfo>, EngineError> {
        self.ensure_up()?;
        let list: Vec<String> = self
            .0
            .scripts
            .members
            .evalsha_with_reload(&self.0.client, presence_keys(room), Vec::<String>::new())
            .await
            .map_err(err)?;
        Ok(parse_sessions(list))
    }
}
