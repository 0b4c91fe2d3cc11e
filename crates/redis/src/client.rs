//! The fred clients and Redis liveness: how the two clients are built, the
//! pinger that keeps `up` current, the fail-fast guard every engine call
//! uses, and `/health`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_engine::{EngineError, EngineHealth};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{RedisEngine, RedisSettings};

pub(crate) fn build_client(s: &RedisSettings, broadcast: usize) -> Result<Client, Error> {
    let mut config = Config::from_url(&s.url)?;
    // Start even if Redis is down: the node serves degraded (503 on
    // /health) and connects when Redis appears.
    config.fail_fast = false;
    Builder::from_config(config)
        .with_performance_config(|p| {
            p.default_command_timeout = s.command_timeout;
            p.broadcast_channel_capacity = broadcast;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            // One attempt: a script retried after a dropped connection may
            // already have run (a room event published twice). Callers
            // refuse the one operation instead; the client retries.
            c.max_command_attempts = 1;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2))
        .build()
}

impl RedisEngine {
    pub(crate) fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    /// The Redis time (ms) by which a command sent now must have run: past
    /// it, the caller has given up on the command (or soon will), so a
    /// script that reaches Redis late (a stalled link) must not act. Three
    /// quarters of the command timeout leave the reply time to arrive
    /// before the caller's own timeout fires.
    pub(crate) fn deadline_ms(&self) -> i64 {
        let local_ms = flowgate_engine::now_us() as i64 / 1000;
        local_ms
            + self.0.clock_offset_ms.load(Ordering::Relaxed)
            + self.0.settings.command_timeout.as_millis() as i64 * 3 / 4
    }

    pub(crate) fn ensure_up(&self) -> Result<(), EngineError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(EngineError("Redis is unreachable".into()))
        }
    }

    /// One `TIME` round trip: liveness, latency, and the offset between
    /// Redis time and this node's clock (for publish deadlines).
    pub(crate) async fn ping_once(&self) -> bool {
        let started = Instant::now();
        let before_ms = flowgate_engine::now_us() as i64 / 1000;
        let reply = tokio::time::timeout(
            self.0.settings.command_timeout,
            self.0
                .client
                .custom::<Vec<String>, String>(fred::cmd!("TIME"), Vec::new()),
        )
        .await;
        let ok = matches!(reply, Ok(Ok(_)));
        if let Ok(Ok(t)) = reply {
            let rtt = started.elapsed();
            self.0
                .latency_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            if let (Some(Ok(secs)), Some(Ok(us))) = (
                t.first().map(|s| s.parse::<i64>()),
                t.get(1).map(|s| s.parse::<i64>()),
            ) {
                let redis_ms = secs * 1000 + us / 1000;
                let local_ms = before_ms + rtt.as_millis() as i64 / 2;
                self.0
                    .clock_offset_ms
                    .store(redis_ms - local_ms, Ordering::Relaxed);
            }
        }
        let was = self.0.up.swap(ok, Ordering::Relaxed);
        self.0.metrics.up.set(ok as i64);
        match (was, ok) {
            (true, false) => {
                self.0.metrics.outages.inc();
                warn!("Redis unreachable: /health reports 503, rate limits fall back to per-node");
            }
            (false, true) => info!("Redis reachable"),
            _ => {}
        }
        ok
    }

    /// Keeps `up` current; on recovery, re-registers presence at once.
    pub(crate) async fn pinger(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let was = self.is_up();
            if self.ping_once().await && !was {
                self.heartbeat().await;
                self.refresh_presence().await;
            }
        }
    }
}

#[async_trait]
impl EngineHealth for RedisEngine {
    async fn ping(&self) -> Result<Duration, EngineError> {
        // The pinger keeps this current, so a load balancer hitting
        // /health every second costs Redis nothing.
        self.ensure_up()?;
        Ok(Duration::from_micros(
            self.0.latency_us.load(Ordering::Relaxed),
        ))
    }
}
