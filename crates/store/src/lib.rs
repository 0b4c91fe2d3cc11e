//! flowgate's durable side, in PostgreSQL reached through PgBouncer in
//! transaction pooling mode: flow memberships, the room event log
//! (partitioned by month) and the migrations that create them.
//!
//! PgBouncer 1.18 does not support protocol-level named prepared
//! statements, so every query here goes through `query_typed` /
//! `execute_typed` (unnamed statements) or the simple query protocol, and
//! nothing uses deadpool's statement cache. Migrations run over a direct
//! connection (`DATABASE_DIRECT_URL`), never through PgBouncer.

use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prometheus::{IntCounter, IntGauge, Registry};
use serde::Serialize;
use thiserror::Error;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;
use tracing::{info, warn};

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

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

/// One event of the durable log.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedEvent {
    /// The flow.
    pub flow_id: String,
    /// Its room offset (Redis stream id).
    pub offset: String,
    /// The event members received.
    pub event: String,
    /// Its payload.
    pub data: serde_json::Value,
    /// The sender, when a user sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// A batch of events as column arrays, for one `INSERT … SELECT FROM
/// unnest(…)` (one round trip, one unnamed statement, whatever the size).
#[derive(Default)]
struct Columns<'a> {
    flow: Vec<&'a str>,
    ms: Vec<i64>,
    seq: Vec<i64>,
    event: Vec<&'a str>,
    data: Vec<String>,
    user: Vec<Option<&'a str>>,
}

