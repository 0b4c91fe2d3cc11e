//! Who may join which flow: `FLOWGATE_ACCESS_POLICY` (defaulting to
//! memberships when Postgres is configured) and how long decisions stay
//! cached in Redis.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, get, parse, ConfigError};

/// Who may join which flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessPolicy {
    /// Any authenticated user may join any flow (the old gateway's behaviour).
    Open,
    /// The token's claim (named by `FLOWGATE_FLOWS_CLAIM`) lists the flows,
    /// or is `"*"`.
    Claims {
        /// Claim name.
        claim: String,
    },
    /// A membership row in Postgres decides (needs `DATABASE_URL`).
    Members,
}

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Access {
    pub(super) access: AccessPolicy,
    pub(super) access_cache_ttl: Duration,
}

impl Access {
    /// `has_database`: whether `DATABASE_URL` is set, which makes `members`
    /// the default and is required by it.
    pub(super) fn from_vars(
        vars: &HashMap<String, String>,
        has_database: bool,
    ) -> Result<Self, ConfigError> {
        let access = match get(vars, "FLOWGATE_ACCESS_POLICY") {
            None if has_database => AccessPolicy::Members,
            None | Some("open") => AccessPolicy::Open,
            Some("claims") => AccessPolicy::Claims {
                claim: get(vars, "FLOWGATE_FLOWS_CLAIM")
                    .unwrap_or("flows")
                    .to_owned(),
            },
            Some("members") => AccessPolicy::Members,
            Some(other) => {
                return Err(err(
                    "FLOWGATE_ACCESS_POLICY",
                    format!("{other:?} is not one of members, open, claims"),
                ))
            }
        };
        if access == AccessPolicy::Members && !has_database {
            return Err(err(
                "FLOWGATE_ACCESS_POLICY",
                "the members policy reads memberships from Postgres: set DATABASE_URL, or choose open or claims",
            ));
        }
        Ok(Access {
            access,
            access_cache_ttl: Duration::from_secs(parse(vars, "FLOWGATE_ACCESS_CACHE_SECS", 60)?),
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
            ("FLOWGATE_ACCESS_POLICY", "members"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "FLOWGATE_ACCESS_POLICY");
    }
}
