//! HTTP routes: the Engine.IO endpoint (WebSocket upgrade), `/health` for
//! load balancers, `/metrics` for Prometheus, and the server API under
//! `/v1` for backend services.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::app::App;
use crate::engine::{Control, QueuedEvent, RoomMessage};
use crate::engineio::{self, ws::WsTransport};
use crate::events::RESERVED;
use crate::rooms::room_of;
use crate::session::Handshake;

mod history;
use history::history;

/// Every route of a node.
pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.config.max_payload;
    Router::new()
        .route("/socket.io/", any(engine_io))
        .route("/socket.io", any(engine_io))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/v1/flows/{flow_id}/events",
            post(publish_event).get(history),
        )
        .route("/v1/flows/{flow_id}/presence", get(presence))
        .route("/v1/flows/{flow_id}/locks", get(locks))
        .route(
            "/v1/flows/{flow_id}/members/{user_id}",
            axum::routing::put(grant).delete(revoke),
        )
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

async fn engine_io(
    State(app): State<Arc<App>>,
    method: Method,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let refused = |reason: &str| {
        app.metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc()
    };
    if q.get("transport").map(String::as_str) != Some("websocket") {
        refused("bad request");
        return eio_error(StatusCode::BAD_REQUEST, 0, "Transport unknown");
    }
    if q.get("EIO").map(String::as_str) != Some("4") {
        refused("bad request");
        return eio_error(StatusCode::BAD_REQUEST, 5, "Unsupported protocol version");
    }
    if method != Method::GET {
        refused("bad request");
        return eio_error(StatusCode::BAD_REQUEST, 2, "Bad handshake method");
    }
    if q.contains_key("sid") {
        // An upgrade of a polling session; this node has no polling sessions.
        refused("bad request");
        return eio_error(StatusCode::BAD_REQUEST, 1, "Session ID unknown");
    }
    if !app.config.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if let Some(origin) = origin {
            let origin = origin.trim_end_matches('/');
            if !app.config.allowed_origins.iter().any(|a| a == origin) {
                refused("origin");
                info!(origin, "upgrade refused: origin not allowed");
                return eio_error(StatusCode::FORBIDDEN, 4, "Forbidden");
            }
        }
    }
    if app.drain.is_draining() {
        refused("draining");
        return eio_error(StatusCode::SERVICE_UNAVAILABLE, 3, "Server is draining");
    }
    let Ok(ws) = ws else {
        refused("bad request");
        return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request");
    };
    if app.connections.fetch_add(1, Ordering::Relaxed) >= app.config.max_connections {
        app.connections.fetch_sub(1, Ordering::Relaxed);
        refused("capacity");
        warn!(
            max = app.config.max_connections,
            "upgrade refused: connection cap reached"
        );
        return eio_error(StatusCode::SERVICE_UNAVAILABLE, 3, "Server is at capacity");
    }
    let slot = Slot(app.clone());
    let hs = Handshake {
        bearer: bearer(&headers),
        query_token: q.get("token").cloned(),
        peer: peer.to_string(),
    };
    let max = app.config.max_payload;
    // tungstenite's default buffers are 128 KiB each per connection; most
    // frames here are tens of bytes, so small buffers (which grow for a
    // large frame) keep an idle connection cheap.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| {
            let tracker = app.drain.tracker().clone();
            tracker.track_future(async move {
                let _slot = slot;
                let sid = crate::ids::random_id(20);
                engineio::serve(WsTransport(socket), app, hs, sid).await;
            })
        })
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
    let ok = engine_up && !draining;
    // Postgres is shown but does not take the node out of the load
    // balancer: rooms keep working without it.
    let postgres = match postgres_health(&app).await {
        None => json!({"state": "not configured"}),
        Some(Ok(latency)) => json!({"state": "up", "latencyMs": latency.as_secs_f64() * 1e3}),
        Some(Err(e)) => json!({"state": "down", "error": e}),
    };
    let degraded = postgres["state"] == "down";
    let body = json!({
        "status": if draining { "draining" } else if !ok { "unavailable" } else if degraded { "degraded" } else { "ok" },
        "node": app.config.node_id,
        "connections": app.connections.load(Ordering::Relaxed),
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

/// A server API error: `{error: {code, message}}` with its status.
#[derive(Debug)]
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

/// A dependency (Redis, the membership check) failed: 503, try again.
fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        e.to_string(),
    )
}

fn service_auth(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.config.service_token else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "API_DISABLED",
            "FLOWGATE_SERVICE_TOKEN is not set on this node".into(),
        ));
    };
    let given = bearer(headers).ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Authorization: Bearer <service token> required".into(),
        )
    })?;
    // Constant-time comparison: the token is a shared secret.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            "not a valid service token".into(),
        ))
    }
}

fn flow_room(flow_id: &str) -> Result<String, ApiError> {
    let ok = !flow_id.is_empty()
        && flow_id.len() <= 128
        && flow_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(room_of(flow_id))
    } else {
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_FLOW_ID",
            "flowId must be 1-128 characters of A-Z a-z 0-9 _ - . :".into(),
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    event: String,
    #[serde(default)]
    data: Value,
}

