//! The durable queue between the room bus and the event-log writer, as
//! the gateway sees it: what goes in, what a writer takes out, and the
//! per-flow watermark history is served below.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::{EngineError, Offset};

/// An event waiting in the durable queue to be written to the event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueuedEvent {
    /// The flow.
    pub flow_id: String,
    /// Its room offset.
    pub offset: String,
    /// The event members received.
    pub event: String,
    /// Its payload, as the JSON text the room received (not parsed again
    /// on the hot path; the writer parses it).
    pub data: Box<RawValue>,
    /// The sender, when a user sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// One entry taken from the durable queue.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    /// The queue's id of the entry (what `ack` and `dead_letter` take).
    pub id: String,
    /// The flow the entry names, even when the event itself is unreadable
    /// (so the flow's watermark can be released).
    pub flow_id: Option<String>,
    /// The event, or why it cannot be read.
    pub event: Result<QueuedEvent, String>,
}

/// Why the queue refused an event: the caller answers `UNAVAILABLE` and the
/// event is never written to the log.
#[derive(Debug, Clone, Error)]
pub enum PushRefused {
    /// The queue is at its length or byte cap (the log's database has been
    /// down for a while): new persisted events are refused rather than
    /// letting the queue grow until it takes the shared store down.
    #[error("event-log queue full")]
    Full,
    /// The event's offset is older than the enqueue grace: a history reader
    /// may already have paged past it, so it must not enter the log.
    #[error("event too old for the event-log queue")]
    Stale,
    /// The queue could not be reached.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The queue between the room bus and the event-log writer. It must outlive
/// a database outage: the writer acknowledges entries only once written.
#[async_trait]
pub trait EventQueue: Send + Sync + 'static {
    /// Queues an event durably, unless the queue is full or the event is
    /// too old to be logged without a reader skipping it.
    async fn push(&self, event: &QueuedEvent) -> Result<(), PushRefused>;
    /// Whether an event of `bytes` for `flow_id` would be taken now: asked
    /// before the event is published, so that an event the queue cannot
    /// take is refused before anyone received it. `push` then allows a
    /// margin over the caps ([`push_margin`]), so that an admitted event is
    /// not refused as full by what other sessions queued in between.
    async fn admit(&self, flow_id: &str, bytes: usize) -> Result<(), PushRefused>;
    /// Up to `max` entries for `consumer`: first its own unacknowledged
    /// ones, then entries abandoned by other consumers, then new ones.
    async fn take(&self, consumer: &str, max: usize) -> Result<Vec<QueueEntry>, EngineError>;
    /// Removes written entries.
    async fn ack(&self, entries: &[&QueueEntry]) -> Result<(), EngineError>;
    /// Moves an entry that can never be written (unreadable, or refused by
    /// the database) to the dead-letter stream, with the reason, and
    /// removes it from the queue.
    async fn dead_letter(&self, entry: &QueueEntry, reason: &str) -> Result<(), EngineError>;
    /// Entries not yet written.
    async fn backlog(&self) -> Result<u64, EngineError>;
    /// The flow's watermark: every event of the flow with an offset below
    /// it that will ever be in the log is in it now. History serves only
    /// offsets below it.
    async fn watermark(&self, flow_id: &str) -> Result<Offset, EngineError>;
}

/// What `push` allows over a cap (`cap` entries or bytes) for events
/// admitted before their publish: a 1/16 of the cap, at least 64.
pub fn push_margin(cap: u64) -> u64 {
    (cap / 16).max(64)
}
