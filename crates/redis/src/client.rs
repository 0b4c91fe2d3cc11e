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

    pub(crate) fn ensure_up(&self) -> Result<(), EngineError> {
        if self.is_up() {
            Ok(())
        } else {
            Err(EngineError("Redis is unreachable".into()))
        }
    }

    pub(crate) async fn ping_once(&self) -> bool {
        let started = Instant::now();
        let ok = matches!(
            tokio::time::timeout(
                self.0.settings.command_timeout,
                self.0.client.ping::<String>(None)
            )
            .await,
            Ok(Ok(_))
        );
        if ok {
            self.0
                .latency_us
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
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
