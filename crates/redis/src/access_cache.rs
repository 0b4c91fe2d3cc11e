//! The short-lived Redis cache of access decisions (may this user open this
//! flow?), so a join does not ask Postgres every time.

use std::time::Duration;

use async_trait::async_trait;
use flowgate_engine::{AccessCache, EngineError};
use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use crate::keys::access_key;
use crate::{err, RedisEngine};

#[async_trait]
impl AccessCache for RedisEngine {
    async fn get(&self, flow_id: &str, user_id: &str) -> Result<Option<bool>, EngineError> {
        self.ensure_up()?;
        let v: Option<String> = self
            .0
            .client
            .get(access_key(flow_id, user_id))
            .await
            .map_err(err)?;
        Ok(v.map(|v| v == "1"))
    }

    async fn put(
        &self,
        flow_id: &str,
        user_id: &str,
        allowed: bool,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.ensure_up()?;
        let _: Option<String> = self
            .0
            .client
            .set(
                access_key(flow_id, user_id),
                if allowed { "1" } else { "0" },
                Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
                // A revocation's refusal is written with SET (no NX) and
                // must not be overwritten by a join's earlier read.
                if allowed { Some(SetOptions::NX) } else { None },
                false,
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn forget(&self, flow_id: &str, user_id: &str) -> Result<(), EngineError> {
        let _: i64 = self
            .0
            .client
            .del(access_key(flow_id, user_id))
            .await
            .map_err(err)?;
        Ok(())
    }
}
