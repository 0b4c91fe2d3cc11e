//! HTTP routes: the Engine.IO endpoint (WebSocket and HTTP long-polling,
//! [`engineio`]), `/health` for load balancers, `/metrics` for Prometheus,
//! and the server API under `/v1` for backend services ([`api`]).

mod api;
mod body;
mod cors;
mod engineio;
mod forward;
mod ws_upgrade;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use engineio::engine_io;

/// Every route of a node.
pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.config.max_payload;
    Router::new()
        .route("/socket.io/", any(engine_io))
        .route("/socket.io", any(engine_io))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api::routes(app.clone()))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app.clone())
        // Empty unless FLOWGATE_DEMO is on.
        .merge(crate::demo::router(&app))
}

/// The admin port's routes: what load balancers and Prometheus read.
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// An Engine.IO handshake error: HTTP status plus `{code, message}` as the
/// JavaScript server sends them.
fn eio_error(status: StatusCode, code: u8, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

/// An Engine.IO error before it becomes a response: small enough to be the
/// `Err` of a check.
#[derive(Debug, Clone, Copy)]
struct EioError(StatusCode, u8, &'static str);

impl IntoResponse for EioError {
    fn into_response(self) -> Response {
        eio_error(self.0, self.1, self.2)
    }
}

/// Holds one of the node's connection slots until dropped.
struct Slot(Arc<App>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let ping = tokio::time::timeout(Duration::from_secs(1), app.engine.health.ping()).await;
    let (engine_up, engine) = match ping {
        Ok(Ok(latency)) => (
            true,
            json!({"kind": app.engine.kind, "state": "up", "latencyMs": latency.as_secs_f64() * 1e3}),
        ),
        Ok(Err(e)) => (
            false,
            json!({"kind": app.engine.kind, "state": "down", "error": e.to_string()}),
        ),
        Err(_) => (
            false,
            json!({"kind": app.engine.kind, "state": "down", "error": "timeout"}),
        ),
    };
    let draining = app.drain.is_draining();
    // At its connection cap the node refuses every new connection (503 on
    // the handshake), so it does not accept connections: the load balancer
    // should send them elsewhere until a slot frees up. Open connections
    // are untouched (a readiness probe, not a liveness one).
    let connections = app.connections.load(Ordering::Relaxed);
    let full = connections >= app.config.max_connections;
    let ok = engine_up && !draining && !full;
    // Postgres is shown but does not take the node out of the load
    // balancer: rooms keep working without it.
    let postgres = match postgres_health(&app).await {
        None => json!({"state": "not configured"}),
        Some(Ok(latency)) => json!({"state": "up", "latencyMs": latency.as_secs_f64() * 1e3}),
        Some(Err(e)) => json!({"state": "down", "error": e}),
    };
    let degraded = postgres["state"] == "down";
    let body = json!({
        "status": if draining { "draining" } else if !engine_up { "unavailable" } else if full { "full" } else if degraded { "degraded" } else { "ok" },
        "node": app.config.node_id,
        "connections": connections,
        "maxConnections": app.config.max_connections,
        "dependencies": {"engine": engine, "postgres": postgres},
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// The Postgres check, cached for a second so that every load balancer
/// hitting `/health` costs at most one query per second.
async fn postgres_health(app: &App) -> Option<Result<Duration, String>> {
    let store = app.store.as_ref()?;
    if let Some((at, r)) = app.pg_health.lock().clone() {
        if at.elapsed() < Duration::from_secs(1) {
            return Some(r);
        }
    }
    let r = match tokio::time::timeout(Duration::from_secs(1), store.ping()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".to_owned()),
    };
    app.metrics.postgres_up.set(r.is_ok() as i64);
    *app.pg_health.lock() = Some((std::time::Instant::now(), r.clone()));
    Some(r)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Some(store) = &app.store {
        store.update_metrics();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
