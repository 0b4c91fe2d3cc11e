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
//!   shard's share is reached, `admit` refuses — before the event is
//!   published, so nobody receives it — and the caller answers
//!   `UNAVAILABLE`; the event is not logged (it is never acknowledged and
//!   then lost). `push` allows a margin over the share
//!   ([`push_margin`]) for what others queued between an event's
//!   admission and its push. A long database outage therefore fills the
//!   queue up to the cap (and the margin) and no further, instead of filling Redis and taking
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
//!
//! # Files
//!
//! This file: the queue's state, `push`, `take`, `ack`, dead letters and
//! watermarks (the `EventQueue` trait). `view`: the shard counts in use
//! and the legacy stream's length. `reader`: a writer's rotation over the
//! streams and the parsing of raw entries. `admit`: whether a shard can
//! take an event, asked before the event is published. `lua`: the scripts.

mod admit;
mod lua;
mod reader;
mod view;

use reader::{decode, Cursor, Reader};
use view::View;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flowgate_engine::{
    push_margin, EngineError, EventQueue, Offset, PushRefused, QueueEntry, QueuedEvent,
};
use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::future::try_join_all;
use parking_lot::Mutex;

use crate::keys::{queue_shard_of, QueueShard, QUEUE_DEAD_LEN, QUEUE_GROUP};
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
/// are taken over once idle for [`QUEUE_CLAIM_IDLE_MS`](crate::keys::QUEUE_CLAIM_IDLE_MS)).
const CLAIM_EVERY: Duration = Duration::from_secs(5);

/// The queue's scripts, loaded once, and what a node remembers of it.
pub(crate) struct QueueState {
    push: Script,
    fill: Script,
    /// Per shard stream: its fill when last read, and what this node
    /// admitted since. While that is recent and under half of both caps,
    /// `admit` needs no call (see there).
    roomy: Mutex<HashMap<String, admit::Fill>>,
    remove: Script,
    watermark: Script,
    /// This node's shard count is in [`QUEUE_SHARD_COUNTS_KEY`](crate::keys::QUEUE_SHARD_COUNTS_KEY).
    registered: AtomicBool,
    view: Mutex<Option<View>>,
    /// Per consumer (a node has one; tests play several).
    readers: Mutex<HashMap<String, Reader>>,
}

impl QueueState {
    pub(crate) fn new() -> Self {
        QueueState {
            push: Script::from_lua(lua::PUSH),
            fill: Script::from_lua(lua::FILL),
            roomy: Mutex::new(HashMap::new()),
            remove: Script::from_lua(lua::REMOVE),
            watermark: Script::from_lua(lua::WATERMARK),
            registered: AtomicBool::new(false),
            view: Mutex::new(None),
            readers: Mutex::new(HashMap::new()),
        }
    }
}

impl RedisEngine {
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

impl RedisEngine {
    /// Each shard holds its share of the caps, so the total holds too
    /// (the configuration refuses caps smaller than the shard count).
    pub(crate) fn shard_caps(&self, shards: u32) -> (u64, u64) {
        let s = &self.0.settings;
        (
            (s.queue_max_len / u64::from(shards)).max(1),
            (s.queue_max_bytes / u64::from(shards)).max(1),
        )
    }
}

#[async_trait]
impl EventQueue for RedisEngine {
    async fn admit(&self, flow_id: &str, bytes: usize) -> Result<(), PushRefused> {
        self.admit_event(flow_id, bytes).await
    }

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
        let (max_len, max_bytes) = self.shard_caps(n);
        // Admitted before its publish: the margin keeps what other
        // sessions queued in between from refusing it now.
        let max_len = max_len + push_margin(max_len);
        let max_bytes = max_bytes + push_margin(max_bytes);
        let s = &self.0.settings;
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
        // Counted by the gateway, for every engine alike.
        match reply.as_str() {
            "full" => Err(PushRefused::Full),
            "stale" => Err(PushRefused::Stale),
            _ => Ok(()),
        }
    }

    /// Reads the streams in rotation, without blocking, and returns the
    /// first non-empty batch; the next call starts at the stream after it,
    /// so a busy shard cannot starve the others. A stream found empty is
    /// skipped for `IDLE_POLL`, so an idle writer costs about one read
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
