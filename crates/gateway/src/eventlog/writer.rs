//! The event-log writer: moves room events from the durable queue (Redis)
//! into Postgres in batches, off the hot path, and keeps the month
//! partitions in place. Each node runs one, and each reads every shard of
//! the queue (the queue rotates over them, see `take`), so any node's
//! writer drains any flow.
//!
//! An entry is acknowledged (removed from the queue) only after its batch
//! committed; a Postgres or PgBouncer outage only makes the queue longer
//! (up to its cap). Writes are idempotent (the log's key is derived from
//! the room offset), so a batch retried after a failure that happened
//! after commit is written once. An entry that can never be written — it
//! cannot be read, or Postgres refuses its data — is dead-lettered: kept
//! aside in Redis with the reason, logged, counted, and acknowledged, so
//! it neither blocks the queue nor its flow's history watermark.

use std::sync::Arc;
use std::time::Duration;

use flowgate_store::{LoggedEvent, Store};
use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::engine::{EventQueue, QueueEntry};

/// Metrics of the writer.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    /// Events written to Postgres (new rows).
    pub written: IntCounter,
    /// Failed batch writes (retried).
    pub failures: IntCounter,
    /// Entries waiting in the queue.
    pub backlog: IntGauge,
    /// Failed reads of the queue (Redis unreachable).
    pub queue_errors: IntCounter,
    /// Entries that can never be written (unreadable, or refused by the
    /// database), moved to the dead-letter stream.
    pub dead_letters: IntCounter,
}

impl WriterMetrics {
    /// Registers the writer's metrics.
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let backlog = IntGauge::new("eventlog_backlog", "Room events queued and not yet written")?;
        registry.register(Box::new(backlog.clone()))?;
        Ok(WriterMetrics {
            written: counter(
                "eventlog_written_total",
                "Room events written to the event log",
            )?,
            failures: counter(
                "eventlog_write_failures_total",
                "Failed event-log batch writes",
            )?,
            backlog,
            queue_errors: counter(
                "eventlog_queue_errors_total",
                "Failed reads of the event-log queue",
            )?,
            dead_letters: counter(
                "eventlog_dead_letters_total",
                "Queue entries that can never be written, moved to the dead-letter stream",
            )?,
        })
    }
}

/// The writer of one node.
struct Writer {
    queue: Arc<dyn EventQueue>,
    store: Store,
    metrics: WriterMetrics,
}

/// Runs until `stop`: take a batch, write it, acknowledge it; back off
/// (up to 5 s) while Redis or Postgres fails.
pub async fn run(
    queue: Arc<dyn EventQueue>,
    store: Store,
    consumer: String,
    batch: usize,
    metrics: WriterMetrics,
    stop: CancellationToken,
) {
    let w = Writer {
        queue,
        store,
        metrics,
    };
    let mut backoff = Duration::from_millis(100);
    let mut was_failing = false;
    let mut backlog_at = tokio::time::Instant::now();
    loop {
        if stop.is_cancelled() {
            return;
        }
        // A gauge for the dashboard, not for the loop: the backlog is one
        // read per queue shard, so not once per batch.
        if backlog_at <= tokio::time::Instant::now() {
            backlog_at = tokio::time::Instant::now() + Duration::from_secs(1);
            if let Ok(n) = w.queue.backlog().await {
                w.metrics.backlog.set(n as i64);
            }
        }
        let entries = match w.queue.take(&consumer, batch).await {
            Ok(e) => e,
            Err(e) => {
                w.metrics.queue_errors.inc();
                warn!(error = %e, "event-log queue unavailable");
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if entries.is_empty() {
            sleep_or_stop(&stop, Duration::from_millis(100)).await;
            continue;
        }
        match w.write(&entries).await {
            Ok(()) => {
                if was_failing {
                    info!("event log writes resumed");
                    was_failing = false;
                }
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                w.metrics.failures.inc();
                if !was_failing {
                    warn!(error = %e, queued = entries.len(), "event log write failed; events stay queued");
                    was_failing = true;
                }
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Writer {
    /// Writes one batch and removes it from the queue. An error leaves the
    /// entries not yet written queued, to be taken again.
    async fn write(&self, entries: &[QueueEntry]) -> Result<(), flowgate_store::StoreError> {
        let mut batch = Vec::with_capacity(entries.len());
        for entry in entries {
            match &entry.event {
                Ok(e) => batch.push((entry, logged(e))),
                Err(why) => self.dead_letter(entry, why).await,
            }
        }
        let events: Vec<LoggedEvent> = batch.iter().map(|(_, e)| e.clone()).collect();
        match self.store.write_events(&events).await {
            Ok(n) => {
                self.metrics.written.inc_by(n);
                let done: Vec<&QueueEntry> = batch.iter().map(|(q, _)| *q).collect();
                self.ack(&done).await;
                Ok(())
            }
            Err(e) if e.is_permanent() => {
                // One bad event must not hold the queue back forever: write
                // the batch one by one and set aside what Postgres refuses.
                for (entry, event) in &batch {
                    match self.store.write_events(std::slice::from_ref(event)).await {
                        Ok(n) => {
                            self.metrics.written.inc_by(n);
                            self.ack(&[entry]).await;
                        }
                        Err(e) if e.is_permanent() => {
                            self.dead_letter(entry, &e.to_string()).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn ack(&self, done: &[&QueueEntry]) {
        if let Err(e) = self.queue.ack(done).await {
            // Not acknowledged: the entries come back and are skipped as
            // already written.
            warn!(error = %e, "written events not acknowledged");
        }
    }

    async fn dead_letter(&self, entry: &QueueEntry, why: &str) {
        self.metrics.dead_letters.inc();
        error!(id = %entry.id, flow = ?entry.flow_id, reason = why, event = ?entry.event.as_ref().ok(), "event-log entry can never be written; dead-lettered");
        if let Err(e) = self.queue.dead_letter(entry, why).await {
            // It comes back with the next batch and is set aside then.
            warn!(error = %e, "entry not dead-lettered");
        }
    }
}

fn logged(e: &crate::engine::QueuedEvent) -> LoggedEvent {
    LoggedEvent {
        flow_id: e.flow_id.clone(),
        offset: e.offset.clone(),
        event: e.event.clone(),
        // Valid JSON by construction (it was serialized by the gateway, or
        // it would not have decoded); parsed here, off the hot path.
        data: serde_json::from_str(e.data.get()).unwrap_or_default(),
        user_id: e.user_id.clone(),
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Keeps the current and next month partitions in place and drops those
/// older than the retention, at start and every six hours.
pub async fn maintain_partitions(store: Store, retention_months: u32, stop: CancellationToken) {
    loop {
        if let Err(e) = store.ensure_partitions_ahead().await {
            warn!(error = %e, "event-log partitions not created");
        }
        if retention_months > 0 {
            if let Err(e) = store.apply_retention(retention_months).await {
                warn!(error = %e, "event-log retention not applied");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
        }
    }
}
