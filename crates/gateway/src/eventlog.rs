//! The event-log writer: moves room events from the durable queue (Redis)
//! into Postgres in batches, off the hot path.
//!
//! An entry is acknowledged (removed from the queue) only after its batch
//! committed; a Postgres or PgBouncer outage only makes the queue longer.
//! Writes are idempotent (the log's key is derived from the room offset),
//! so a batch retried after a failure that happened after commit is
//! written once.

use std::sync::Arc;
use std::time::Duration;

use flowgate_store::{LoggedEvent, Store};
use prometheus::{IntCounter, IntGauge};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::engine::EventQueue;

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
    /// Events Postgres refused outright, logged in full and dropped so they
    /// do not hold back the rest of the queue.
    pub dead_letters: IntCounter,
}

impl WriterMetrics {
    /// Registers the writer's metrics.
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let written = IntCounter::new(
            "eventlog_written_total",
            "Room events written to the event log",
        )?;
        let failures = IntCounter::new(
            "eventlog_write_failures_total",
            "Failed event-log batch writes",
        )?;
        let backlog = IntGauge::new("eventlog_backlog", "Room events queued and not yet written")?;
        let queue_errors = IntCounter::new(
            "eventlog_queue_errors_total",
            "Failed reads of the event-log queue",
        )?;
        registry.register(Box::new(queue_errors.clone()))?;
        let dead_letters = IntCounter::new(
            "eventlog_dead_letters_total",
            "Events the database refused (logged and dropped)",
        )?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(written.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(backlog.clone()))?;
        Ok(WriterMetrics {
            written,
            failures,
            backlog,
            queue_errors,
            dead_letters,
        })
    }
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
    let mut backoff = Duration::from_millis(100);
    let mut was_failing = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if let Ok(n) = queue.backlog().await {
            metrics.backlog.set(n as i64);
        }
        let entries = match queue.take(&consumer, batch).await {
            Ok(e) => e,
            Err(e) => {
                metrics.queue_errors.inc();
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
        let (ids, events): (Vec<String>, Vec<LoggedEvent>) = entries
            .into_iter()
            .map(|(id, e)| {
                (
                    id,
                    LoggedEvent {
                        flow_id: e.flow_id,
                        offset: e.offset,
                        event: e.event,
                        // Valid JSON by construction (it was serialized
                        // by the gateway); parsed here, off the hot path.
                        data: serde_json::from_str(e.data.get()).unwrap_or_default(),
                        user_id: e.user_id,
                    },
                )
            })
            .unzip();
        match store.write_events(&events).await {
            Ok(n) => {
                metrics.written.inc_by(n);
                if was_failing {
                    info!("event log writes resumed");
                    was_failing = false;
                }
                backoff = Duration::from_millis(100);
                if let Err(e) = queue.ack(&ids).await {
                    // Not acknowledged: the entries come back and are
                    // skipped as already written.
                    warn!(error = %e, "written events not acknowledged");
                }
            }
            Err(e) if e.is_permanent() => {
                // One bad event must not hold the queue back forever: write
                // the batch one by one and set aside what Postgres refuses.
                let mut done = Vec::new();
                for (id, event) in ids.iter().zip(&events) {
                    match store.write_events(std::slice::from_ref(event)).await {
                        Ok(n) => metrics.written.inc_by(n),
                        Err(e) if e.is_permanent() => {
                            metrics.dead_letters.inc();
                            error!(error = %e, event = ?event, "event refused by the database; dropped from the log");
                        }
                        Err(_) => break,
                    }
                    done.push(id.clone());
                }
                if let Err(e) = queue.ack(&done).await {
                    warn!(error = %e, "written events not acknowledged");
                }
            }
            Err(e) => {
                metrics.failures.inc();
                if !was_failing {
                    warn!(error = %e, queued = ids.len(), "event log write failed; events stay queued");
                    was_failing = true;
                }
                sleep_or_stop(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
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

/// Queues an event for the log (a no-op without a database). The caller
/// acknowledges its client only after this returned `Ok`.
pub async fn enqueue(
    app: &crate::app::App,
    event: &crate::engine::QueuedEvent,
) -> Result<(), crate::engine::EngineError> {
    match (&app.store, &app.engine.queue) {
        (Some(_), Some(queue)) => queue.push(event).await,
        _ => Ok(()),
    }
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
