//! The node's shared state, built once from the configuration and handed to
//! every handler as a cheap `Arc`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Context;
use flowgate_redis::{NodeDirectory, RedisEngine, RedisSettings, RedisTls};
use flowgate_store::{Store, StoreError, StoreSettings};

use crate::eventlog::{self, WriterMetrics};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::drain::Drain;
use crate::engine::memory::MemoryHub;
use crate::engine::memory_queue::MemoryQueue;
use crate::engine::Engine;
use crate::events::RelayTable;
use crate::metrics::Metrics;
use crate::rooms::{Fanout, Rooms};

/// Everything a handler or connection needs.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// User token checks.
    pub verifier: TokenVerifier,
    /// Which client events are relayed, and how.
    pub table: RelayTable,
    /// Bus, presence and limiter.
    pub engine: Engine,
    /// Local room membership and subscriptions.
    pub rooms: Rooms,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Drain state and connection tracking.
    pub drain: Drain,
    /// Open connections, against `max_connections`.
    pub connections: AtomicUsize,
    /// This node's polling sessions, and the owners of other sessions.
    pub eio_sessions: crate::engineio::Sessions,
    /// Authenticated sockets per user, against `max_connections_per_user`.
    pub user_slots: Arc<crate::session::UserSlots>,
    /// Unauthenticated connections per address, against
    /// `max_unauthenticated_per_ip`.
    pub peer_slots: Arc<crate::session::PeerSlots>,
    /// The bounds of every connection's outgoing queue.
    pub queue_limits: Arc<crate::outbound::QueueLimits>,
    /// What clients' unfinished frames may hold, across the node.
    pub read_budget: Arc<crate::read_budget::ReadBudget>,
    /// Background tasks (engine maintenance) and their stop signal.
    pub background: (TaskTracker, CancellationToken),
    /// Postgres through PgBouncer, when `DATABASE_URL` is set.
    pub store: Option<Store>,
    /// The last Postgres check for `/health` and when it was made.
    pub pg_health: parking_lot::Mutex<Option<HealthCheck>>,
}

/// When a dependency was last checked, and the outcome.
pub type HealthCheck = (std::time::Instant, Result<std::time::Duration, String>);

impl App {
    /// Builds a node. `hub` shares an in-memory engine between in-process
    /// nodes (tests); `None` gives the node its own.
    pub async fn new(config: Config, hub: Option<Arc<MemoryHub>>) -> anyhow::Result<Arc<Self>> {
        let table = match &config.events_file {
            Some(path) => RelayTable::load(path)
                .map_err(|e| anyhow::anyhow!("FLOWGATE_EVENTS_FILE: {}: {e}", path.display()))?,
            None => RelayTable::contract_default(),
        };
        let metrics = Metrics::new(
            table
                .rules()
                .flat_map(|r| [r.event.as_str(), r.emit.as_str()]),
        );
        metrics
            .max_connections
            .set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
        let verifier = TokenVerifier::new(&config.jwt)
            .context("JWT key")?
            .keeping_claim(match &config.access {
                crate::config::AccessPolicy::Claims { claim } => Some(claim.clone()),
                _ => None,
            });
        let fanout = Arc::new(Fanout::new(metrics.clone()));
        let background = (TaskTracker::new(), CancellationToken::new());
        let mut directory = None;
        let engine = match &config.redis_url {
            None => {
                let hub = hub.unwrap_or_default();
                hub.set_log_len(config.room_log_len as usize);
                background.0.spawn(prune_memory(
                    hub.clone(),
                    config.room_log_ttl,
                    background.1.clone(),
                ));
                let mut engine = hub.engine(
                    &config.node_id,
                    fanout.clone(),
                    config.rate_per_sec,
                    config.rate_burst,
                );
                // One node with a database and no Redis: its event-log
                // queue lives in its memory (lost if the node dies, as
                // everything else of a single node without Redis).
                if config.database_url.is_some() {
                    engine.queue = Some(Arc::new(MemoryQueue::new(
                        config.eventlog.queue_max_len,
                        config.eventlog.queue_max_bytes,
                        config.eventlog.enqueue_grace,
                    )));
                }
                engine
            }
            Some(url) => {
                let settings = RedisSettings {
                    url: url.clone(),
                    tls: RedisTls {
                        ca_file: config.redis_ca_file.clone(),
                        client_cert: config.redis_client_cert.clone(),
                        client_key: config.redis_client_key.clone(),
                    },
                    node_id: config.node_id.clone(),
                    rate_per_sec: config.rate_per_sec,
                    burst: config.rate_burst,
                    lease: config.rate_lease,
                    lease_for: config.rate_lease_for,
                    heartbeat: config.node_heartbeat,
                    dead_after: config.node_dead_after,
                    presence_refresh: config.presence_refresh,
                    presence_verify: config.presence_verify,
                    command_timeout: config.redis_timeout,
                    log_len: config.room_log_len,
                    log_ttl: config.room_log_ttl,
                    bus_json: config.bus_json,
                    publish_linger: config.publish_linger,
                    queue_shards: config.eventlog.shards,
                    queue_max_len: config.eventlog.queue_max_len,
                    queue_max_bytes: config.eventlog.queue_max_bytes,
                    enqueue_grace: config.eventlog.enqueue_grace,
                };
                directory = Some(
                    NodeDirectory::start(&settings, &background.0, background.1.clone())
                        .context("REDIS_URL")?,
                );
                RedisEngine::start(
                    settings,
                    fanout.clone(),
                    metrics.registry(),
                    &background.0,
                    background.1.clone(),
                )
                .await
                .context("REDIS_URL")?
            }
        };
        let rooms = Rooms::new(fanout, engine.bus.clone());
        let store = match &config.database_url {
            None => {
                // No database: no `flowgate_postgres_up` either (a 0 there
                // would page FlowgatePostgresDown forever).
                let _ = metrics
                    .registry()
                    .unregister(Box::new(metrics.postgres_up.clone()));
                None
            }
            Some(url) => {
                Some(Self::start_store(&config, url, &engine, &metrics, &background).await?)
            }
        };
        let eio_sessions = crate::engineio::Sessions::new(&config.node_id, directory);
        let queue_limits = crate::outbound::QueueLimits::new(
            config.outbound_queue,
            config.outbound_queue_bytes,
            config.slow_consumer_grace,
            &metrics,
        );
        let read_budget = crate::read_budget::ReadBudget::new(
            config.read_budget,
            metrics.read_held.clone(),
            metrics.read_budget_refused.clone(),
        );
        let app = Arc::new(App {
            queue_limits,
            read_budget,
            drain: Drain::new(config.drain_window),
            config: Arc::new(config),
            verifier,
            table,
            engine,
            rooms,
            metrics,
            connections: AtomicUsize::new(0),
            eio_sessions,
            user_slots: Arc::default(),
            peer_slots: Arc::default(),
            background,
            store,
            pg_health: parking_lot::Mutex::new(None),
        });
        let (tasks, stop) = &app.background;
        tasks.spawn(crate::recovery_keeper::run(app.clone(), stop.clone()));
        tasks.spawn(crate::lock_keeper::run(app.clone(), stop.clone()));
        Ok(app)
    }

