//! Recoverable sessions: one small hash per private session id (`pid`),
//! `r` = the record, `c` = the connection that owns it, with a TTL the
//! owning node keeps extending while the session is connected and cuts to
//! the recovery window when the connection is lost.

use std::time::Duration;

use async_trait::async_trait;
use flowgate_engine::{EngineError, SessionRecord, SessionStore};
use fred::prelude::*;

use crate::keys::session_key;
use crate::{err, RedisEngine};

/// Milliseconds; 0 makes `PEXPIRE` delete the key.
fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

#[async_trait]
impl SessionStore for RedisEngine {
    async fn save(
        &self,
        pid: &str,
        record: &SessionRecord,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.ensure_up()?;
        let json = serde_json::to_string(record).map_err(err)?;
        let _: i64 = self
            .0
            .scripts
            .session_save
            .evalsha_with_reload(
                &self.0.client,
                vec![session_key(pid)],
                vec![json, record.conn.clone(), ms(ttl)],
            )
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn load(&self, pid: &str) -> Result<Option<SessionRecord>, EngineError> {
        self.ensure_up()?;
        let v: Option<String> = self
            .0
            .client
            .hget(session_key(pid), "r")
            .await
            .map_err(err)?;
        Ok(v.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn refresh(&self, pids: &[String], ttl: Duration) -> Result<(), EngineError> {
        self.ensure_up()?;
        let ttl = ttl.as_millis().max(1) as i64;
        // One pipeline, not one round trip per session.
        let pipe = self.0.client.pipeline();
        for pid in pids {
            let _: () = pipe
                .pexpire(session_key(pid), ttl, None)
                .await
                .map_err(err)?;
        }
        let _: Vec<Value> = pipe.all().await.map_err(err)?;
        Ok(())
    }

    async fn release(&self, pid: &str, conn: &str, window: Duration) -> Result<bool, EngineError> {
        let n: i64 = self
            .0
            .scripts
            .session_release
            .evalsha_with_reload(
                &self.0.client,
                vec![session_key(pid)],
                vec![conn.to_owned(), ms(window)],
            )
            .await
            .map_err(err)?;
        Ok(n == 1)
    }

    async fn forget(&self, pid: &str) -> Result<(), EngineError> {
        let _: i64 = self.0.client.del(session_key(pid)).await.map_err(err)?;
        Ok(())
    }
}
