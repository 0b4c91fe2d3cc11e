//! The per-user rate limiter: a local `governor` filter first, then GCRA in
//! Lua with Redis time. While Redis is unreachable the local filter alone
//! decides (the per-node fallback), and each such decision is counted.

use async_trait::async_trait;
use flowgate_engine::{EngineError, UserLimiter};
use tracing::debug;

use crate::keys::limit_key;
use crate::RedisEngine;

#[async_trait]
impl UserLimiter for RedisEngine {
    async fn check(&self, user_id: &str) -> Result<bool, EngineError> {
        // Local first filter: the shared budget can never be larger than
        // this node's view of it, so a local refusal needs no round trip.
        if self.0.local.check_key(&user_id.to_owned()).is_err() {
            return Ok(false);
        }
        if !self.is_up() {
            self.0.metrics.limiter_fallback.inc();
            return Ok(true);
        }
        let s = &self.0.settings;
        let interval_us = 1_000_000 / i64::from(s.rate_per_sec.max(1));
        let r: Result<i64, _> = self
            .0
            .scripts
            .gcra
            .evalsha_with_reload(
                &self.0.client,
                vec![limit_key(user_id)],
                vec![interval_us, i64::from(s.burst)],
            )
            .await;
        match r {
            Ok(allowed) => Ok(allowed == 1),
            Err(e) => {
                self.0.metrics.limiter_fallback.inc();
                debug!(error = %e, "limiter falls back to the per-node budget");
                Ok(true)
            }
        }
    }
}
