//! Postgres: the PgBouncer and direct URLs, the pool and query bounds, and
//! the durable event log's batch size and retention.

use std::collections::HashMap;
use std::time::Duration;

use super::{get, millis, parse, positive, ConfigError};

/// The [`Config`](super::Config) fields of the same names.
pub(super) struct Database {
    pub(super) database_url: Option<String>,
    pub(super) database_direct_url: Option<String>,
    pub(super) db_pool_size: usize,
    pub(super) db_connect_timeout: Duration,
    pub(super) db_query_timeout: Duration,
    pub(super) db_statement_timeout: Duration,
    pub(super) db_slow_query: Duration,
    pub(super) event_retention_months: u32,
    pub(super) eventlog_batch: usize,
}

impl Database {
    pub(super) fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Ok(Database {
            database_url: get(vars, "DATABASE_URL").map(str::to_owned),
            database_direct_url: get(vars, "DATABASE_DIRECT_URL").map(str::to_owned),
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
