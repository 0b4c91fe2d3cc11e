//! Engine.IO timings of one socket: the ping interval and timeout, how
//! long a new socket has to send its CONNECT, and how many sockets one user
//! may hold on a node.

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct SocketIo {
    pub(super) ping_interval: Duration,
    pub(super) ping_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) max_connections_per_user: usize,
}

impl SocketIo {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let ping_interval = millis(vars, "FLOWGATE_PING_INTERVAL_MS", 25_000)?;
        let ping_timeout = millis(vars, "FLOWGATE_PING_TIMEOUT_MS", 60_000)?;
        positive("FLOWGATE_PING_INTERVAL_MS", ping_interval)?;
        positive("FLOWGATE_PING_TIMEOUT_MS", ping_timeout)?;
        Ok(SocketIo {
            ping_interval,
            ping_timeout,
            connect_timeout: positive(
                "FLOWGATE_CONNECT_TIMEOUT_MS",
                // Short: an unauthenticated connection holds a slot and
                // memory, and the stock client sends CONNECT at once.
                millis(vars, "FLOWGATE_CONNECT_TIMEOUT_MS", 10_000)?,
            )?,
            max_connections_per_user: positive(
                "FLOWGATE_MAX_CONNECTIONS_PER_USER",
                super::parse(vars, "FLOWGATE_MAX_CONNECTIONS_PER_USER", 100)?,
            )?,
        })
    }
}
