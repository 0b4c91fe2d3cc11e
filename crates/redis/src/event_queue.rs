//! The durable queue between the room bus and the event-log writers: a
//! Redis stream with one consumer group, one consumer per node. A writer
//! takes its own unacknowledged entries first, then those of writers that
//! died, then new ones.
//!
//! Three bounds make it safe to lean on:
//!
//! - **A cap.** The queue holds at most `queue_max_len` entries and
//!   `queue_max_bytes` bytes of events (a counter kept by the scripts).
//!   When either is reached, `push` refuses: the caller answers
//!   `UNAVAILABLE` and the event is not logged (it is never acknowledged
//!   and then lost). A long database outage therefore fills the queue up
//!   to the cap and no further, instead of filling Redis and taking
//!   presence and the room bus down with it. Refusals are counted in
//!   `flowgate_eventlog_refused_total{reason="full"}`.
//! - **A watermark per flow.** Each entry is indexed under its flow by the
//!   time of its offset until it is removed. An offset is assigned when the
//!   event is published, a moment before it is queued; `push` refuses an
//!   event whose offset is older than `enqueue_grace` (at Redis time, when
//!   the script runs — a push delayed by a reconnect is judged when it
//!   lands). So the flow's watermark, min(oldest indexed offset, now −
//!   grace), is a time below which no event of the flow can still appear:
//!   history serves only offsets below it (see the gateway's `eventlog`).
//! - **Dead letters.** An entry that can never be written (unreadable, or
//!   refused by the database) is copied with its reason to
//!   `{flowgate:eventlog}:dead` (capped) and removed, so it neither stays
//!   pending forever nor holds its flow's watermark back.

mod lua;

use std::collections::HashMap;

use async_trait::async_trait;
use flowgate_engine::{EngineError, EventQueue, Offset, PushRefused, QueueEntry, QueuedEvent};
use fred::prelude::*;
use fred::types::scripts::Script;

use crate::keys::{
    queue_pending_key, QUEUE_BYTES_KEY, QUEUE_CLAIM_IDLE_MS, QUEUE_DEAD_KEY, QUEUE_DEAD_LEN,
    QUEUE_GROUP, QUEUE_KEY,
};
use crate::{err, RedisEngine};

/// The queue's scripts, loaded once.
pub(crate) struct QueueScripts {
    push: Script,
    remove: Script,
    watermark: Script,
}

impl QueueScripts {
    pub(crate) fn new() -> Self {
        QueueScripts {
            push: Script::from_lua(lua::PUSH),
            remove: Script::from_lua(lua::REMOVE),
            watermark: Script::from_lua(lua::WATERMARK),
        }
    }
}

/// One raw entry: its id and fields (`None` for an entry deleted while
/// pending, which Redis reports with no fields).
type RawEntry = (String, Option<HashMap<String, String>>);

fn decode(id: String, fields: Option<HashMap<String, String>>) -> QueueEntry {
    let Some(fields) = fields else {
        return QueueEntry {
            id,
            flow_id: None,
            event: Err("entry deleted while pending".into()),
        };
    };
    let event = match fields.get("e") {
        None => Err("entry has no event field".to_owned()),
        Some(json) => {
            serde_json::from_str::<QueuedEvent>(json).map_err(|e| format!("undecodable event: {e}"))
        }
    };
    let flow_id = fields
        .get("f")
        .cloned()
        .or_else(|| event.as_ref().ok().map(|e| e.flow_id.clone()));
    QueueEntry { id, flow_id, event }
}

/// `[[id, [field, value, …] | nil], …]`, as XREADGROUP and XAUTOCLAIM
/// give the entries of one stream. Parsed by hand: fred's typed helpers
/// cannot read a nil entry, nor the three-element XAUTOCLAIM reply of
/// Redis 7.
fn raw_entries(v: Value) -> Vec<RawEntry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(pair) = entry else { continue };
        let mut it = pair.into_iter();
        let Some(id) = it.next().and_then(|id| id.as_string()) else {
            continue;
        };
        let fields = match it.next() {
            Some(Value::Array(fields)) => {
                let mut map = HashMap::new();
                let mut f = fields.into_iter();
                while let (Some(k), Some(v)) = (f.next(), f.next()) {
                    if let (Some(k), Some(v)) = (k.as_string(), v.as_string()) {
                        map.insert(k, v);
                    }
                }
                Some(map)
            }
            _ => None,
        };
        out.push((id, fields));
    }
    out
}

impl RedisEngine {
    async fn read_group(
        &self,
        consumer: &str,
        max: usize,
        id: &str,
    ) -> Result<Vec<RawEntry>, Error> {
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
        // `[[key, entries]]`; nothing new is a nil reply.
        let Value::Array(streams) = v else {
            return Ok(Vec::new());
        };
        Ok(streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(kv) => kv.into_iter().nth(1),
                _ => None,
            })
            .flat_map(raw_entries)
            .collect())
    }

    async fn take_once(&self, consumer: &str, max: usize) -> Result<Vec<RawEntry>, Error> {
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
        let claimed = match claimed {
            Value::Array(parts) => parts.into_iter().nth(1).map(raw_entries),
            _ => None,
        }
        .unwrap_or_default();
        if !claimed.is_empty() {
            return Ok(claimed);
        }
        self.read_group(consumer, max, ">").await
    }

    /// Removes entries, each with its dead-letter reason (empty: written).
    async fn remove(&self, entries: &[(&QueueEntry, &str)]) -> Result<(), EngineError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut keys = vec![
            QUEUE_KEY.to_owned(),
            QUEUE_BYTES_KEY.to_owned(),
            QUEUE_DEAD_KEY.to_owned(),
        ];
        let mut args = vec![QUEUE_GROUP.to_owned(), QUEUE_DEAD_LEN.to_string()];
        for (entry, reason) in entries {
            keys.push(queue_pending_key(entry.flow_id.as_deref().unwrap_or("")));
            args.push(entry.id.clone());
            args.push((*reason).to_owned());
        }
        let _: i64 = self
            .0
            .queue_scripts
            .remove
            .evalsha_with_reload(&self.0.client, keys, args)
            .await
            .map_err(err)?;
        Ok(())
    }
}

