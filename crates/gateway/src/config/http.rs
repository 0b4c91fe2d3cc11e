//! The HTTP listeners: the admin port (health and metrics apart from the
//! client port), header and body deadlines, and caps on open connections.

use std::collections::HashMap;
use std::time::Duration;

use super::{millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Http {
    pub(super) admin_port: Option<u16>,
    pub(super) http_header_timeout: Duration,
    pub(super) http_body_timeout: Duration,
    pub(super) max_http_connections: Option<usize>,
    pub(super) max_unauthenticated_per_ip: usize,
}

impl Http {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Http {
            admin_port: match super::get(vars, "FLOWGATE_ADMIN_PORT") {
                None => None,
                Some(_) => Some(parse(vars, "FLOWGATE_ADMIN_PORT", 0u16)?),
            },
            http_header_timeout: positive(
                "FLOWGATE_HTTP_HEADER_TIMEOUT_MS",
                millis(vars, "FLOWGATE_HTTP_HEADER_TIMEOUT_MS", 10_000)?,
            )?,
            // A polling POST's body is held while it arrives: one that
            // never finishes must not hold it for ever (a 1 MB body at
            // 100 KB/s takes 10 s).
            http_body_timeout: positive(
                "FLOWGATE_HTTP_BODY_TIMEOUT_MS",
                millis(vars, "FLOWGATE_HTTP_BODY_TIMEOUT_MS", 30_000)?,
            )?,
            max_http_connections: match super::get(vars, "FLOWGATE_MAX_HTTP_CONNECTIONS") {
                None => None,
                Some(_) => Some(positive(
                    "FLOWGATE_MAX_HTTP_CONNECTIONS",
                    parse(vars, "FLOWGATE_MAX_HTTP_CONNECTIONS", 1usize)?,
                )?),
            },
            // Behind a load balancer (an ALB, HAProxy) every client comes
            // from the balancer's few addresses, and a node that died sends
            // thousands of clients back at once, each holding a slot for
            // about one round trip: the cap must let such a storm through
            // and only stop one address from sitting on many unauthenticated
            // connections (each closed at the connect deadline anyway).
            max_unauthenticated_per_ip: positive(
                "FLOWGATE_MAX_UNAUTHENTICATED_PER_IP",
                parse(vars, "FLOWGATE_MAX_UNAUTHENTICATED_PER_IP", 1024)?,
            )?,
        })
    }
}
