//! What the node serves and to whom: its listen address and id, the
//! browser origins allowed, the server API's token and the relay table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::{err, get, parse, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Server {
    pub(super) listen: SocketAddr,
    pub(super) node_id: String,
    pub(super) service_token: Option<String>,
    pub(super) allowed_origins: Vec<String>,
    pub(super) events_file: Option<PathBuf>,
    pub(super) demo: bool,
    pub(super) worker_threads: Option<usize>,
}

impl Server {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let host: IpAddr = parse(vars, "HOST", IpAddr::from([0, 0, 0, 0]))?;
        let port: u16 = parse(vars, "PORT", 8080)?;
        let node_id = match get(vars, "FLOWGATE_NODE_ID") {
            Some(id) => id.to_owned(),
            None => format!("node-{}", crate::ids::random_id(8)),
        };

        let allowed_origins: Vec<String> = get(vars, "FRONTEND_URL")
            .map(|v| {
                v.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        // Compared with the browser's Origin header as is: anything that
        // is not `scheme://host[:port]` could never match, and would
        // refuse every cross-origin browser without a word.
        if let Some(bad) = allowed_origins.iter().find(|o| !is_origin(o)) {
            return Err(err(
                "FRONTEND_URL",
                format!("{bad:?} is not an origin (http:// or https:// and a host, no path)"),
            ));
        }

        let events_file = get(vars, "FLOWGATE_EVENTS_FILE").map(PathBuf::from);
        if let Some(path) = &events_file {
            if !path.is_file() {
                return Err(err(
                    "FLOWGATE_EVENTS_FILE",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }

        // Unset: one runtime worker per core. Several nodes sharing a
        // machine should split its cores between them: idle workers of
        // every node otherwise wake for each event (measured: see
        // docs/benchmarks.md).
        let worker_threads = match get(vars, "FLOWGATE_WORKER_THREADS") {
            None => None,
            Some(_) => Some(super::within(
                "FLOWGATE_WORKER_THREADS",
                parse(vars, "FLOWGATE_WORKER_THREADS", 1usize)?,
                1,
                1024,
            )?),
        };

        Ok(Server {
            worker_threads,
            listen: SocketAddr::new(host, port),
            node_id,
            service_token: match get(vars, "FLOWGATE_SERVICE_TOKEN") {
                // A token pasted with a newline would never match a header.
                Some(t) if t.trim() != t => {
                    return Err(super::err(
                        "FLOWGATE_SERVICE_TOKEN",
                        "has leading or trailing whitespace",
                    ))
                }
                t => t.map(str::to_owned),
            },
            allowed_origins,
            events_file,
            // Only a clear yes turns on a page that mints tokens; anything
            // else is a configuration error, not a silent guess.
            demo: match get(vars, "FLOWGATE_DEMO").map(|v| v.trim().to_ascii_lowercase()) {
                None => false,
                Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => true,
                Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => false,
                Some(_) => return Err(err("FLOWGATE_DEMO", "must be 1 or 0")),
            },
        })
    }
}

/// `http(s)://host[:port]`, as a browser sends it in `Origin`.
fn is_origin(o: &str) -> bool {
    let Some(rest) = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
    else {
        return false;
    };
    let bracketed = rest.starts_with('[') && rest.ends_with(']');
    let (host, port) = match rest.rsplit_once(':').filter(|_| !bracketed) {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use crate::config::{vars, Config};

    #[test]
    fn errors_name_the_variable() {
        let e = Config::from_vars(&vars(&[("JWT_ACCESS_TOKEN_SECRET", "s"), ("PORT", "http")]))
            .unwrap_err();
        assert_eq!(e.var, "PORT");
    }

    #[test]
    fn an_origin_that_could_never_match_is_refused() {
        for bad in [
            "notaurl",
            "a.example",
            "https://",
            "https://a.example/app",
            "ftp://a.example",
            "https://a b",
        ] {
            let e = Config::from_vars(&vars(&[
                ("JWT_ACCESS_TOKEN_SECRET", "s"),
                ("FRONTEND_URL", bad),
            ]))
            .unwrap_err();
            assert_eq!(e.var, "FRONTEND_URL", "{bad}");
        }
        for good in [
            "http://localhost:3000",
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
        ] {
            Config::from_vars(&vars(&[
                ("JWT_ACCESS_TOKEN_SECRET", "s"),
                ("FRONTEND_URL", good),
            ]))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn origins_are_split_and_trimmed() {
        let c = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("FRONTEND_URL", "https://a.example/, https://b.example"),
        ]))
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "https://b.example"]
        );
    }
}
