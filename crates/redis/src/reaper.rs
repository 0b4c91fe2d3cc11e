//! Dead nodes: finding nodes that stopped heartbeating, removing their
//! sessions and announcing `user:left` for each (and expiring their pod
//! locks); and the maintenance loop that drives it.
//!
//! The maintenance loop lives here rather than in `presence.rs` because
//! its cadence is the reaper's: it ticks every heartbeat interval to scan
//! for dead nodes; this node's presence is verified only when something
//! says it may be wrong (see `presence.rs`) or every `presence_verify`.
//! Its clean exit (dropping this node's heartbeat and session set) is what
//! keeps the other nodes' reapers from acting on it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use flowgate_engine::{RoomBus, RoomMessage, SessionInfo};
use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::keys::{node_sessions_key, presence_keys, reap_lock_key, NODES_KEY};
use crate::RedisEngine;

impl RedisEngine {
    /// Dead-node reaping, presence verification and the pruning of local
    /// limiter state.
    pub(crate) async fn maintenance(self, stop: CancellationToken) {
        let s = &self.0.settings;
        let mut tick = tokio::time::interval(s.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A reconnect of the command client may be a failover to a replica
        // that missed this node's latest writes (on a Redis Cluster, one
        // shard's: the pinger, which talks to one server, would not see it).
        let mut reconnects = self.0.client.reconnect_rx();
        let mut last_prune = Instant::now();
        let mut last_verify = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                r = reconnects.recv() => {
                    if !matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        self.0.verify_presence.store(true, Ordering::Relaxed);
                    }
                    continue;
                }
            }
            if !self.is_up() {
                continue;
            }
            self.reap_dead().await;
            let asked = self.0.verify_presence.swap(false, Ordering::Relaxed);
            if asked || last_verify.elapsed() >= s.presence_verify {
                last_verify = Instant::now();
                self.verify_presence().await;
            }
            if last_prune.elapsed() >= s.presence_refresh {
                last_prune = Instant::now();
                self.0.local.retain_recent();
                self.0.leases.prune(Instant::now());
            }
        }
        // Clean exit: sessions still open at the deadline leave with a
        // `user:left` each (never a silent expiry); then drop the heartbeat
        // so no one reaps this node later.
        self.reap(&s.node_id).await;
        let _: Result<i64, _> = self.0.client.zrem(NODES_KEY, s.node_id.clone()).await;
    }

    /// Whether `node` heartbeated within the dead-after bound.
    pub(crate) async fn node_is_alive(&self, node: &str) -> bool {
        let alive: Result<i64, _> = self
            .0
            .scripts
            .node_alive
            .evalsha_with_reload(
                &self.0.client,
                vec![NODES_KEY],
                vec![
                    node.to_owned(),
                    self.0.settings.dead_after.as_millis().to_string(),
                ],
            )
            .await;
        matches!(alive, Ok(1))
    }

    /// After this node was cut from Redis, every other node's heartbeat
    /// may look stale too — after a failover longer than `dead_after`, all
    /// of them were cut — although they are alive and about to heartbeat
    /// again. Reaping then would announce `user:left` for every live
    /// session of the cluster; so the scan waits one `dead_after` and a
    /// beat after Redis is back, by which time a live node has heartbeated.
    pub(crate) fn hold_reaping(&self) {
        let s = &self.0.settings;
        let until = self.0.started.elapsed() + s.dead_after + s.heartbeat;
        self.0.reap_not_before_ms.store(
            until.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn may_reap(&self) -> bool {
        let now = self.0.started.elapsed().as_millis() as u64;
        now >= self
            .0
            .reap_not_before_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn reap_dead(&self) {
        if !self.may_reap() {
            return;
        }
        let dead: Result<Vec<String>, _> = self
            .0
            .scripts
            .dead_nodes
            .evalsha_with_reload(
                &self.0.client,
                vec![NODES_KEY],
                vec![self.0.settings.dead_after.as_millis() as i64],
            )
            .await;
        match dead {
            Ok(nodes) => {
                for node in nodes.iter().filter(|n| **n != self.0.settings.node_id) {
                    self.reap(node).await;
                }
            }
            Err(e) => warn!(error = %e, "dead-node scan failed"),
        }
    }

    /// Removes every session of `node` and announces `user:left` for each.
    /// A lock with a TTL makes one survivor do it; if that survivor dies
    /// midway, the lock expires and another finishes the job.
    pub(crate) async fn reap(&self, node: &str) {
        let c = &self.0.client;
        let lock = reap_lock_key(node);
        let claimed: Result<Option<String>, _> = c
            .set(
                lock.clone(),
                self.0.settings.node_id.clone(),
                Some(Expiration::PX(10_000)),
                Some(SetOptions::NX),
                false,
            )
            .await;
        if !matches!(claimed, Ok(Some(_))) {
            return;
        }
        let members: Vec<String> = match c.smembers(node_sessions_key(node)).await {
            Ok(m) => m,
            Err(e) => {
                warn!(node, error = %e, "cannot list a dead node's sessions");
                return;
            }
        };
        let mut removed = 0u64;
        for m in &members {
            let Some((room, sid)) = m.split_once('\n') else {
                continue;
            };
            if let Ok(true) = self
                .remove_session(node, room, sid, &self.0.metrics.reaped_sessions)
                .await
            {
                removed += 1;
            }
        }
        let _: Result<i64, _> = c.del(node_sessions_key(node)).await;
        if node != self.0.settings.node_id {
            let _: Result<i64, _> = c.zrem(NODES_KEY, node.to_owned()).await;
        }
        let _: Result<i64, _> = c.del(lock).await;
        if removed > 0 || node != self.0.settings.node_id {
            info!(
                node,
                sessions = removed,
                "removed the sessions of a dead node"
            );
        }
    }

    /// Removes `room`'s presence entry of `sid` if a connection of `node`
    /// still owns it (a session recovered on another node lives on),
    /// expires its pod locks and announces `user:left`. `Ok(true)` when it
    /// was removed: of all callers racing for one entry, exactly one;
    /// `Ok(false)` when it was not there or not this node's; an error when
    /// Redis did not answer. `count` is incremented before the announcement
    /// goes out.
    pub(crate) async fn remove_session(
        &self,
        node: &str,
        room: &str,
        sid: &str,
        count: &prometheus::IntCounter,
    ) -> Result<bool, fred::error::Error> {
        let left: Result<Option<String>, _> = self
            .0
            .scripts
            .leave
            .evalsha_with_reload(
                &self.0.client,
                presence_keys(room),
                vec![sid.to_owned(), format!("{node}/")],
            )
            .await;
        let Some(json) = left? else {
            return Ok(false);
        };
        count.inc();
        // Its pod locks go with it, in the same bound (the next lock sweep
        // releases and announces them).
        self.expire_lock_holder(room, sid, node).await;
        if let Ok(s) = serde_json::from_str::<SessionInfo>(&json) {
            let mut msg = RoomMessage::new(
                "user:left",
                json!({"userId": s.user_id, "socketId": s.socket_id, "userName": s.user_name}),
            );
            // Never for the socket it is about: if that session recovers,
            // its replay must not tell it that it left.
            msg.except = Some(s.socket_id.clone());
            if let Err(e) = self.publish(room, msg).await {
                warn!(room, error = %e, "user:left of a removed session not published");
            }
        }
        Ok(true)
    }
}
