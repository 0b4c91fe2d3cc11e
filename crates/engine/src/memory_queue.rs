//! The event-log queue of the embedded engine: a single node without Redis
//! that has a database (`DATABASE_URL` set, `REDIS_URL` not) queues its
//! persisted events here, in its own memory, for the event-log writer.
//!
//! It keeps the Redis queue's rules (`flowgate-redis`'s `event_queue`):
//! the same caps in entries and bytes (a full queue refuses, the caller
//! answers `UNAVAILABLE`), the same enqueue grace (an event whose offset
//! is older is refused as stale), and the same per-flow watermark,
//! min(oldest queued offset time of the flow, now − grace). What it cannot
//! keep is durability beyond the process: what is queued and not yet
//! written is lost if the node dies (`docs/semantics.md`); on one node
//! without Redis nothing else outlives the process either.
//!
//! Written by hand: a bounded queue with a per-flow index of offset times
//! is a few maps; no crate adds anything here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::{EngineError, EventQueue, Offset, PushRefused, QueueEntry, QueuedEvent};

/// A queued event, with what the caps and the index need.
struct Held {
    event: QueuedEvent,
    offset_ms: u64,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By id, in queue order.
    entries: BTreeMap<u64, Held>,
    bytes: usize,
    /// Per flow: (offset ms, id) of its queued entries.
    by_flow: HashMap<String, BTreeSet<(u64, u64)>>,
}

/// The embedded engine's event-log queue; see the module docs.
pub struct MemoryQueue {
    inner: Mutex<Inner>,
    max_len: usize,
    max_bytes: usize,
    grace: Duration,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("len", &self.inner.lock().entries.len())
            .finish_non_exhaustive()
    }
}

impl MemoryQueue {
    /// A queue of at most `max_len` events and `max_bytes` bytes of events
    /// (their JSON), refusing events older than `grace`.
    pub fn new(max_len: u64, max_bytes: u64, grace: Duration) -> Self {
        MemoryQueue {
            inner: Mutex::default(),
            max_len: usize::try_from(max_len).unwrap_or(usize::MAX).max(1),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX).max(1),
            grace,
        }
    }

    fn grace_ms(&self) -> u64 {
        self.grace.as_millis() as u64
    }

    fn remove(&self, entries: &[&QueueEntry]) {
        let mut inner = self.inner.lock();
        for e in entries {
            let Ok(id) = e.id.parse::<u64>() else {
                continue;
            };
            let Some(held) = inner.entries.remove(&id) else {
                continue;
            };
            inner.bytes -= held.bytes;
            if let Some(index) = inner.by_flow.get_mut(&held.event.flow_id) {
                index.remove(&(held.offset_ms, id));
                if index.is_empty() {
                    inner.by_flow.remove(&held.event.flow_id);
                }
            }
        }
    }
}

#[async_trait]
impl EventQueue for MemoryQueue {
    async fn admit(&self, _flow_id: &str, bytes: usize) -> Result<(), PushRefused> {
        let inner = self.inner.lock();
        if inner.entries.len() >= self.max_len || inner.bytes + bytes > self.max_bytes {
            return Err(PushRefused::Full);
        }
        Ok(())
    }

