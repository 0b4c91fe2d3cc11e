//! Graceful shutdown timings: how long `/health` warns the load balancer,
//! the window sockets are closed over, and the deadline the process exits
//! by.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, millis, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Drain {
    pub(super) drain_notice: Duration,
    pub(super) drain_window: Duration,
    pub(super) shutdown_deadline: Duration,
}

impl Drain {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let drain_notice = millis(vars, "FLOWGATE_DRAIN_NOTICE_MS", 5_000)?;
        let drain_window = millis(vars, "FLOWGATE_DRAIN_WINDOW_MS", 10_000)?;
        let shutdown_deadline = millis(vars, "FLOWGATE_SHUTDOWN_DEADLINE_MS", 30_000)?;
        if drain_notice + drain_window >= shutdown_deadline {
            return Err(err(
                "FLOWGATE_SHUTDOWN_DEADLINE_MS",
                format!(
                    "must exceed FLOWGATE_DRAIN_NOTICE_MS + FLOWGATE_DRAIN_WINDOW_MS ({} ms), or sockets are cut before they are drained",
                    (drain_notice + drain_window).as_millis()
                ),
            ));
        }
        Ok(Drain {
            drain_notice,
            drain_window,
            shutdown_deadline,
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
            ("FLOWGATE_SHUTDOWN_DEADLINE_MS", "1000"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_SHUTDOWN_DEADLINE_MS");
    }
}
