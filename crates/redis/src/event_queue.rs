//! The durable queue between the room bus and the event-log writers,
//! sharded so that no Redis Cluster master carries every persisted event.
//!
//! # Shards
//!
//! The queue is `FLOWGATE_EVENTLOG_SHARDS` Redis streams (16 by default),
//! `{flowgate:eventlog:k}`. A flow's events all go to one shard, FNV-1a of
//! its id modulo the count ([`queue_shard_of`]), so they stay in one
//! stream in order, and every key of a shard (the stream, its byte
//! counter, its dead letters, its flows' pending indexes) shares the
//! shard's hash tag: each script touches one slot, and the shards spread
//! over the cluster's masters by their tags.
//!
//! Every stream has one consumer group, one consumer per node: a writer
//! reads every shard, taking its own unacknowledged entries first, then
//! those of writers that died (claimed per shard), then new ones. Entry ids
//! carry their shard (`7/1700000000000-0`) so `ack` finds it.
//!
//! Every shard count a node has queued under is kept in a set
//! (`flowgate:eventlog:shard-counts`): writers drain the shards of the
//! largest, and a flow's watermark looks at its shard under each, so a
//! change of the count strands no entry and no flow's history skips one.
//! The single stream of the releases before sharding, `flowgate:eventlog`
//! ([`QueueShard::Legacy`]), is drained too for as long as it holds
//! entries: a rolling deploy loses nothing an older node acknowledged.
//!
//! # Bounds
//!
//! Three bounds make it safe to lean on:
//!
//! - **A cap.** The queue holds at most `queue_max_len` entries and
//!   `queue_max_bytes` bytes of events, split evenly over the shards (each
//!   holds at most 1/N of each, rounded down, a counter per shard kept by
//!   the scripts), so the total holds without a cross-slot counter. A
//!   consequence: one flow alone can fill only its shard's share. When a
//!   shard's share is reached, `push` refuses: the caller answers
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
//!   refused by the database) is copied with its reason to its shard's
//!   `{flowgate:eventlog:k}:dead` (capped) and removed, so it neither stays
//!   pending forever nor holds its flow's watermark back.

mod lua;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_engine::{EngineError, EventQueue, Offset, PushRefused, QueueEntry, QueuedEvent};
use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::future::try_join_all;
use parking_lot::Mutex;

use crate::keys::{
    queue_shard_of, QueueShard, QUEUE_CLAIM_IDLE_MS, QUEUE_DEAD_LEN, QUEUE_GROUP,
    QUEUE_SHARD_COUNTS_KEY,
};
use crate::{err, RedisEngine};

/// How long the shard counts and the legacy stream's length are reused.
/// A flow's watermark is lowered by their age (see [`RedisEngine::view`]),
/// so this bounds how much more history trails the room than the grace.
const VIEW_TTL: Duration = Duration::from_millis(250);
/// Added to the view's age in the watermark: the round trips between the
/// moment it was measured from and the moments Redis read and will judge.
const VIEW_MARGIN_MS: u64 = 50;
/// A shard found empty is not read again for this long.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How often a writer looks for entries of dead writers, per shard (they
/// are taken over once idle for [`QUEUE_CLAIM_IDLE_MS`]).
const CLAIM_EVERY: Duration = Duration::from_secs(5);

/// The queue's scripts, loaded once, and what a node remembers of it.
pub(crate) struct QueueState {
    push: Script,
    remove: Script,
    watermark: Script,
    /// This node's shard count is in [`QUEUE_SHARD_COUNTS_KEY`].
    registered: AtomicBool,
    view: Mutex<Option<View>>,
    /// Per consumer (a node has one; tests play several).
    readers: Mutex<HashMap<String, Reader>>,
}

impl QueueState {
    pub(crate) fn new() -> Self {
        QueueState {
            push: Script::from_lua(lua::PUSH),
            remove: Script::from_lua(lua::REMOVE),
            watermark: Script::from_lua(lua::WATERMARK),
            registered: AtomicBool::new(false),
            view: Mutex::new(None),
            readers: Mutex::new(HashMap::new()),
        }
    }
}

/// What the queue looks like beyond this node's own shard count, as read
/// at `at`.
#[derive(Debug, Clone)]
struct View {
    /// Every shard count queued under, this node's included.
    counts: BTreeSet<u32>,
    /// Entries in the legacy stream (0: absent or drained).
    legacy_len: u64,
    at: Instant,
}

