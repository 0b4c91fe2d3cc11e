//! Engine.IO transports across nodes: the URL other nodes use to reach
//! this one (to forward HTTP long-polling requests of sessions it owns),
//! and how long a WebSocket upgrade may take.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, get, millis, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Transport {
    pub(super) advertise_url: Option<String>,
    pub(super) upgrade_timeout: Duration,
}

impl Transport {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let advertise_url =
            get(vars, "FLOWGATE_ADVERTISE_URL").map(|u| u.trim().trim_end_matches('/').to_owned());
        if let Some(u) = &advertise_url {
            // Forwarding speaks plain HTTP on the internal network.
            let rest = u.strip_prefix("http://").ok_or_else(|| {
                err(
                    "FLOWGATE_ADVERTISE_URL",
                    format!("{u:?} must be http://host:port (the node's internal address)"),
                )
            })?;
            if rest.is_empty() || rest.contains('/') {
                return Err(err(
                    "FLOWGATE_ADVERTISE_URL",
                    format!("{u:?} must be http://host:port, without a path"),
                ));
            }
        }
        let upgrade_timeout = positive(
            "FLOWGATE_UPGRADE_TIMEOUT_MS",
            millis(vars, "FLOWGATE_UPGRADE_TIMEOUT_MS", 10_000)?,
        )?;
        Ok(Transport {
            advertise_url,
            upgrade_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{vars, Config};

    #[test]
    fn advertise_url_must_be_plain_http_without_a_path() {
        let ok = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FLOWGATE_ADVERTISE_URL", "http://10.0.0.5:8080/"),
        ]))
        .unwrap();
        assert_eq!(ok.advertise_url.as_deref(), Some("http://10.0.0.5:8080"));
        for bad in ["10.0.0.5:8080", "https://a:1", "http://a:1/x"] {
            let e = Config::from_vars(&vars(&[
                ("JWT_ACCESS_TOKEN_SECRET", "s"),
                ("FLOWGATE_ADVERTISE_URL", bad),
            ]))
            .unwrap_err();
            assert_eq!(e.var, "FLOWGATE_ADVERTISE_URL", "{bad}");
        }
    }
}