#[async_trait]
impl EventQueue for RedisEngine {
    async fn push(&self, event: &QueuedEvent) -> Result<(), PushRefused> {
        self.ensure_up()?;
        let offset: Offset = event
            .offset
            .parse()
            .map_err(|_| EngineError(format!("bad offset {:?}", event.offset)))?;
        let json = serde_json::to_string(event).map_err(err)?;
        let s = &self.0.settings;
        let reply: String = self
            .0
            .queue_scripts
            .push
            .evalsha_with_reload(
                &self.0.client,
                vec![
                    QUEUE_KEY.to_owned(),
                    QUEUE_BYTES_KEY.to_owned(),
                    queue_pending_key(&event.flow_id),
                ],
                vec![
                    json,
                    event.flow_id.clone(),
                    event.offset.clone(),
                    offset.ms.to_string(),
                    s.queue_max_len.to_string(),
                    s.queue_max_bytes.to_string(),
                    (s.enqueue_grace.as_millis() as u64).to_string(),
                ],
            )
            .await
            .map_err(err)?;
        let refused = match reply.as_str() {
            "full" => PushRefused::Full,
            "stale" => PushRefused::Stale,
            _ => return Ok(()),
        };
        let reason = if matches!(refused, PushRefused::Full) {
            "full"
        } else {
            "stale"
        };
        self.0
            .metrics
            .eventlog_refused
            .with_label_values(&[reason])
            .inc();
        Err(refused)
    }

    async fn take(&self, consumer: &str, max: usize) -> Result<Vec<QueueEntry>, EngineError> {
        self.ensure_up()?;
        let raw = match self.take_once(consumer, max).await {
            Err(e) if e.details().contains("NOGROUP") => {
                // First use, or Redis lost the group in a restart.
                let _: Result<String, _> = self
                    .0
                    .client
                    .xgroup_create(QUEUE_KEY, QUEUE_GROUP, "0", true)
                    .await;
                self.take_once(consumer, max).await
            }
            r => r,
        }
        .map_err(err)?;
        Ok(raw.into_iter().map(|(id, f)| decode(id, f)).collect())
    }

    async fn ack(&self, entries: &[&QueueEntry]) -> Result<(), EngineError> {
        let done: Vec<(&QueueEntry, &str)> = entries.iter().map(|e| (*e, "")).collect();
        self.remove(&done).await
    }

    async fn dead_letter(&self, entry: &QueueEntry, reason: &str) -> Result<(), EngineError> {
        // An empty reason would read as "written".
        let reason = if reason.is_empty() { "unknown" } else { reason };
        self.remove(&[(entry, reason)]).await
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        self.ensure_up()?;
        self.0.client.xlen(QUEUE_KEY).await.map_err(err)
    }

    async fn watermark(&self, flow_id: &str) -> Result<Offset, EngineError> {
        self.ensure_up()?;
        let ms: i64 = self
            .0
            .queue_scripts
            .watermark
            .evalsha_with_reload(
                &self.0.client,
                vec![QUEUE_KEY.to_owned(), queue_pending_key(flow_id)],
                vec![(self.0.settings.enqueue_grace.as_millis() as u64).to_string()],
            )
            .await
            .map_err(err)?;
        Ok(Offset {
            ms: ms.max(0) as u64,
            seq: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> QueueEntry {
        decode(
            "1-0".into(),
            Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        )
    }

    #[test]
    fn unreadable_entries_are_reported_not_dropped() {
        let e = entry(&[("e", "{not json"), ("f", "f1")]);
        assert_eq!(e.flow_id.as_deref(), Some("f1"));
        assert!(e.event.unwrap_err().starts_with("undecodable event"));
        let e = entry(&[("x", "y")]);
        assert_eq!(e.flow_id, None);
        assert!(e.event.is_err());
        assert!(decode("2-0".into(), None).event.is_err());
        let ok = entry(&[(
            "e",
            r#"{"flowId":"f2","offset":"1-1","event":"a","data":{}}"#,
        )]);
        // Entries queued before the flow field existed name it in the event.
        assert_eq!(ok.flow_id.as_deref(), Some("f2"));
        assert_eq!(ok.event.unwrap().offset, "1-1");
    }

    #[test]
    fn nil_entries_are_kept() {
        let v = Value::Array(vec![
            Value::Array(vec![Value::from("1-0"), Value::Null]),
            Value::Array(vec![
                Value::from("2-0"),
                Value::Array(vec![Value::from("f"), Value::from("x")]),
            ]),
        ]);
        let raw = raw_entries(v);
        assert_eq!(raw.len(), 2);
        assert!(raw[0].1.is_none());
        assert_eq!(raw[1].1.as_ref().unwrap()["f"], "x");
    }
}
