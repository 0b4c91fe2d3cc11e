//! Prometheus metrics of one node, served at `/metrics`.
//!
//! Label values are bounded: event names are labelled only when the relay
//! table or the gateway itself knows them (everything else is `other`), so
//! a client cannot grow the series count by inventing event names.

use std::collections::HashSet;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the node exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Event names that get their own label value.
    known_events: std::sync::Arc<HashSet<String>>,
    /// Open Engine.IO connections, whatever their transport.
    pub connections: IntGauge,
    /// `FLOWGATE_MAX_CONNECTIONS`: with `connections`, how full the node
    /// is (a full node is out of its load balancer, so refusals at the cap
    /// are rare; the ratio is what to alert on).
    pub max_connections: IntGauge,
    /// Engine.IO sessions opened, by the transport they opened with
    /// (`websocket`, `polling`).
    pub connections_opened: IntCounterVec,
    /// Connections refused at the upgrade (cap, drain, origin).
    pub connections_refused: IntCounterVec,
    /// Persisted events the event-log queue refused (`full`, `stale`),
    /// whichever engine holds it.
    pub eventlog_refused: IntCounterVec,
    /// Requests of a session owned by another node, forwarded to it, by
    /// kind (`polling`, `websocket`) and outcome (`ok`, `unknown`, `failed`).
    pub forwarded: IntCounterVec,
    /// Rooms with at least one member on this node.
    pub rooms: IntGauge,
    /// Client events received, by event name.
    pub events_in: IntCounterVec,
    /// Event frames queued to clients, by event name.
    pub events_out: IntCounterVec,
    /// Refused client events, by error code.
    pub refusals: IntCounterVec,
    /// From publish to queued on this node's members.
    pub fanout_latency: Histogram,
    /// Volatile frames dropped for a full queue.
    pub queue_drops: IntCounter,
    /// Clients disconnected for not reading.
    pub slow_consumer_disconnects: IntCounter,
    /// Connections closed for a malformed frame, by reason.
    pub protocol_errors: IntCounterVec,
    /// Engine (bus, presence, limiter) operations that failed.
    pub engine_errors: IntCounterVec,
    /// Recovery attempts by outcome: `recovered`, `unknown` (pid unknown or
    /// window passed), `log_gone` (the room log no longer holds the gap),
    /// `failed` (the shared store could not be read).
    pub recoveries: IntCounterVec,
    /// Sessions moved from HTTP long-polling to WebSocket.
    pub upgrades: IntCounter,
    /// Client bytes held in unfinished frames, across the node.
    pub read_held: IntGauge,
    /// Connections ended because the node's read budget was spent.
    pub read_budget_refused: IntCounter,
    /// 1 while the node drains.
    pub draining: IntGauge,
    /// Drains begun (SIGTERM received).
    pub drains: IntCounter,
    /// 1 while Postgres answers the health check (0 when down or not
    /// configured).
    pub postgres_up: IntGauge,
}

/// Events the gateway itself emits or handles.
const GATEWAY_EVENTS: &[&str] = &[
    "flow:join",
    "flow:leave",
    "auth:refresh",
    "user:joined",
    "user:left",
    "flow:users",
    "connected",
    "error",
    "execution:started",
    "execution:token",
    "execution:completed",
    "execution:error",
];

