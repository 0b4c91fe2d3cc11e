//! Log output: `FLOWGATE_LOG_FORMAT`, human-readable text or JSON lines.

use std::collections::HashMap;

use super::{err, get, ConfigError};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        match get(vars, "FLOWGATE_LOG_FORMAT") {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(err(
                "FLOWGATE_LOG_FORMAT",
                format!("{other:?} is not text or json"),
            )),
        }
    }
}
