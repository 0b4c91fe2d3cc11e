//! The durable event log's queue in Redis: how many streams it is sharded
//! over, its cap (what a long database outage may fill before persisted
//! events are refused) and the grace that bounds how late an event may
//! enter it (history holds back the latest events this long, so paging
//! never skips one that commits later).

use std::collections::HashMap;
use std::time::Duration;

use super::{err, millis, parse, positive, ConfigError};

/// More shards than this would only cost the writers empty reads.
const MAX_SHARDS: u32 = 1024;

/// The event-log queue's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// `FLOWGATE_EVENTLOG_SHARDS` (16): streams the queue is sharded over
    /// by flow, each under its own hash tag, so that on a Redis Cluster
    /// persisted events spread over the masters. Every node should use the
    /// same count; a change is safe (old shards are drained).
    pub shards: u32,
    /// `FLOWGATE_EVENTLOG_QUEUE_MAX` (1 000 000): entries the queue may
    /// hold, split evenly over the shards (each holds 1/`shards`); beyond
    /// its shard's share a persisted event is refused with `UNAVAILABLE`.
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
        let shards = positive(
            "FLOWGATE_EVENTLOG_SHARDS",
            parse(vars, "FLOWGATE_EVENTLOG_SHARDS", 16u32)?,
        )?;
        if shards > MAX_SHARDS {
            return Err(err(
                "FLOWGATE_EVENTLOG_SHARDS",
                format!("must be at most {MAX_SHARDS}"),
            ));
        }
        let c = EventLogConfig {
            shards,
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
        };
        // Each shard holds its share of the caps: a share of zero would
        // refuse every event of the flows in that shard.
        for (var, cap) in [
            ("FLOWGATE_EVENTLOG_QUEUE_MAX", c.queue_max_len),
            ("FLOWGATE_EVENTLOG_QUEUE_MAX_BYTES", c.queue_max_bytes),
        ] {
            if cap < u64::from(shards) {
                return Err(err(
                    var,
                    "must be at least FLOWGATE_EVENTLOG_SHARDS (each shard holds its share)",
                ));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vars;
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = EventLogConfig::from_vars(&vars(&[])).unwrap();
        assert_eq!(c.shards, 16);
        assert_eq!(c.queue_max_len, 1_000_000);
        assert_eq!(c.queue_max_bytes, 256 << 20);
        assert_eq!(c.enqueue_grace, Duration::from_secs(2));
        let c = EventLogConfig::from_vars(&vars(&[
            ("FLOWGATE_EVENTLOG_QUEUE_MAX", "5"),
            ("FLOWGATE_EVENTLOG_SHARDS", "5"),
        ]))
        .unwrap();
        assert_eq!((c.queue_max_len, c.shards), (5, 5));
        // A cap smaller than the shard count would leave shards no room.
        let e =
            EventLogConfig::from_vars(&vars(&[("FLOWGATE_EVENTLOG_QUEUE_MAX", "5")])).unwrap_err();
        assert_eq!(e.var, "FLOWGATE_EVENTLOG_QUEUE_MAX");
        let e =
            EventLogConfig::from_vars(&vars(&[("FLOWGATE_EVENTLOG_SHARDS", "1025")])).unwrap_err();
        assert_eq!(e.var, "FLOWGATE_EVENTLOG_SHARDS");
        for var in [
            "FLOWGATE_EVENTLOG_SHARDS",
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
