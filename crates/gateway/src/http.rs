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
use crate::connection::{self, Handshake};
use crate::engine::RoomMessage;
use crate::events::RESERVED;
use crate::rooms::room_of;

/// Every route of a node.
pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.config.max_payload;
    Router::new()
        .route("/socket.io/", any(engine_io))
        .route("/socket.io", any(engine_io))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/flows/{flow_id}/events", post(publish_event))
        .route("/v1/flows/{flow_id}/presence", get(presence))
        .layer(DefaultBodyLimit::max(body_limit))
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
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            let tracker = app.drain.tracker().clone();
            tracker.track_future(async move {
                let _slot = slot;
                connection::run(socket, app, hs).await;
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
    let body = json!({
        "status": if draining { "draining" } else if ok { "ok" } else { "degraded" },
        "node": app.config.node_id,
        "connections": app.connections.load(Ordering::Relaxed),
        "dependencies": {"engine": engine},
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
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
    let offset = app
        .engine
        .bus
        .publish(&room, RoomMessage::new(body.event, body.data))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                e.to_string(),
            )
        })?;
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
    let members = app.engine.presence.members(&room).await.map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            e.to_string(),
        )
    })?;
    Ok(Json(members).into_response())
}
