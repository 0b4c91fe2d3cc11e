//! The engine's Prometheus metrics, registered once at start.

use prometheus::{IntCounter, IntGauge, Registry};

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) up: IntGauge,
    pub(crate) outages: IntCounter,
    pub(crate) limiter_fallback: IntCounter,
    pub(crate) bus_messages: IntCounter,
    pub(crate) bus_lagged: IntCounter,
    pub(crate) reaped_sessions: IntCounter,
    pub(crate) resubscribes: IntCounter,
    pub(crate) gap_filled: IntCounter,
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
            bus_messages: c(
                "bus_messages_total",
                "Room messages this node received from Redis",
            )?,
            bus_lagged: c(
                "bus_lagged_total",
                "Room messages lost because the subscriber fell behind",
            )?,
            reaped_sessions: c(
                "presence_reaped_sessions_total",
                "Sessions of dead nodes removed by this node",
            )?,
            resubscribes: c(
                "bus_resubscribes_total",
                "Times this node re-subscribed its rooms after a reconnect",
            )?,
            gap_filled: c(
                "bus_gap_filled_total",
                "Room messages this node read back from room logs after a lag or reconnect",
            )?,
        })
    }
}
