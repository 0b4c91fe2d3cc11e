//! The durable event log: persisted room events go from the room bus into
//! a queue in Redis (before the client's ack), from there into Postgres in
//! batches ([`writer`]), and back out as history, paged by offset. The
//! queue is sharded by flow (`FLOWGATE_EVENTLOG_SHARDS`, see the Redis
//! engine's `event_queue`): a flow's events share one shard, so its
//! watermark below is read from that shard alone.
//!
//! # History never skips an event that commits later
//!
//! Offsets are assigned when an event is published, but events reach
//! Postgres later and out of order: every node runs a writer, each takes
//! its own batches, and an event is queued a moment after its offset was
//! assigned. A page read while writer A still holds offset 10 and writer
//! B already committed offset 11 would end at 11, and a client paging on
//! with `after=11` would never see 10.
//!
//! So history serves only offsets below the flow's **watermark**, a time
//! (ms) below which no event of the flow can still appear:
//!
//! - every queued event is indexed under its flow by its offset time until
//!   its batch has committed (it leaves the index when it is acknowledged,
//!   in the same script), so the oldest indexed one bounds the watermark;
//! - an event not yet queued is covered by the enqueue grace: the queue
//!   refuses (client: `UNAVAILABLE`, event not logged) an event whose
//!   offset time is older than `FLOWGATE_EVENTLOG_GRACE_MS` at Redis time
//!   when the push lands, so "now − grace" bounds the watermark too.
//!
//! watermark = min(oldest queued offset time of the flow, now − grace),
//! read in Redis *before* Postgres is queried: anything below it that will
//! ever be in the log was committed before the read began. The cost is
//! that history trails the live room by the grace (2 s by default; up to
//! 0.3 s more, the age of the cached view of the queue's shards that the
//! watermark is lowered by), and that a page may end short of `limit`
//! before the watermark; its `next`
//! is then `null` and a client polls again from its last offset. An entry
//! that can never be written is dead-lettered, which also releases the
//! watermark it held.
//!
//! # A full queue refuses
//!
//! The queue is capped (`FLOWGATE_EVENTLOG_QUEUE_MAX` entries,
//! `FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES` bytes, each shard holding its even
//! share, so the total holds with no counter across slots). At its
//! shard's share, persisted events are refused with `UNAVAILABLE` (counted
//! in `flowgate_eventlog_refused_total{reason="full"}`): an acknowledged
//! event is never dropped, and a long Postgres outage cannot fill Redis.
//! Once the database is back the writers drain the queue and events are
//! accepted again.

pub mod writer;

pub use writer::{maintain_partitions, run, WriterMetrics};

use flowgate_store::{LoggedEvent, Store, StoreError};
use serde::Serialize;

use crate::engine::{EngineError, EventQueue, Offset, PushRefused};

/// Queues an event for the log (a no-op without a database). The caller
/// acknowledges its client only after this returned `Ok`.
pub async fn enqueue(
    app: &crate::app::App,
    event: &crate::engine::QueuedEvent,
) -> Result<(), PushRefused> {
    let r = match (&app.store, &app.engine.queue) {
        (Some(_), Some(queue)) => queue.push(event).await,
        _ => Ok(()),
    };
    let reason = match &r {
        Err(PushRefused::Full) => "full",
        Err(PushRefused::Stale) => "stale",
        _ => return r,
    };
    app.metrics
        .eventlog_refused
        .with_label_values(&[reason])
        .inc();
    r
}

/// Asks the queue whether persisted event `event` of `flow_id` with
/// `data` would be taken, before it is published: a refusal then reaches
/// the sender before anyone received the event ("nothing was relayed or
/// stored"). Counted as `full` like a refused push.
pub async fn admit(
    app: &crate::app::App,
    flow_id: &str,
    event: &str,
    data: &serde_json::value::RawValue,
) -> Result<(), PushRefused> {
    // About the queued entry's JSON: the payload, the names, the offset
    // and user id, and the field names around them.
    let bytes = data.get().len() + event.len() + flow_id.len() + 96;
    let r = match (&app.store, &app.engine.queue) {
        (Some(_), Some(queue)) => queue.admit(flow_id, bytes).await,
        _ => Ok(()),
    };
    if matches!(r, Err(PushRefused::Full)) {
        app.metrics
            .eventlog_refused
            .with_label_values(&["full"])
            .inc();
    }
    r
}

/// Whether a payload holds a NUL character, which Postgres' `jsonb` refuses:
/// such an event is refused at the door rather than acked and then lost.
pub fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// One page of a flow's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPage {
    /// Events after the requested offset, below the watermark, in order.
    pub events: Vec<LoggedEvent>,
    /// Where the next page starts, when this one is full.
    pub next: Option<String>,
    /// Every event of the flow below this offset is final: it is in the
    /// log now or never will be.
    pub watermark: String,
}

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The queue (for the watermark) is unreachable.
    #[error("event-log queue: {0}")]
    Queue(#[from] EngineError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Up to `limit` events of `flow_id` after `after`, below the flow's
/// watermark.
pub async fn history(
    queue: &dyn EventQueue,
    store: &Store,
    flow_id: &str,
    after: Option<Offset>,
    limit: i64,
) -> Result<HistoryPage, HistoryError> {
    // The watermark first: what Postgres shows afterwards below it is final.
    let watermark = queue.watermark(flow_id).await?;
    let below_ms = i64::try_from(watermark.ms).unwrap_or(i64::MAX);
    let after = after.map(|o| o.to_string());
    let events = store
        .events(flow_id, after.as_deref(), below_ms, limit)
        .await?;
    let next = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.offset.clone()))
        .flatten();
    Ok(HistoryPage {
        events,
        next,
        watermark: watermark.to_string(),
    })
}