impl View {
    /// The streams writers read: every shard of the largest count, and the
    /// legacy stream while it holds entries.
    fn streams(&self) -> Vec<QueueShard> {
        let n = self.counts.iter().copied().max().unwrap_or(1);
        let legacy = (self.legacy_len > 0).then_some(QueueShard::Legacy);
        legacy
            .into_iter()
            .chain((0..n).map(QueueShard::Shard))
            .collect()
    }
}

/// Where one consumer is in its rotation over the streams.
#[derive(Debug, Default)]
struct Reader {
    /// The index (in [`View::streams`]) to read first next time.
    next: usize,
    cursors: HashMap<QueueShard, Cursor>,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// The consumer may hold unacknowledged entries of this stream: read
    /// them first (at start, and after entries were handed out).
    own: bool,
    claim_at: Instant,
    idle_until: Instant,
}

impl Cursor {
    fn new(now: Instant) -> Self {
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
    /// This node's shard count.
    fn queue_shards(&self) -> u32 {
        self.0.settings.queue_shards.max(1)
    }

    /// Puts this node's shard count in the registry before it first queues
    /// under it, so that writers and watermarks of every node find its
    /// shards.
    async fn register_shards(&self) -> Result<(), Error> {
        let state = &self.0.queue;
        if !state.registered.load(Ordering::Relaxed) {
            let _: i64 = self
                .0
                .client
                .sadd(QUEUE_SHARD_COUNTS_KEY, self.queue_shards())
                .await?;
            state.registered.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The shard counts in use and the legacy stream's length, read at
    /// most every [`VIEW_TTL`]. Cached because a watermark needs them for
    /// every history page: reading them each time would send every
    /// history request of every flow to the one slot of the registry (and
    /// of the legacy stream). A watermark computed from a view `age` old
    /// is lowered by that age (plus a margin): a count registered, or a
    /// legacy entry queued, after the view was read holds an event whose
    /// offset is at most the grace older than that moment, so it is still
    /// at or above the lowered watermark.
    async fn view(&self) -> Result<View, Error> {
        if let Some(v) = self.0.queue.view.lock().as_ref() {
            if v.at.elapsed() < VIEW_TTL {
                return Ok(v.clone());
            }
        }
        let at = Instant::now();
        let (counts, legacy_len): (Vec<String>, u64) = tokio::try_join!(
            self.0.client.smembers(QUEUE_SHARD_COUNTS_KEY),
            self.0.client.xlen(QueueShard::Legacy.stream()),
        )?;
        let mut counts: BTreeSet<u32> = counts.iter().filter_map(|c| c.parse().ok()).collect();
        let own = self.queue_shards();
        if counts.insert(own) {
            // Registered before, and the set was lost since (or never yet).
            self.0.queue.registered.store(false, Ordering::Relaxed);
            self.register_shards().await?;
        }
        let v = View {
            counts,
            legacy_len,
            at,
        };
        *self.0.queue.view.lock() = Some(v.clone());
        Ok(v)
    }

    async fn read_group(
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
    async fn take_stream(
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
    async fn take_shard(
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

    /// Removes entries, each with its dead-letter reason (empty: written):
    /// one script per shard, each on its shard's slot.
    async fn remove(&self, entries: &[(&QueueEntry, &str)]) -> Result<(), EngineError> {
        let mut by_shard: BTreeMap<QueueShard, Vec<(&QueueEntry, &str, &str)>> = BTreeMap::new();
        for (entry, reason) in entries {
            let (shard, id) = QueueShard::of_entry_id(&entry.id)
                .ok_or_else(|| EngineError(format!("bad queue entry id {:?}", entry.id)))?;
            by_shard.entry(shard).or_default().push((entry, id, reason));
        }
        // About QUEUE_DEAD_LEN in all, whatever the shard count.
        let dead_len = (QUEUE_DEAD_LEN / u64::from(self.queue_shards())).max(100);
        for (shard, entries) in by_shard {
            let mut keys = vec![shard.stream(), shard.bytes(), shard.dead()];
            let mut args = vec![QUEUE_GROUP.to_owned(), dead_len.to_string()];
            for (entry, id, reason) in entries {
                keys.push(shard.pending(entry.flow_id.as_deref().unwrap_or("")));
                args.push(id.to_owned());
                args.push(reason.to_owned());
            }
            let _: i64 = self
                .0
                .queue
                .remove
                .evalsha_with_reload(&self.0.client, keys, args)
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    /// One stream's watermark for the flow (ms), with `lag_ms` as the grace.
    async fn shard_watermark(
        &self,
        shard: QueueShard,
        flow_id: &str,
        lag_ms: u64,
    ) -> Result<i64, EngineError> {
        self.0
            .queue
            .watermark
            .evalsha_with_reload(
                &self.0.client,
                vec![shard.stream(), shard.pending(flow_id)],
                vec![lag_ms.to_string()],
            )
            .await
            .map_err(err)
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
        self.register_shards().await.map_err(err)?;
        let n = self.queue_shards();
        let shard = queue_shard_of(&event.flow_id, n);
        let s = &self.0.settings;
        // Each shard holds its share of the caps, so the total holds too
        // (the configuration refuses caps smaller than the shard count).
        let max_len = (s.queue_max_len / u64::from(n)).max(1);
        let max_bytes = (s.queue_max_bytes / u64::from(n)).max(1);
        let reply: String = self
            .0
            .queue
            .push
            .evalsha_with_reload(
                &self.0.client,
                vec![shard.stream(), shard.bytes(), shard.pending(&event.flow_id)],
                vec![
                    json,
                    event.flow_id.clone(),
                    event.offset.clone(),
                    offset.ms.to_string(),
                    max_len.to_string(),
                    max_bytes.to_string(),
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

    /// Reads the streams in rotation, without blocking, and returns the
    /// first non-empty batch; the next call starts at the stream after it,
    /// so a busy shard cannot starve the others. A stream found empty is
    /// skipped for [`IDLE_POLL`], so an idle writer costs about one read
    /// per shard per `IDLE_POLL`. Not a blocking read (`XREADGROUP BLOCK`):
    /// the client multiplexes every command of the node on one connection
    /// per Redis server, and a read blocked there would hold up the room
    /// bus and presence on that server for as long as it waits — nor can
    /// one blocking read cover several shards on a cluster (`CROSSSLOT`).
    async fn take(&self, consumer: &str, max: usize) -> Result<Vec<QueueEntry>, EngineError> {
        self.ensure_up()?;
        let streams = self.view().await.map_err(err)?.streams();
        let now = Instant::now();
        let plan: Vec<(usize, QueueShard, Cursor)> = {
            let mut readers = self.0.queue.readers.lock();
            let reader = readers.entry(consumer.to_owned()).or_default();
            let start = reader.next % streams.len();
            (start..start + streams.len())
                .map(|i| i % streams.len())
                .filter_map(|i| {
                    let c = *reader
                        .cursors
                        .entry(streams[i])
                        .or_insert_with(|| Cursor::new(now));
                    (c.idle_until <= now).then_some((i, streams[i], c))
                })
                .collect()
        };
        let mut failed = None;
        for (i, shard, cursor) in plan {
            let got = self.take_shard(shard, consumer, max, cursor).await;
            let mut readers = self.0.queue.readers.lock();
            let reader = readers.entry(consumer.to_owned()).or_default();
            let c = reader
                .cursors
                .entry(shard)
                .or_insert_with(|| Cursor::new(now));
            match got {
                Ok(raw) => {
                    if cursor.claim_at <= now {
                        c.claim_at = now + CLAIM_EVERY;
                    }
                    // Entries handed out are ours until acknowledged.
                    c.own = !raw.is_empty();
                    if raw.is_empty() {
                        c.idle_until = now + IDLE_POLL;
                        continue;
                    }
                    reader.next = i + 1;
                    return Ok(raw
                        .into_iter()
                        .map(|(id, f)| decode(shard.entry_id(&id), f))
                        .collect());
                }
                // One shard's master failing over must not stop the others
                // from draining: its error is reported only if no other
                // stream had anything.
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(err(e)),
            None => Ok(Vec::new()),
        }
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
        let streams = self.view().await.map_err(err)?.streams();
        let lens: Vec<u64> = try_join_all(streams.iter().map(|s| self.0.client.xlen(s.stream())))
            .await
            .map_err(err)?;
        Ok(lens.into_iter().sum())
    }

    async fn watermark(&self, flow_id: &str) -> Result<Offset, EngineError> {
        self.ensure_up()?;
        let view = self.view().await.map_err(err)?;
        let lag_ms = self.0.settings.enqueue_grace.as_millis() as u64
            + view.at.elapsed().as_millis() as u64
            + VIEW_MARGIN_MS;
        // The flow's shard under every count in use (one while the count
        // has never changed), and the legacy stream while it holds entries.
        let mut shards: BTreeSet<QueueShard> = view
            .counts
            .iter()
            .map(|&n| queue_shard_of(flow_id, n))
            .collect();
        if view.legacy_len > 0 {
            shards.insert(QueueShard::Legacy);
        }
        let marks = try_join_all(
            shards
                .into_iter()
                .map(|s| self.shard_watermark(s, flow_id, lag_ms)),
        )
        .await?;
        let ms = marks.into_iter().min().unwrap_or(0);
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