    async fn start_store(
        config: &Config,
        url: &str,
        engine: &Engine,
        metrics: &Metrics,
        (tasks, stop): &(TaskTracker, CancellationToken),
    ) -> anyhow::Result<Store> {
        let store = Store::new(
            StoreSettings {
                url: url.to_owned(),
                pool_size: config.db_pool_size,
                connect_timeout: config.db_connect_timeout,
                query_timeout: config.db_query_timeout,
                statement_timeout: config.db_statement_timeout,
                slow_query: config.db_slow_query,
            },
            metrics.registry(),
        )
        .context("DATABASE_URL")?;
        match store.check_schema().await {
            Ok(()) => {}
            // Given the direct URL too, the node migrates itself (nodes
            // started together take turns on the migration's advisory
            // lock); without it, the schema is ops' to migrate first.
            Err(StoreError::SchemaBehind { found, needed })
                if config.database_direct_url.is_some() =>
            {
                let direct = config.database_direct_url.as_deref().unwrap_or_default();
                tracing::info!(
                    found,
                    needed,
                    "schema behind: applying the migrations over DATABASE_DIRECT_URL"
                );
                let applied = flowgate_store::migrate(direct)
                    .await
                    .context("DATABASE_DIRECT_URL: applying the migrations")?;
                tracing::info!(?applied, "migrations applied");
                store.check_schema().await.context("DATABASE_URL")?;
            }
            Err(e @ StoreError::SchemaBehind { .. }) => return Err(anyhow::anyhow!(e)),
            // Unreachable now: start degraded, the writer retries.
            Err(e) => tracing::warn!(error = %e, "Postgres unreachable at start; running degraded"),
        }
        let queue = engine
            .queue
            .clone()
            .context("DATABASE_URL needs an event-log queue")?;
        let writer_metrics = WriterMetrics::new(metrics.registry())?;
        tasks.spawn(eventlog::run(
            queue,
            store.clone(),
            config.node_id.clone(),
            config.eventlog_batch,
            writer_metrics,
            stop.clone(),
        ));
        tasks.spawn(eventlog::maintain_partitions(
            store.clone(),
            config.event_retention_months,
            stop.clone(),
        ));
        Ok(store)
    }
}

/// Prunes the in-memory engine every half minute (idle rooms, expired
/// session records, idle limiter state).
async fn prune_memory(hub: Arc<MemoryHub>, log_ttl: std::time::Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => hub.prune(log_ttl),
        }
    }
}
