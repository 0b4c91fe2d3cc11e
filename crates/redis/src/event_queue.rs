//! The durable queue between the room bus and the event-log writers: a
//! Redis stream with one consumer group, one consumer per node. A writer
//! takes its own unacknowledged entries first, then those of writers that
//! died, then new ones.

use std::collections::HashMap;

use async_trait::async_trait;
use flowgate_engine::{EngineError, EventQueue, QueuedEvent};
use fred::prelude::*;
use tracing::warn;

use crate::keys::{QUEUE_CLAIM_IDLE_MS, QUEUE_GROUP, QUEUE_KEY};
use crate::{err, RedisEngine};

type Entries = Vec<(String, QueuedEvent)>;

fn decode_entries(list: Vec<(String, HashMap<String, String>)>) -> Entries {
    list.into_iter()
        .filter_map(|(id, fields)| {
            let e = fields.get("e").and_then(|j| serde_json::from_str(j).ok());
            if e.is_none() {
                warn!(id, "undecodable event-log queue entry skipped");
            }
            Some((id, e?))
        })
        .collect()
}

/// Parses an `XAUTOCLAIM` reply by hand: fred's typed helper predates the
/// three-element reply of Redis 7.
fn decode_autoclaim(v: Value) -> Entries {
    let Value::Array(parts) = v else {
        return Vec::new();
    };
    let Some(Value::Array(entries)) = parts.into_iter().nth(1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let Value::Array(pair) = entry else { continue };
        let mut it = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (it.next(), it.next()) else {
            continue;
        };
        let Some(id) = id.as_string() else { continue };
        let mut map = HashMap::new();
        let mut f = fields.into_iter();
        while let (Some(k), Some(v)) = (f.next(), f.next()) {
            if let (Some(k), Some(v)) = (k.as_string(), v.as_string()) {
                map.insert(k, v);
            }
        }
        out.extend(decode_entries(vec![(id, map)]));
    }
    out
}

impl RedisEngine {
    async fn read_group(&self, consumer: &str, max: usize, id: &str) -> Result<Entries, Error> {
        let v: Value = self
            .0
            .client
            .xreadgroup(
                QUEUE_GROUP,
                consumer,
                Some(max as u64),
                None,
                false,
                QUEUE_KEY,
                id,
            )
            .await?;
        // Nothing new is a nil reply, which the typed helper cannot read.
        if v.is_null() {
            return Ok(Vec::new());
        }
        let r: fred::types::streams::XReadResponse<String, String, String, String> =
            v.into_xread_response()?;
        Ok(r.into_values().flat_map(decode_entries).collect())
    }

    async fn take_once(&self, consumer: &str, max: usize) -> Result<Entries, Error> {
        // Our own entries read before but never acknowledged (a write that
        // failed, or a restart), then those of writers that died, then new.
        let own = self.read_group(consumer, max, "0").await?;
        if !own.is_empty() {
            return Ok(own);
        }
        let claimed: Value = self
            .0
            .client
            .xautoclaim(
                QUEUE_KEY,
                QUEUE_GROUP,
                consumer,
                QUEUE_CLAIM_IDLE_MS,
                "0-0",
                Some(max as u64),
                false,
            )
            .await?;
        let claimed = decode_autoclaim(claimed);
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        self.read_group(consumer, max, ">").await
    }
}

#[async_trait]
impl EventQueue for RedisEngine {
    async fn push(&self, event: &QueuedEvent) -> Result<(), EngineError> {
        self.ensure_up()?;
        let json = serde_json::to_string(event).map_err(err)?;
        let _: String = self
            .0
            .client
            .xadd(QUEUE_KEY, false, None, "*", vec![("e", json)])
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn take(
        &self,
        consumer: &str,
        max: usize,
    ) -> Result<Vec<(String, QueuedEvent)>, EngineError> {
        self.ensure_up()?;
        match self.take_once(consumer, max).await {
            Err(e) if e.details().contains("NOGROUP") => {
                // First use, or Redis lost the group in a restart.
                let _: Result<String, _> = self
                    .0
                    .client
                    .xgroup_create(QUEUE_KEY, QUEUE_GROUP, "0", true)
                    .await;
                self.take_once(consumer, max).await.map_err(err)
            }
            r => r.map_err(err),
        }
    }

    async fn ack(&self, ids: &[String]) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .0
            .client
            .xack(QUEUE_KEY, QUEUE_GROUP, ids.to_vec())
            .await
            .map_err(err)?;
        let _: i64 = self
            .0
            .client
            .xdel(QUEUE_KEY, ids.to_vec())
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        self.ensure_up()?;
        self.0.client.xlen(QUEUE_KEY).await.map_err(err)
    }
}
