//! flowgate's durable side, in PostgreSQL reached through PgBouncer in
//! transaction pooling mode: flow memberships, the room event log
//! (partitioned by month) and the migrations that create them.
//!
//! TLS (`sslmode=require`, `verify-ca`, `verify-full`, with `sslrootcert`,
//! `sslcert`, `sslkey` in the URL, as libpq reads them) works for both
//! connections: see `tls`.
//!
//! PgBouncer 1.18 does not support protocol-level named prepared
//! statements, so every query here goes through `query_typed` /
//! `execute_typed` (unnamed statements) or the simple query protocol, and
//! nothing uses deadpool's statement cache. Migrations run over a direct
//! connection (`DATABASE_DIRECT_URL`), never through PgBouncer.
//!
//! One module per job, all adding methods to [`Store`]: `migrate`
//! (migrations and the schema check), `members` (flow memberships),
//! `event_log` (event writes and history reads) and `partitions` (month
//! partitions and retention). This file holds the pool, its metrics and
//! the query helpers they share.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prometheus::{IntCounter, IntGauge, Registry};
use thiserror::Error;
use tracing::warn;

mod event_log;
mod members;
mod migrate;
mod partitions;
mod tls;

pub use event_log::{parse_offset, LoggedEvent, MAX_OFFSET_MS};
pub use migrate::{latest_migration, migrate};
pub use tls::check_url;

/// A failure of the durable side; never fatal to rooms.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The URL does not parse.
    #[error("bad database URL: {0}")]
    Config(String),
    /// No connection could be had from the pool in time.
    #[error("database pool: {0}")]
    Pool(String),
    /// The query failed or timed out.
    #[error("database query: {0}")]
    Query(String),
    /// The schema is older than this binary.
    #[error(
        "database schema is at version {found}, this binary needs {needed}: run `flowgate migrate`"
    )]
    SchemaBehind {
        /// Newest applied migration.
        found: i32,
        /// Newest migration this binary knows.
        needed: i32,
    },
    /// An offset that is not a Redis stream id.
    #[error("bad offset {0:?}")]
    BadOffset(String),
    /// Postgres refused the data itself (SQLSTATE class 22): retrying the
    /// same rows cannot succeed.
    #[error("rows refused: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Whether retrying the same input can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Rejected(_) | StoreError::BadOffset(_))
    }
}

/// Pool and query settings.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `DATABASE_URL` (PgBouncer).
    pub url: String,
    /// Connections per node.
    pub pool_size: usize,
    /// Wait for a pooled connection (and to open one).
    pub connect_timeout: Duration,
    /// Client-side bound on one query.
    pub query_timeout: Duration,
    /// Server-side `statement_timeout`, applied with `SET LOCAL` inside the
    /// writer's transactions (a session-level SET would leak to other
    /// clients of a transaction-mode pool).
    pub statement_timeout: Duration,
    /// Queries slower than this are logged.
    pub slow_query: Duration,
}

/// Pool metrics, exported at `/metrics`.
#[derive(Debug, Clone)]
struct Metrics {
    size: IntGauge,
    available: IntGauge,
    waiting: IntGauge,
    errors: IntCounter,
    slow: IntCounter,
}

/// The database of one node: a pool pointed at PgBouncer.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    settings: StoreSettings,
    metrics: Metrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("status", &self.pool.status())
            .finish()
    }
}

fn q(e: impl std::error::Error) -> StoreError {
    StoreError::Query(with_causes(&e))
}

/// An error with its causes: `tokio_postgres::Error` displays only its
/// kind ("db error"), and the server's message is in its source, which the
/// logs must show.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl Store {
    /// Builds the pool (connections open lazily) and registers its metrics.
    pub fn new(settings: StoreSettings, registry: &Registry) -> Result<Self, StoreError> {
        let (pg, tls) = tls::connect_config(&settings.url)?;
        let mgr = Manager::from_config(
            pg,
            tls,
            ManagerConfig {
                // `Fast` does not run a query on checkout; broken
                // connections surface as query errors and are dropped.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let gauge = |n: &str, h: &str| -> Result<IntGauge, StoreError> {
            let g = IntGauge::new(n, h).map_err(|e| StoreError::Config(e.to_string()))?;
            registry
                .register(Box::new(g.clone()))
                .map_err(|e| StoreError::Config(e.to_string()))?;
            Ok(g)
        };
        let counter = |n: &str, h: &str| -> Result<IntCounter, StoreError> {
            let c = IntCounter::new(n, h).map_err(|e| StoreError::Config(e.to_string()))?;
            registry
                .register(Box::new(c.clone()))
                .map_err(|e| StoreError::Config(e.to_string()))?;
            Ok(c)
        };
        let metrics = Metrics {
            size: gauge("db_pool_size", "Open connections in the database pool")?,
            available: gauge("db_pool_available", "Idle connections in the database pool")?,
            waiting: gauge("db_pool_waiting", "Tasks waiting for a database connection")?,
            errors: counter("db_errors_total", "Failed database operations")?,
            slow: counter(
                "db_slow_queries_total",
                "Queries slower than the slow-query threshold",
            )?,
        };
        Ok(Store {
            pool,
            settings,
            metrics,
        })
    }

    /// Refreshes the pool gauges.
    pub fn update_metrics(&self) {
        let s = self.pool.status();
        self.metrics.size.set(s.size as i64);
        self.metrics.available.set(s.available as i64);
        self.metrics.waiting.set(s.waiting as i64);
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            self.metrics.errors.inc();
            StoreError::Pool(with_causes(&e))
        })
    }

    /// Runs `f` with the query timeout, logging it when slow and counting
    /// failures.
    async fn timed<T, F>(&self, what: &'static str, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let started = Instant::now();
        let r = match tokio::time::timeout(self.settings.query_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Query(format!(
                "{what} timed out after {:?}",
                self.settings.query_timeout
            ))),
        };
        let took = started.elapsed();
        if took >= self.settings.slow_query {
            self.metrics.slow.inc();
            warn!(
                query = what,
                took_ms = took.as_millis() as u64,
                "slow query"
            );
        }
        if r.is_err() {
            self.metrics.errors.inc();
        }
        r
    }

    /// `SELECT 1`, for `/health`.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        self.timed("ping", async {
            self.client()
                .await?
                .simple_query("SELECT 1")
                .await
                .map_err(q)?;
            Ok(())
        })
        .await?;
        Ok(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("db error")]
    struct Outer(#[source] Inner);

    #[derive(Debug, Error)]
    #[error("ERROR: relation \"room_events\" does not exist")]
    struct Inner;

    #[test]
    fn errors_carry_their_causes() {
        assert_eq!(
            q(Outer(Inner)).to_string(),
            "database query: db error: ERROR: relation \"room_events\" does not exist"
        );
    }
}