impl Metrics {
    /// Registers every metric; `relay_events` are the table's client and
    /// outgoing event names.
    pub fn new<'a>(relay_events: impl IntoIterator<Item = &'a str>) -> Self {
        let registry =
            Registry::new_custom(Some("flowgate".into()), None).expect("a static prefix is valid");
        let mut known: HashSet<String> = GATEWAY_EVENTS.iter().map(|s| s.to_string()).collect();
        known.extend(relay_events.into_iter().map(str::to_owned));

        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique");
            m
        }
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        let connections = reg(
            &registry,
            IntGauge::new("connections", "Open Engine.IO connections (any transport)")
                .expect("valid metric"),
        );
        let max_connections = reg(
            &registry,
            IntGauge::new(
                "max_connections",
                "FLOWGATE_MAX_CONNECTIONS: at it, /health is 503 and new connections are refused",
            )
            .expect("valid metric"),
        );
        let rooms = reg(
            &registry,
            IntGauge::new("rooms", "Rooms with a member on this node").expect("valid metric"),
        );
        let fanout_latency = reg(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "fanout_latency_seconds",
                    "Time from publish to the frame being queued to this node's members",
                )
                .buckets(vec![
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1.0,
                ]),
            )
            .expect("valid metric"),
        );
        let queue_drops = reg(
            &registry,
            IntCounter::new(
                "queue_drops_total",
                "Volatile frames dropped for a full client queue",
            )
            .expect("valid metric"),
        );
        let slow_consumer_disconnects = reg(
            &registry,
            IntCounter::new(
                "slow_consumer_disconnects_total",
                "Clients disconnected because their queue stayed full",
            )
            .expect("valid metric"),
        );
        let metrics = Metrics {
            known_events: std::sync::Arc::new(known),
            connections,
            max_connections,
            connections_opened: counter_vec(
                "connections_opened_total",
                "Engine.IO sessions opened, by transport",
                "transport",
            ),
            forwarded: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "forwarded_requests_total",
                        "Requests of another node's session forwarded to it",
                    ),
                    &["kind", "outcome"],
                )
                .expect("valid metric"),
            ),
            connections_refused: counter_vec(
                "connections_refused_total",
                "Upgrades refused",
                "reason",
            ),
            eventlog_refused: counter_vec(
                "eventlog_refused_total",
                "Persisted events the event-log queue refused (full: at its cap; stale: queued too late); a client's is answered UNAVAILABLE",
                "reason",
            ),
            rooms,
            events_in: counter_vec("events_in_total", "Client events received", "event"),
            events_out: counter_vec(
                "events_out_total",
                "Event frames queued to clients",
                "event",
            ),
            refusals: counter_vec(
                "refusals_total",
                "Refused client events by error code",
                "code",
            ),
            fanout_latency,
            queue_drops,
            slow_consumer_disconnects,
            protocol_errors: counter_vec(
                "protocol_errors_total",
                "Connections closed for a malformed frame",
                "reason",
            ),
            engine_errors: counter_vec(
                "engine_errors_total",
                "Failed engine operations",
                "operation",
            ),
            recoveries: counter_vec(
                "recoveries_total",
                "Connection state recovery attempts by outcome",
                "outcome",
            ),
            upgrades: reg(
                &registry,
                IntCounter::new("upgrades_total", "Polling sessions upgraded to WebSocket")
                    .expect("valid metric"),
            ),
            read_held: reg(
                &registry,
                IntGauge::new(
                    "read_held_bytes",
                    "Client bytes held in frames not yet whole (bounded by FLOWGATE_READ_BUDGET_BYTES)",
                )
                .expect("valid metric"),
            ),
            read_budget_refused: reg(
                &registry,
                IntCounter::new(
                    "read_budget_refused_total",
                    "Connections ended because FLOWGATE_READ_BUDGET_BYTES was spent",
                )
                .expect("valid metric"),
            ),
            draining: reg(
                &registry,
                IntGauge::new("draining", "1 while the node drains").expect("valid metric"),
            ),
            drains: reg(
                &registry,
                IntCounter::new("drains_total", "Drains begun").expect("valid metric"),
            ),
            postgres_up: reg(
                &registry,
                IntGauge::new("postgres_up", "1 while Postgres answers the health check")
                    .expect("valid metric"),
            ),
            registry,
        };
        // Every outcome and operation is exported from the start, at 0: an
        // alert on `rate(...{outcome="failed"}[5m])` or a panel then has a
        // series to evaluate before the first failure.
        zero(
            &metrics.recoveries,
            &["recovered", "unknown", "log_gone", "failed"],
        );
        zero(
            &metrics.engine_errors,
            &[
                "limiter",
                "locks",
                "presence",
                "publish",
                "queue",
                "replay",
                "sessions",
                "subscribe",
                "unsubscribe",
            ],
        );
        // The same for the reasons and codes dashboards and alerts name
        // (deploy/prometheus/alerts.yml, deploy/grafana/flowgate.json).
        zero(
            &metrics.connections_refused,
            &[
                "bad request",
                "capacity",
                "draining",
                "http cap",
                "origin",
                "unauthenticated per address",
                "unknown sid",
            ],
        );
        zero(
            &metrics.protocol_errors,
            &[
                "bad attachments",
                "bad websocket frame",
                "bad engine.io packet",
                "bad event",
                "bad socket.io packet",
                "connect churn",
                "CONNECT_ERROR from a client",
                "invalid utf-8",
                "oversize frame",
                "unexpected binary frame",
            ],
        );
        zero(&metrics.eventlog_refused, &["full", "stale"]);
        zero(
            &metrics.refusals,
            &[
                "INVALID_FLOW_ID",
                "NOT_IN_FLOW",
                "FORBIDDEN",
                "RATE_LIMIT",
                "INVALID_PAYLOAD",
                "UNKNOWN_EVENT",
                "JOIN_ERROR",
                "LOCKED",
                "NOT_LOCK_OWNER",
                "UNAVAILABLE",
            ],
        );
        metrics
    }

    /// The registry, for collectors registered by other crates (the Redis
    /// engine's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts and logs a failed engine operation (the caller refuses or
    /// carries on, as the operation allows).
    pub fn engine_failed(
        &self,
        operation: &'static str,
        error: &dyn std::fmt::Display,
        room: &str,
        what: &str,
    ) {
        self.engine_errors.with_label_values(&[operation]).inc();
        tracing::warn!(operation, error = %error, room, "{what}");
    }

    /// The label value for an event name.
    pub fn event_label<'a>(&self, event: &'a str) -> &'a str {
        if self.known_events.contains(event) {
            event
        } else {
            "other"
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Exports each of `labels` at 0 (see `Metrics::new`).
fn zero(vec: &IntCounterVec, labels: &[&str]) {
    for l in labels {
        vec.with_label_values(&[l]);
    }
}
