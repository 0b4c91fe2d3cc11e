//! The durable event log's queue in Redis: its cap (what a long database
//! outage may fill before persisted events are refused) and the grace that
//! bounds how late an event may enter it (history holds back the latest
//! events this long, so paging never skips one that commits later).

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, parse, positive, ConfigError};

/// The event-log queue's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// `FLOWGATE_EVENTLOG_QUEUE_MAX` (1 000 000): entries the queue may
    /// hold; beyond it persisted events are refused with `UNAVAILABLE`.
    pub queue_max_len: u64,
    /// `FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES` (256 MiB): bytes of events the
    /// queue may hold, same policy.
    pub queue_max_bytes: u64,
    /// `FLOWGATE_EVENTLOG_GRACE_MS` (2 000): an event not queued this long
    /// after its publication is refused; history serves only events older
    /// than this (and below every event still queued for the flow).
    pub enqueue_grace: Duration,
}

impl EventLogConfig {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(EventLogConfig {
            queue_max_len: positive(
                "FLOWGATE_EVENTLOG_QUEUE_MAX",
                parse(vars, "FLOWGATE_EVENTLOG_QUEUE_MAX", 1_000_000)?,
            )?,
            queue_max_bytes: positive(
                "FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES",
                parse(vars, "FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES", 256 << 20)?,
            )?,
            enqueue_grace: positive(
                "FLOWGATE_EVENTLOG_GRACE_MS",
                millis(vars, "FLOWGATE_EVENTLOG_GRACE_MS", 2_000)?,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::vars;
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = EventLogConfig::from_vars(&vars(&[])).unwrap();
        assert_eq!(c.queue_max_len, 1_000_000);
        assert_eq!(c.queue_max_bytes, 256 << 20);
        assert_eq!(c.enqueue_grace, Duration::from_secs(2));
        let c = EventLogConfig::from_vars(&vars(&[("FLOWGATE_EVENTLOG_QUEUE_MAX", "5")])).unwrap();
        assert_eq!(c.queue_max_len, 5);
        for var in [
            "FLOWGATE_EVENTLOG_QUEUE_MAX",
            "FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES",
            "FLOWGATE_EVENTLOG_GRACE_MS",
        ] {
            for bad in ["0", "x", "-1"] {
                assert_eq!(
                    EventLogConfig::from_vars(&vars(&[(var, bad)]))
                        .unwrap_err()
                        .var,
                    var
                );
            }
        }
    }
}
