//! Postgres: the PgBouncer and direct URLs (with libpq's TLS parameters:
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`), the pool and query
//! bounds, and the durable event log's batch size and retention.

use std::collections::HashMap;
use std::time::Duration;

use super::{err, get, millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Database {
    pub(super) database_url: Option<String>,
    pub(super) database_direct_url: Option<String>,
    pub(super) db_pool_size: usize,
    pub(super) db_connect_timeout: Duration,
    pub(super) db_query_timeout: Duration,
    pub(super) access_check_timeout: Duration,
    pub(super) db_statement_timeout: Duration,
    pub(super) db_slow_query: Duration,
    pub(super) event_retention_months: u32,
    pub(super) eventlog_batch: usize,
}

impl Database {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        // A bad sslmode or an unreadable certificate file is a
        // configuration error now, not a pool that never connects.
        let url = |var: &'static str| -> Result<Option<String>, ConfigError> {
            let url = get(vars, var).map(str::to_owned);
            if let Some(u) = &url {
                flowgate_store::check_url(u).map_err(|e| err(var, e.to_string()))?;
            }
            Ok(url)
        };
        Ok(Database {
            database_url: url("DATABASE_URL")?,
            database_direct_url: url("DATABASE_DIRECT_URL")?,
            db_pool_size: positive(
                "FLOWGATE_DB_POOL_SIZE",
                parse(vars, "FLOWGATE_DB_POOL_SIZE", 16)?,
            )?,
            db_connect_timeout: positive(
                "FLOWGATE_DB_CONNECT_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_CONNECT_TIMEOUT_MS", 5_000)?,
            )?,
            db_query_timeout: positive(
                "FLOWGATE_DB_QUERY_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_QUERY_TIMEOUT_MS", 30_000)?,
            )?,
            access_check_timeout: positive(
                "FLOWGATE_ACCESS_CHECK_TIMEOUT_MS",
                millis(vars, "FLOWGATE_ACCESS_CHECK_TIMEOUT_MS", 5_000)?,
            )?,
            db_statement_timeout: positive(
                "FLOWGATE_DB_STATEMENT_TIMEOUT_MS",
                millis(vars, "FLOWGATE_DB_STATEMENT_TIMEOUT_MS", 30_000)?,
            )?,
            db_slow_query: millis(vars, "FLOWGATE_DB_SLOW_QUERY_MS", 1_000)?,
            event_retention_months: parse(vars, "FLOWGATE_EVENT_RETENTION_MONTHS", 12)?,
            eventlog_batch: positive(
                "FLOWGATE_EVENTLOG_BATCH",
                parse(vars, "FLOWGATE_EVENTLOG_BATCH", 500)?,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{vars, Config};

    #[test]
    fn tls_parameters_are_checked_at_start() {
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            (
                "DATABASE_URL",
                "postgres://u@db/app?sslmode=verify-full&sslrootcert=/nonexistent.pem",
            ),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        let e = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            (
                "DATABASE_DIRECT_URL",
                "postgres://u@db/app?sslmode=sometimes",
            ),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "DATABASE_DIRECT_URL");
        let c = Config::from_vars(&vars(&[
            ("JWT_ACCESS_TOKEN_SECRET", "s"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("DATABASE_URL", "postgres://u@db/app?sslmode=require"),
        ]))
        .unwrap();
        assert!(c.database_url.is_some());
    }
}