/// Splits a Redis stream id `<ms>-<seq>`.
pub fn parse_offset(offset: &str) -> Result<(i64, i64), StoreError> {
    let bad = || StoreError::BadOffset(offset.to_owned());
    let (ms, seq) = offset.split_once('-').ok_or_else(bad)?;
    Ok((
        ms.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
    ))
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

fn q(e: impl std::fmt::Display) -> StoreError {
    StoreError::Query(e.to_string())
}

/// Applies the embedded migrations over a direct connection; idempotent.
/// Returns the versions applied now.
pub async fn migrate(direct_url: &str) -> Result<Vec<i32>, StoreError> {
    let (mut client, conn) = tokio_postgres::connect(direct_url, NoTls)
        .await
        .map_err(|e| StoreError::Pool(e.to_string()))?;
    let task = tokio::spawn(conn);
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(q)?;
    drop(client);
    let _ = task.await;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The newest migration this binary carries.
pub fn latest_migration() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// The name of the partition holding `month` (first day of it).
fn partition_name(year: i32, month: u8) -> String {
    format!("room_events_y{year:04}m{month:02}")
}

fn next_month(year: i32, month: u8) -> (i32, u8) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

impl Store {
    /// Builds the pool (connections open lazily) and registers its metrics.
    pub fn new(settings: StoreSettings, registry: &Registry) -> Result<Self, StoreError> {
        let pg: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let mgr = Manager::from_config(
            pg,
            NoTls,
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
            StoreError::Pool(e.to_string())
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

    /// Refuses a schema older than this binary.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let needed = latest_migration();
        let found: i32 = self
            .timed("schema version", async {
                let c = self.client().await?;
                let rows = c
                    .query_typed(
                        "SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history",
                        &[],
                    )
                    .await;
                match rows {
                    Ok(rows) => Ok(rows.first().map(|r| r.get::<_, i32>(0)).unwrap_or(0)),
                    // No history table: nothing was ever migrated.
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(q(e)),
                }
            })
            .await?;
        if found < needed {
            return Err(StoreError::SchemaBehind { found, needed });
        }
        Ok(())
    }

    /// Whether `user_id` holds a membership of `flow_id`.
    pub async fn is_member(&self, flow_id: &str, user_id: &str) -> Result<bool, StoreError> {
        self.timed("is_member", async {
            let rows = self
                .client()
                .await?
                .query_typed(
                    "SELECT 1 FROM flow_members WHERE flow_id = $1 AND user_id = $2",
                    &[(&flow_id, Type::TEXT), (&user_id, Type::TEXT)],
                )
                .await
                .map_err(q)?;
            Ok(!rows.is_empty())
        })
        .await
    }

    /// Grants (or updates) a membership.
    pub async fn grant(&self, flow_id: &str, user_id: &str, role: &str) -> Result<(), StoreError> {
        self.timed("grant", async {
            self.client()
                .await?
                .execute_typed(
                    "INSERT INTO flow_members (flow_id, user_id, role) VALUES ($1, $2, $3) \
                     ON CONFLICT (flow_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                    &[
                        (&flow_id, Type::TEXT),
                        (&user_id, Type::TEXT),
                        (&role, Type::TEXT),
                    ],
                )
                .await
                .map_err(q)?;
            Ok(())
        })
        .await
    }

    /// Revokes a membership; `true` if there was one.
    pub async fn revoke(&self, flow_id: &str, user_id: &str) -> Result<bool, StoreError> {
        self.timed("revoke", async {
            let n = self
                .client()
                .await?
                .execute_typed(
                    "DELETE FROM flow_members WHERE flow_id = $1 AND user_id = $2",
                    &[(&flow_id, Type::TEXT), (&user_id, Type::TEXT)],
                )
                .await
                .map_err(q)?;
            Ok(n > 0)
        })
        .await
    }

    /// Writes a batch of events in one transaction; events already in the
    /// log are skipped, so a retried batch is written exactly once. Creates
    /// a missing month partition and retries once.
    pub async fn write_events(&self, events: &[LoggedEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut cols = Columns::default();
        for e in events {
            let (ms, seq) = parse_offset(&e.offset)?;
            cols.flow.push(&e.flow_id);
            cols.ms.push(ms);
            cols.seq.push(seq);
            cols.event.push(&e.event);
            cols.data.push(e.data.to_string());
            cols.user.push(e.user_id.as_deref());
        }
        let insert = || async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(q)?;
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                self.settings.statement_timeout.as_millis()
            ))
            .await
            .map_err(q)?;
            let params: [(&(dyn ToSql + Sync), Type); 6] = [
                (&cols.flow, Type::TEXT_ARRAY),
                (&cols.ms, Type::INT8_ARRAY),
                (&cols.seq, Type::INT8_ARRAY),
                (&cols.event, Type::TEXT_ARRAY),
                (&cols.data, Type::TEXT_ARRAY),
                (&cols.user, Type::TEXT_ARRAY),
            ];
            let n = tx
                .execute_typed(
                    "INSERT INTO room_events (flow_id, offset_ms, offset_seq, created_at, event, data, user_id) \
                     SELECT f, ms, s, to_timestamp(ms / 1000.0), e, d::jsonb, u \
                     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[]) \
                          AS t(f, ms, s, e, d, u) \
                     ON CONFLICT DO NOTHING",
                    &params,
                )
                .await;
            match n {
                Ok(n) => {
                    tx.commit().await.map_err(q)?;
                    Ok(Ok(n))
                }
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
                        || e.to_string().contains("no partition") =>
                {
                    Ok(Err(()))
                }
                Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
                    Err(StoreError::Rejected(e.to_string()))
                }
                Err(e) => Err(q(e)),
            }
        };
        match self.timed("write_events", insert()).await? {
            Ok(n) => Ok(n),
            Err(()) => {
                // Events dated in a month without a partition: create the
                // partitions their offsets fall in, then write again.
                for ms in cols
                    .ms
                    .iter()
                    .copied()
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000)
                        .map_err(|e| StoreError::BadOffset(e.to_string()))?;
                    self.ensure_partition(t.year(), t.month() as u8).await?;
                }
                match self.timed("write_events", insert()).await? {
                    Ok(n) => Ok(n),
                    Err(()) => Err(StoreError::Query("no partition for the events".into())),
                }
            }
        }
    }

    /// Creates the month partition if missing.
    pub async fn ensure_partition(&self, year: i32, month: u8) -> Result<(), StoreError> {
        let (ny, nm) = next_month(year, month);
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF room_events \
             FOR VALUES FROM ('{year:04}-{month:02}-01 00:00:00+00') TO ('{ny:04}-{nm:02}-01 00:00:00+00')",
            partition_name(year, month)
        );
        self.timed("create partition", async {
            self.client().await?.batch_execute(&sql).await.map_err(q)
        })
        .await
    }

    /// Creates the partitions of the current and next months.
    pub async fn ensure_partitions_ahead(&self) -> Result<(), StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let (y, m) = (now.year(), now.month() as u8);
        self.ensure_partition(y, m).await?;
        let (ny, nm) = next_month(y, m);
        self.ensure_partition(ny, nm).await
    }

    /// Drops the partitions that end on or before the first day of
    /// (`year`, `month`); returns their names.
    pub async fn drop_partitions_before(
        &self,
        year: i32,
        month: u8,
    ) -> Result<Vec<String>, StoreError> {
        let cutoff = partition_name(year, month);
        let names: Vec<String> = self
            .timed("list partitions", async {
                let rows = self
                    .client()
                    .await?
                    .query_typed(
                        "SELECT c.relname::text FROM pg_inherits i \
                         JOIN pg_class c ON c.oid = i.inhrelid \
                         JOIN pg_class p ON p.oid = i.inhparent \
                         WHERE p.relname = 'room_events' ORDER BY 1",
                        &[],
                    )
                    .await
                    .map_err(q)?;
                Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
            })
            .await?;
        // Names sort by month: room_events_yYYYYmMM.
        let old: Vec<String> = names.into_iter().filter(|n| *n < cutoff).collect();
        for n in &old {
            self.timed("drop partition", async {
                self.client()
                    .await?
                    .batch_execute(&format!("DROP TABLE IF EXISTS {n}"))
                    .await
                    .map_err(q)
            })
            .await?;
            info!(partition = %n, "dropped an expired event-log partition");
        }
        Ok(old)
    }

    /// Drops partitions older than `months` whole months before now.
    pub async fn apply_retention(&self, months: u32) -> Result<Vec<String>, StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let mut y = now.year();
        let mut m = now.month() as i32 - months as i32;
        while m < 1 {
            m += 12;
            y -= 1;
        }
        self.drop_partitions_before(y, m as u8).await
    }

    /// The log of a flow after `after` (exclusive), in room order.
    pub async fn events(
        &self,
        flow_id: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let (ms, seq) = match after {
            Some(a) => parse_offset(a)?,
            None => (0, -1),
        };
        self.timed("events", async {
            let rows = self
                .client()
                .await?
                .query_typed(
                    "SELECT offset_ms, offset_seq, event, data::text, user_id FROM room_events \
                     WHERE flow_id = $1 AND (offset_ms, offset_seq) > ($2, $3) \
                       AND created_at >= to_timestamp(floor($2 / 1000.0)) \
                     ORDER BY offset_ms, offset_seq LIMIT $4",
                    &[
                        (&flow_id, Type::TEXT),
                        (&ms, Type::INT8),
                        (&seq, Type::INT8),
                        (&limit, Type::INT8),
                    ],
                )
                .await
                .map_err(q)?;
            rows.iter()
                .map(|r| {
                    let data: String = r.get(3);
                    Ok(LoggedEvent {
                        flow_id: flow_id.to_owned(),
                        offset: format!("{}-{}", r.get::<_, i64>(0), r.get::<_, i64>(1)),
                        event: r.get(2),
                        data: serde_json::from_str(&data).map_err(q)?,
                        user_id: r.get(4),
                    })
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_partitions() {
        assert_eq!(
            parse_offset("1700000000123-4").unwrap(),
            (1_700_000_000_123, 4)
        );
        assert!(parse_offset("x").is_err());
        assert!(parse_offset("1-x").is_err());
        assert_eq!(partition_name(2026, 1), "room_events_y2026m01");
        assert_eq!(next_month(2026, 12), (2027, 1));
        assert!(latest_migration() >= 1);
    }
}
