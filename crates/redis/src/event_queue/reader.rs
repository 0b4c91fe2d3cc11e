//! How a writer reads the queue: one consumer's rotation over the streams
//! (its own unacknowledged entries first, then those of dead writers,
//! claimed per shard, then new ones), and the parsing of raw stream
//! entries.

use std::collections::HashMap;
use std::time::Instant;

use flowgate_engine::{QueueEntry, QueuedEvent};
use fred::prelude::*;

use crate::keys::{QueueShard, QUEUE_CLAIM_IDLE_MS, QUEUE_GROUP};
use crate::RedisEngine;

/// Where one consumer is in its rotation over the streams.
#[derive(Debug, Default)]
pub(super) struct Reader {
    /// The index (in [`View::streams`]) to read first next time.
    pub(super) next: usize,
    pub(super) cursors: HashMap<QueueShard, Cursor>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Cursor {
    /// The consumer may hold unacknowledged entries of this stream: read
    /// them first (at start, and after entries were handed out).
    pub(super) own: bool,
    pub(super) claim_at: Instant,
    pub(super) idle_until: Instant,
}

impl Cursor {
    pub(super) fn new(now: Instant) -> Self {
        Cursor {
            own: true,
            claim_at: now,
            idle_until: now,
        }
    }
}

/// One raw entry: its id and fields (`None` for an entry deleted while
/// pending, which Redis reports with no fields).
type RawEntry = (String, Option<HashMap<String, String>>);

pub(super) fn decode(id: String, fields: Option<HashMap<String, String>>) -> QueueEntry {
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
    pub(super) async fn read_group(
        &self,
        stream: &str,
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
                stream,
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

    /// One stream's entries for `consumer`: its own read before but never
    /// acknowledged (a write that failed, or a restart) when it may have
    /// some, then those of writers that died when it is time to look, then
    /// new ones.
    pub(super) async fn take_stream(
        &self,
        stream: &str,
        consumer: &str,
        max: usize,
        cursor: Cursor,
    ) -> Result<Vec<RawEntry>, Error> {
        if cursor.own {
            let own = self.read_group(stream, consumer, max, "0").await?;
            if !own.is_empty() {
                return Ok(own);
            }
        }
        if cursor.claim_at <= Instant::now() {
            let claimed: Value = self
                .0
                .client
                .xautoclaim(
                    stream,
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
        }
        self.read_group(stream, consumer, max, ">").await
    }

    /// [`Self::take_stream`], creating the group on first use (or after
    /// Redis lost it in a restart).
    pub(super) async fn take_shard(
        &self,
        shard: QueueShard,
        consumer: &str,
        max: usize,
        cursor: Cursor,
    ) -> Result<Vec<RawEntry>, Error> {
        let stream = shard.stream();
        match self.take_stream(&stream, consumer, max, cursor).await {
            Err(e) if e.details().contains("NOGROUP") => {
                // The legacy stream is never created here: it is read only
                // while it holds entries, and one created would outlive them.
                let mkstream = shard != QueueShard::Legacy;
                let _: Result<String, _> = self
                    .0
                    .client
                    .xgroup_create(&stream, QUEUE_GROUP, "0", mkstream)
                    .await;
                match self.take_stream(&stream, consumer, max, cursor).await {
                    Err(e) if shard == QueueShard::Legacy && e.details().contains("NOGROUP") => {
                        // Drained and deleted meanwhile.
                        Ok(Vec::new())
                    }
                    r => r,
                }
            }
            r => r,
        }
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