    async fn push(&self, event: &QueuedEvent) -> Result<(), PushRefused> {
        let offset: Offset = event
            .offset
            .parse()
            .map_err(|_| EngineError(format!("bad offset {:?}", event.offset)))?;
        let now_ms = crate::now_us() / 1000;
        if offset.ms < now_ms.saturating_sub(self.grace_ms()) {
            return Err(PushRefused::Stale);
        }
        // The bytes the Redis queue counts: the event's JSON.
        let bytes = serde_json::to_string(event)
            .map_err(|e| EngineError(e.to_string()))?
            .len();
        let mut inner = self.inner.lock();
        let max_len = self.max_len + crate::push_margin(self.max_len as u64) as usize;
        let max_bytes = self.max_bytes + crate::push_margin(self.max_bytes as u64) as usize;
        if inner.entries.len() >= max_len || inner.bytes + bytes > max_bytes {
            return Err(PushRefused::Full);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.bytes += bytes;
        inner
            .by_flow
            .entry(event.flow_id.clone())
            .or_default()
            .insert((offset.ms, id));
        inner.entries.insert(
            id,
            Held {
                event: event.clone(),
                offset_ms: offset.ms,
                bytes,
            },
        );
        Ok(())
    }

    /// One process, one writer: the oldest entries, whether handed out
    /// before or not (what was handed out and not acknowledged is the
    /// writer's own, to retry first, as the Redis queue hands it back).
    async fn take(&self, _consumer: &str, max: usize) -> Result<Vec<QueueEntry>, EngineError> {
        let inner = self.inner.lock();
        Ok(inner
            .entries
            .iter()
            .take(max)
            .map(|(id, held)| QueueEntry {
                id: id.to_string(),
                flow_id: Some(held.event.flow_id.clone()),
                event: Ok(held.event.clone()),
            })
            .collect())
    }

    async fn ack(&self, entries: &[&QueueEntry]) -> Result<(), EngineError> {
        self.remove(entries);
        Ok(())
    }

    /// Removes the entry (the writer counts and logs it with its reason;
    /// there is no dead-letter store without Redis).
    async fn dead_letter(&self, entry: &QueueEntry, _reason: &str) -> Result<(), EngineError> {
        self.remove(&[entry]);
        Ok(())
    }

    async fn backlog(&self) -> Result<u64, EngineError> {
        Ok(self.inner.lock().entries.len() as u64)
    }

    async fn watermark(&self, flow_id: &str) -> Result<Offset, EngineError> {
        let now_ms = crate::now_us() / 1000;
        let mut ms = now_ms.saturating_sub(self.grace_ms());
        if let Some(&(oldest, _)) = self
            .inner
            .lock()
            .by_flow
            .get(flow_id)
            .and_then(|index| index.first())
        {
            ms = ms.min(oldest);
        }
        Ok(Offset { ms, seq: 0 })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn event(flow: &str, offset_ms: u64) -> QueuedEvent {
        QueuedEvent {
            flow_id: flow.to_owned(),
            offset: format!("{offset_ms}-0"),
            event: "pod:created".to_owned(),
            data: RawValue::from_string(r#"{"podId":"p"}"#.to_owned()).unwrap(),
            user_id: Some("u".to_owned()),
        }
    }

    fn now_ms() -> u64 {
        crate::now_us() / 1000
    }

    #[tokio::test]
    async fn entries_come_out_in_order_until_acknowledged() {
        let q = MemoryQueue::new(100, 1 << 20, Duration::from_secs(2));
        let t = now_ms();
        for i in 0..3 {
            q.push(&event("f", t + i)).await.unwrap();
        }
        let got = q.take("w", 2).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].event.as_ref().unwrap().offset, format!("{t}-0"));
        // Not acknowledged: handed out again, first.
        let again = q.take("w", 10).await.unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(again[0].id, got[0].id);
        q.ack(&[&got[0], &got[1]]).await.unwrap();
        assert_eq!(q.backlog().await.unwrap(), 1);
        let last = q.take("w", 10).await.unwrap();
        assert_eq!(
            last[0].event.as_ref().unwrap().offset,
            format!("{}-0", t + 2)
        );
        q.dead_letter(&last[0], "refused").await.unwrap();
        assert_eq!(q.backlog().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_by_count_and_by_bytes_and_frees_on_ack() {
        // The cap is what `admit` (asked before the publish) enforces.
        let q = MemoryQueue::new(2, 1 << 20, Duration::from_secs(2));
        let t = now_ms();
        let one = serde_json::to_string(&event("f", t)).unwrap().len();
        for _ in 0..2 {
            q.admit("f", one).await.unwrap();
            q.push(&event("f", t)).await.unwrap();
        }
        assert!(matches!(q.admit("f", one).await, Err(PushRefused::Full)));
        let got = q.take("w", 1).await.unwrap();
        q.ack(&[&got[0]]).await.unwrap();
        q.admit("f", one).await.unwrap();

        let q = MemoryQueue::new(100, 2 * one as u64, Duration::from_secs(2));
        q.push(&event("f", t)).await.unwrap();
        q.admit("f", one).await.unwrap();
        q.push(&event("f", t)).await.unwrap();
        assert!(matches!(q.admit("f", one).await, Err(PushRefused::Full)));
    }

    #[tokio::test]
    async fn a_push_admitted_before_its_publish_has_a_margin_over_the_cap() {
        let q = MemoryQueue::new(2, 1 << 20, Duration::from_secs(2));
        let t = now_ms();
        // Admitted, then others queued in between: still taken, up to the
        // margin; past it, refused.
        let margin = crate::push_margin(2) as usize;
        for _ in 0..2 + margin {
            q.push(&event("f", t)).await.unwrap();
        }
        assert!(matches!(
            q.push(&event("f", t)).await,
            Err(PushRefused::Full)
        ));
    }

    #[tokio::test]
    async fn an_event_older_than_the_grace_is_refused_as_stale() {
        let q = MemoryQueue::new(100, 1 << 20, Duration::from_secs(2));
        let old = now_ms() - 5_000;
        assert!(matches!(
            q.push(&event("f", old)).await,
            Err(PushRefused::Stale)
        ));
        assert_eq!(q.backlog().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_watermark_stays_below_the_oldest_queued_event_of_the_flow() {
        let q = MemoryQueue::new(100, 1 << 20, Duration::from_secs(2));
        let t = now_ms();
        let idle = q.watermark("f").await.unwrap();
        assert!(
            idle.ms <= t - 2_000 + 50 && idle.ms + 2_000 >= t,
            "now − grace"
        );
        q.push(&event("f", t - 1_500)).await.unwrap();
        q.push(&event("g", t - 1_900)).await.unwrap();
        // Wait until now − grace passes the queued event's time.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(q.watermark("f").await.unwrap().ms, t - 1_500, "held back");
        assert_eq!(q.watermark("g").await.unwrap().ms, t - 1_900, "per flow");
        let got = q.take("w", 10).await.unwrap();
        q.ack(&[&got[0]]).await.unwrap();
        assert!(q.watermark("f").await.unwrap().ms > t - 1_500, "released");
    }
}
