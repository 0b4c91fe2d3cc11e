//! What a node knows of the queue beyond its own shard count: the shard
//! counts every node has queued under (`flowgate:eventlog:shard-counts`)
//! and the legacy stream's length, read at most every [`VIEW_TTL`]; and
//! the registration of this node's own count.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use fred::prelude::*;

use super::VIEW_TTL;
use crate::keys::{QueueShard, QUEUE_SHARD_COUNTS_KEY};
use crate::RedisEngine;

/// What the queue looks like beyond this node's own shard count, as read
/// at `at`.
#[derive(Debug, Clone)]
pub(super) struct View {
    /// Every shard count queued under, this node's included.
    pub(super) counts: BTreeSet<u32>,
    /// Entries in the legacy stream (0: absent or drained).
    pub(super) legacy_len: u64,
    pub(super) at: Instant,
}

impl View {
    /// The streams writers read: every shard of the largest count, and the
    /// legacy stream while it holds entries.
    pub(super) fn streams(&self) -> Vec<QueueShard> {
        let n = self.counts.iter().copied().max().unwrap_or(1);
        let legacy = (self.legacy_len > 0).then_some(QueueShard::Legacy);
        legacy
            .into_iter()
            .chain((0..n).map(QueueShard::Shard))
            .collect()
    }
}

impl RedisEngine {
    /// This node's shard count.
    pub(super) fn queue_shards(&self) -> u32 {
        self.0.settings.queue_shards.max(1)
    }

    /// Puts this node's shard count in the registry before it first queues
    /// under it, so that writers and watermarks of every node find its
    /// shards.
    pub(super) async fn register_shards(&self) -> Result<(), Error> {
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
    pub(super) async fn view(&self) -> Result<View, Error> {
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
}
