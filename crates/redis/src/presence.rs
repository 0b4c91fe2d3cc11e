//! Presence: who is in a room. Per room a hash and an expiry sorted set
//! (see `keys::presence_keys`); this node lists its sessions in a set of its
//! own, extends their expiry on an interval, and heartbeats so the other
//! nodes know it is alive (the reaper removes the sessions of nodes that
//! stop).

use std::collections::HashMap;

use async_trait::async_trait;
use flowgate_engine::{EngineError, LocalSession, Presence, RoomBus, RoomMessage, SessionInfo};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::keys::{node_sessions_key, presence_keys, NODES_KEY};
use crate::{err, RedisEngine};

impl RedisEngine {
    /// The heartbeat, alone in its task: reaping a large dead node or
    /// refreshing many rooms must not delay it past `dead_after`, or the
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
        if let Err(e) = r {
            warn!(error = %e, "heartbeat failed");
        }
    }

    /// Extends this node's sessions; re-registers (and announces) any that
    /// Redis lost.
    pub(crate) async fn refresh_presence(&self) {
        let sessions = self.0.sink.local_sessions();
        if sessions.is_empty() {
            return;
        }
        let c = &self.0.client;
        let ttl = self.0.settings.session_ttl.as_millis() as i64;
        let mut by_room: HashMap<&str, Vec<&LocalSession>> = HashMap::new();
        for l in &sessions {
            by_room.entry(l.room.as_str()).or_default().push(l);
        }
        // Sessions missing from presence mean Redis lost data: this node's
        // session set (what a survivor reaps if this node dies) is rebuilt
        // then, and after a reconnect — not on every refresh, where it
        // would cost a member per session (measured: a node's 17,000
        // sessions every 5 s saturated Redis at 120,000 connections).
        let mut lost = self
            .0
            .repair_node_set
            .swap(false, std::sync::atomic::Ordering::Relaxed);
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
                    warn!(room, error = %e, "presence refresh failed");
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
                if self.register(room, s, &l.owner, false).await.is_ok() {
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
        if lost {
            let members: Vec<String> = sessions
                .iter()
                .map(|l| format!("{}\n{}", l.room, l.session.socket_id))
                .collect();
            if let Err(e) = c
                .sadd::<i64, _, _>(node_sessions_key(&self.0.settings.node_id), members)
                .await
            {
                warn!(error = %e, "node session set not rebuilt; trying again next refresh");
                self.0
                    .repair_node_set
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
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
                    (self.0.settings.session_ttl.as_millis() as i64).to_string(),
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
