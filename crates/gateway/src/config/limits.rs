//! What one socket and one node may take: frame size, attachments, the
//! per-user rate, the outbound queue and its slow-consumer grace, and the
//! connection cap.

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Limits {
    pub(super) max_payload: usize,
    pub(super) max_attachments: usize,
    pub(super) rate_per_sec: u32,
    pub(super) rate_burst: u32,
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
            max_attachments: parse(vars, "FLOWGATE_MAX_ATTACHMENTS", 10)?,
            rate_per_sec: positive(
                "FLOWGATE_RATE_LIMIT_PER_SEC",
                parse(vars, "FLOWGATE_RATE_LIMIT_PER_SEC", 20)?,
            )?,
            rate_burst: positive(
                "FLOWGATE_RATE_LIMIT_BURST",
                parse(vars, "FLOWGATE_RATE_LIMIT_BURST", 20)?,
            )?,
            outbound_queue: positive(
                "FLOWGATE_OUTBOUND_QUEUE",
                parse(vars, "FLOWGATE_OUTBOUND_QUEUE", 1024)?,
            )?,
            outbound_queue_bytes: positive(
                "FLOWGATE_OUTBOUND_QUEUE_BYTES",
                parse(vars, "FLOWGATE_OUTBOUND_QUEUE_BYTES", 2 << 20)?,
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
    }
}