async fn publish_event(
    State(app): State<Arc<App>>,
    Path(flow_id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PublishBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let room = flow_room(&flow_id)?;
    let Json(body) =
        body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "INVALID_BODY", e.body_text()))?;
    if body.event.is_empty() || body.event.len() > 128 || RESERVED.contains(&body.event.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_EVENT",
            "event must be a non-reserved name of 1-128 characters".into(),
        ));
    }
    let persist = app.store.is_some();
    if persist && crate::eventlog::has_nul(&body.data) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "data must not contain NUL characters".into(),
        ));
    }
    let data = crate::engine::raw_json(&body.data);
    let logged = persist.then(|| (body.event.clone(), data.clone()));
    let offset = app
        .engine
        .bus
        .publish(&room, RoomMessage::with_raw(body.event, data))
        .await
        .map_err(unavailable)?;
    let offset = offset.map(|o| o.to_string());
    if let (Some((event, data)), Some(offset)) = (logged, offset.clone()) {
        let queued = QueuedEvent {
            flow_id: flow_id.clone(),
            offset,
            event,
            data,
            user_id: None,
        };
        crate::eventlog::enqueue(&app, &queued)
            .await
            .map_err(unavailable)?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"ok": true, "offset": offset})),
    )
        .into_response())
}

async fn presence(
    State(app): State<Arc<App>>,
    Path(flow_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let room = flow_room(&flow_id)?;
    let members = app
        .engine
        .presence
        .members(&room)
        .await
        .map_err(unavailable)?;
    Ok(Json(members).into_response())
}

/// The flow's pod locks, as `flow:locks` lists them.
async fn locks(
    State(app): State<Arc<App>>,
    Path(flow_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let room = flow_room(&flow_id)?;
    let locks = app.engine.locks.list(&room).await.map_err(unavailable)?;
    Ok(Json(locks).into_response())
}

fn store(app: &App) -> Result<&flowgate_store::Store, ApiError> {
    app.store.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "NO_DATABASE",
            "this node has no DATABASE_URL".into(),
        )
    })
}

fn db_error(e: flowgate_store::StoreError) -> ApiError {
    warn!(error = %e, "database request failed");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is unavailable; try again".into(),
    )
}

fn check_user_id(user_id: &str) -> Result<(), ApiError> {
    // No control characters: Postgres refuses NUL in text, and that must
    // be a 400 naming the parameter, not a database failure.
    if user_id.is_empty() || user_id.len() > 256 || user_id.chars().any(char::is_control) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_ID",
            "path parameter userId must be 1-256 characters, none of them control characters"
                .into(),
        ));
    }
    Ok(())
}

/// `{flowId}/members/{userId}` of the path: a segment that is not UTF-8
/// after percent-decoding is a 400 with the JSON error of the API.
fn member_path(
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<(String, String), ApiError> {
    let Path((flow_id, user_id)) = path.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_PATH",
            format!("path parameters flowId and userId: {}", e.body_text()),
        )
    })?;
    check_user_id(&user_id)?;
    Ok((flow_id, user_id))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    role: Option<String>,
}

async fn grant(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let (flow_id, user_id) = member_path(path)?;
    flow_room(&flow_id)?;
    // The body is optional; when present it must be `{role?}`.
    let body: GrantBody = if body.iter().all(u8::is_ascii_whitespace) {
        GrantBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "INVALID_BODY", e.to_string()))?
    };
    let role = body.role.unwrap_or_else(|| "member".to_owned());
    if role.is_empty() || role.len() > 64 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_ROLE",
            "role must be 1-64 characters".into(),
        ));
    }
    store(&app)?
        .grant(&flow_id, &user_id, &role)
        .await
        .map_err(db_error)?;
    if let Some(cache) = &app.engine.access_cache {
        let _ = cache.forget(&flow_id, &user_id).await;
    }
    info!(flow_id, user_id, role, "membership granted");
    Ok(
        Json(json!({"ok": true, "flowId": flow_id, "userId": user_id, "role": role}))
            .into_response(),
    )
}

/// Revokes a membership race-free: the refusal is cached before the
/// eviction is published, and a join re-checks access once its socket is
/// a local member of the room (`session::join`), so a join that passed
/// its check just before the revocation either sees the refusal or is
/// evicted by the control message.
async fn revoke(
    State(app): State<Arc<App>>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let (flow_id, user_id) = member_path(path)?;
    let room = flow_room(&flow_id)?;
    let removed = store(&app)?
        .revoke(&flow_id, &user_id)
        .await
        .map_err(db_error)?;
    // Cache the refusal rather than forgetting the grant: a join that read
    // the membership just before the delete cannot then cache it back.
    // Without it a join's re-check could still read a cached grant, so a
    // failure here fails the revocation (it is idempotent: retry).
    if let Some(cache) = &app.engine.access_cache {
        cache
            .put(&flow_id, &user_id, false, app.config.access_cache_ttl)
            .await
            .map_err(unavailable)?;
    }
    // The user's locks go now, also those of a socket that is away (it
    // could only come back refused).
    crate::lock_keeper::release_user_locks(&app, &room, &user_id).await;
    // Every node holding a socket of this user in the room drops it now.
    app.engine
        .bus
        .publish(
            &room,
            RoomMessage::control(Control::RemoveUser {
                user_id: user_id.clone(),
            }),
        )
        .await
        .map_err(unavailable)?;
    info!(flow_id, user_id, removed, "membership revoked");
    Ok(Json(json!({"ok": true, "removed": removed})).into_response())
}
