//! Connection state recovery: how long a lost session may be recovered,
//! and how much a replay may hold.

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Recovery {
    pub(super) recovery_window: Duration,
    pub(super) recovery_max_bytes: usize,
}

impl Recovery {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Recovery {
            recovery_window: millis(vars, "FLOWGATE_RECOVERY_WINDOW_MS", 120_000)?,
            recovery_max_bytes: positive(
                "FLOWGATE_RECOVERY_MAX_BYTES",
                parse(vars, "FLOWGATE_RECOVERY_MAX_BYTES", 8 << 20)?,
            )?,
        })
    }
}
