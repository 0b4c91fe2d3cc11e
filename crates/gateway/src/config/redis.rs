//! The Redis engine: `REDIS_URL`, its command timeout, the room streams,
//! and the node heartbeat and presence timings. Without `REDIS_URL` the
//! node runs the embedded in-memory engine and the timings go unused.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, get, millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Redis {
    pub(super) redis_url: Option<String>,
    pub(super) redis_timeout: Duration,
    pub(super) room_log_len: u64,
    pub(super) room_log_ttl: Duration,
    pub(super) node_heartbeat: Duration,
    pub(super) node_dead_after: Duration,
    pub(super) presence_refresh: Duration,
    pub(super) session_ttl: Duration,
}

impl Redis {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let redis_url = get(vars, "REDIS_URL").map(str::to_owned);
        if let Some(url) = &redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(err("REDIS_URL", "must start with redis:// or rediss://"));
            }
        }
        let r = Redis {
            redis_url,
            node_heartbeat: positive(
                "FLOWGATE_NODE_HEARTBEAT_MS",
                millis(vars, "FLOWGATE_NODE_HEARTBEAT_MS", 1_000)?,
            )?,
            node_dead_after: positive(
                "FLOWGATE_NODE_DEAD_AFTER_MS",
                millis(vars, "FLOWGATE_NODE_DEAD_AFTER_MS", 5_000)?,
            )?,
            presence_refresh: positive(
                "FLOWGATE_PRESENCE_REFRESH_MS",
                millis(vars, "FLOWGATE_PRESENCE_REFRESH_MS", 5_000)?,
            )?,
            session_ttl: positive(
                "FLOWGATE_SESSION_TTL_MS",
                millis(vars, "FLOWGATE_SESSION_TTL_MS", 20_000)?,
            )?,
            redis_timeout: positive(
                "FLOWGATE_REDIS_TIMEOUT_MS",
                millis(vars, "FLOWGATE_REDIS_TIMEOUT_MS", 1_000)?,
            )?,
            room_log_len: positive(
                "FLOWGATE_ROOM_LOG_LEN",
                parse(vars, "FLOWGATE_ROOM_LOG_LEN", 1_000)?,
            )?,
            room_log_ttl: Duration::from_secs(positive(
                "FLOWGATE_ROOM_LOG_TTL_SECS",
                parse(vars, "FLOWGATE_ROOM_LOG_TTL_SECS", 86_400)?,
            )?)
            .min(Duration::from_secs(365 * 24 * 3600)),
        };
        // A node is declared dead only after it missed at least two beats,
        // and a session is listed only while it was refreshed at least once
        // in its TTL: otherwise a live node would be reaped, or a live
        // session hidden, by one late tick.
        if r.node_dead_after < r.node_heartbeat * 2 {
            return Err(err(
                "FLOWGATE_NODE_DEAD_AFTER_MS",
                "must be at least twice FLOWGATE_NODE_HEARTBEAT_MS",
            ));
        }
        if r.session_ttl < r.presence_refresh * 2 {
            return Err(err(
                "FLOWGATE_SESSION_TTL_MS",
                "must be at least twice FLOWGATE_PRESENCE_REFRESH_MS",
            ));
        }
        Ok(r)
    }
}
