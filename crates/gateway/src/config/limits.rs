//! What one socket and one node may take: frame size, attachments, the
//! per-user rate, the outbound queue and its slow-consumer grace, and the
//! connection cap.

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, parse, positive, within, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Limits {
    pub(super) max_payload: usize,
    pub(super) max_payload_before_connect: usize,
    pub(super) read_budget: usize,
    pub(super) max_attachments: usize,
    pub(super) rate_per_sec: u32,
    pub(super) rate_burst: u32,
    pub(super) rate_lease: u32,
    pub(super) rate_lease_for: Duration,
    pub(super) outbound_queue: usize,
    pub(super) outbound_queue_bytes: usize,
    pub(super) slow_consumer_grace: Duration,
    pub(super) max_connections: usize,
}

impl Limits {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Limits {
            max_payload: positive(
                "FLOWGATE_MAX_PAYLOAD",
                parse(vars, "FLOWGATE_MAX_PAYLOAD", 1_000_000)?,
            )?,
            // A CONNECT with its token is a few KiB; before it, a socket is
            // anyone's, so it may hold no more than this (read_budget.rs).
            max_payload_before_connect: positive(
                "FLOWGATE_MAX_PAYLOAD_BEFORE_CONNECT",
                parse(vars, "FLOWGATE_MAX_PAYLOAD_BEFORE_CONNECT", 64 * 1024)?,
            )?,
            // What every connection's unfinished frames may hold together.
            read_budget: within(
                "FLOWGATE_READ_BUDGET_BYTES",
                parse(vars, "FLOWGATE_READ_BUDGET_BYTES", 256 << 20)?,
                1 << 20,
                1 << 40,
            )?,
            max_attachments: parse(vars, "FLOWGATE_MAX_ATTACHMENTS", 10)?,
            rate_per_sec: positive(
                "FLOWGATE_RATE_LIMIT_PER_SEC",
                parse(vars, "FLOWGATE_RATE_LIMIT_PER_SEC", 20)?,
            )?,
            rate_burst: positive(
                "FLOWGATE_RATE_LIMIT_BURST",
                parse(vars, "FLOWGATE_RATE_LIMIT_BURST", 20)?,
            )?,
            // Tokens a node takes from the shared budget per Redis call;
            // see the limiter (`flowgate-redis`) for the bound this puts on
            // over-admission. 1 = one call per event, exact.
            rate_lease: within(
                "FLOWGATE_RATE_LIMIT_LEASE",
                parse(vars, "FLOWGATE_RATE_LIMIT_LEASE", 5)?,
                1,
                1000,
            )?,
            rate_lease_for: millis(vars, "FLOWGATE_RATE_LIMIT_LEASE_MS", 5_000)?,
            outbound_queue: within(
                "FLOWGATE_OUTBOUND_QUEUE",
                parse(vars, "FLOWGATE_OUTBOUND_QUEUE", 1024)?,
                1,
                1 << 20,
            )?,
            // Times the connection cap, this is the node's worst case for
            // queued bytes: keep it within what a node's memory allows.
            outbound_queue_bytes: within(
                "FLOWGATE_OUTBOUND_QUEUE_BYTES",
                parse(vars, "FLOWGATE_OUTBOUND_QUEUE_BYTES", 2 << 20)?,
                1 << 10,
                1 << 30,
            )?,
            slow_consumer_grace: millis(vars, "FLOWGATE_SLOW_CONSUMER_MS", 5_000)?,
            max_connections: positive(
                "FLOWGATE_MAX_CONNECTIONS",
                parse(vars, "FLOWGATE_MAX_CONNECTIONS", 100_000)?,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{vars, Config};

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_MAX_PAYLOAD", "0"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_MAX_PAYLOAD");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_OUTBOUND_QUEUE_BYTES", "10"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_OUTBOUND_QUEUE_BYTES");
    }

    #[test]
    fn cross_checks_name_the_variable() {
        for (pairs, var) in [
            (
                &[
                    ("FLOWGATE_NODE_HEARTBEAT_MS", "1000"),
                    ("FLOWGATE_NODE_DEAD_AFTER_MS", "1500"),
                ][..],
                "FLOWGATE_NODE_DEAD_AFTER_MS",
            ),
            (
                &[
                    ("FLOWGATE_PRESENCE_REFRESH_MS", "5000"),
                    ("FLOWGATE_SESSION_TTL_MS", "6000"),
                ][..],
                "FLOWGATE_SESSION_TTL_MS",
            ),
            (
                &[("FLOWGATE_PING_INTERVAL_MS", "99999999999999")][..],
                "FLOWGATE_PING_INTERVAL_MS",
            ),
            (&[("JWT_LEEWAY_SECS", "86400")][..], "JWT_LEEWAY_SECS"),
            (&[("FLOWGATE_DEMO", "enabled")][..], "FLOWGATE_DEMO"),
            (
                &[("FLOWGATE_SERVICE_TOKEN", "tok\n")][..],
                "FLOWGATE_SERVICE_TOKEN",
            ),
            (
                &[
                    ("FLOWGATE_ROOM_LOG_TTL_SECS", "60"),
                    ("FLOWGATE_RECOVERY_WINDOW_MS", "120000"),
                ][..],
                "FLOWGATE_RECOVERY_WINDOW_MS",
            ),
        ] {
            let mut all = vec![("JWT_ACCESS_TOKEN_SECRET", "s")];
            all.extend_from_slice(pairs);
            let e = Config::from_vars(&vars(&all)).unwrap_err();
            assert_eq!(e.var, var, "{pairs:?}: {e}");
        }
    }
}
