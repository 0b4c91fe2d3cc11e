//! The engine's Prometheus metrics, registered once at start.

use prometheus::{IntCounter, IntGauge, Registry};

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) up: IntGauge,
    pub(crate) outages: IntCounter,
    pub(crate) limiter_fallback: IntCounter,
    pub(crate) limiter_calls: IntCounter,
    pub(crate) bus_messages: IntCounter,
    pub(crate) bus_lagged: IntCounter,
    pub(crate) bus_undecodable: IntCounter,
    pub(crate) reaped_sessions: IntCounter,
    /// Verifications of this node's presence (see `presence`), and the
    /// entries of failed leaves they removed.
    pub(crate) presence_verifications: IntCounter,
    pub(crate) presence_leftovers: IntCounter,
    pub(crate) resubscribes: IntCounter,
    pub(crate) gap_filled: IntCounter,
    /// Publish script calls, and the room events they carried: their ratio
    /// is the mean batch (see `batches`).
    pub(crate) publish_calls: IntCounter,
    pub(crate) published_events: IntCounter,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let m = IntGauge::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        let c = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let m = IntCounter::new(name, help)?;
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        };
        Ok(Metrics {
            up: g("redis_up", "1 while Redis answers pings")?,
            outages: c("redis_outages_total", "Times Redis became unreachable")?,
            limiter_fallback: c(
                "limiter_fallback_total",
                "Rate-limit decisions taken by the per-node fallback while Redis was unreachable",
            )?,
            limiter_calls: c(
                "limiter_redis_calls_total",
                "Rate-limit decisions that went to Redis (a lease of the shared budget taken, or refused)",
            )?,
            bus_messages: c(
                "bus_messages_total",
                "Room messages this node received from Redis",
            )?,
            bus_undecodable: c(
                "bus_undecodable_total",
                "Room messages this node could not read (another wire-format version, or corrupt) and skipped",
            )?,
            bus_lagged: c(
                "bus_lagged_total",
                "Room messages lost because the subscriber fell behind",
            )?,
            reaped_sessions: c(
                "presence_reaped_sessions_total",
                "Sessions of dead nodes removed by this node",
            )?,
            presence_verifications: c(
                "presence_verifications_total",
                "Times this node verified its presence entries (periodically, or after a reconnect, an outage or a reaping)",
            )?,
            presence_leftovers: c(
                "presence_leftovers_removed_total",
                "Presence entries of this node that no local session held (failed leaves), removed by a verification",
            )?,
            resubscribes: c(
                "bus_resubscribes_total",
                "Times this node re-subscribed its rooms after a reconnect",
            )?,
            gap_filled: c(
                "bus_gap_filled_total",
                "Room messages this node read back from room logs after a lag or reconnect",
            )?,
            publish_calls: c(
                "bus_publish_calls_total",
                "Publish script calls this node sent to Redis (each carries one or more room events)",
            )?,
            published_events: c(
                "bus_published_events_total",
                "Room events this node sent in publish script calls",
            )?,
        })
    }
}
