//! The Engine.IO endpoint `/socket.io/`: opens WebSocket and HTTP
//! long-polling sessions, serves the GETs and POSTs of polling sessions and
//! their upgrade probes, and forwards requests of sessions another node
//! owns ([`super::forward`]).
//!
//! Errors are the JavaScript server's: HTTP status plus `{code, message}`
//! (0 transport unknown, 1 session ID unknown, 2 bad handshake method,
//! 3 bad request, 4 forbidden, 5 unsupported protocol version).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{info, warn};

use super::body::{self, BodyError};
use super::forward::{forward, unknown_sid};
use super::ws_upgrade::WsUpgrade;
use super::{bearer, cors, eio_error, EioError, Slot};
use crate::app::App;
use crate::engineio::polling::{probe, PollError, PollingTransport, Shared};
use crate::engineio::{self, ws::WsTransport, Owner};
use crate::read_budget::OverRead;
use crate::session::Handshake;

fn refused(app: &App, reason: &str) {
    app.metrics
        .connections_refused
        .with_label_values(&[reason])
        .inc()
}

/// Every request to `/socket.io/`.
pub(super) async fn engine_io(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let q: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    let polling = match q.get("transport").map(String::as_str) {
        Some("polling") => true,
        Some("websocket") => false,
        _ => {
            refused(&app, "bad request");
            return eio_error(StatusCode::BAD_REQUEST, 0, "Transport unknown");
        }
    };
    if q.get("EIO").map(String::as_str) != Some("4") {
        refused(&app, "bad request");
        return eio_error(StatusCode::BAD_REQUEST, 5, "Unsupported protocol version");
    }
    // Polling is served with CORS; a WebSocket keeps its Origin check.
    let origin = if polling {
        match cors::check(&app, req.headers()) {
            Ok(o) => o,
            Err(e) => return e.into_response(),
        }
    } else {
        if let Err(e) = ws_origin(&app, req.headers()) {
            return e.into_response();
        }
        None
    };
    if polling && cors::is_preflight(req.method()) {
        return cors::preflight(origin, req.headers());
    }
    let resp = match q.get("sid") {
        None => open(&app, &q, req, peer, polling).await,
        Some(sid) => match app.eio_sessions.locate(sid) {
            Owner::Local(shared) if polling => serve_polling(&app, &shared, req).await,
            Owner::Local(shared) => upgrade(&app, shared, req).await,
            Owner::Remote(node) => forward(&app, &node, req, !polling).await,
            Owner::Unknown => {
                refused(&app, "unknown sid");
                unknown_sid()
            }
        },
    };
    cors::apply(resp, origin)
}

fn ws_origin(app: &App, headers: &HeaderMap) -> Result<(), EioError> {
    if app.config.allowed_origins.is_empty() {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin {
        let origin = origin.trim_end_matches('/');
        if !app.config.allowed_origins.iter().any(|a| a == origin) {
            refused(app, "origin");
            info!(origin, "upgrade refused: origin not allowed");
            return Err(EioError(StatusCode::FORBIDDEN, 4, "Forbidden"));
        }
    }
    Ok(())
}

/// Takes a connection slot, unless the node drains or is full.
fn admit(app: &Arc<App>) -> Result<Slot, EioError> {
    if app.drain.is_draining() {
        refused(app, "draining");
        return Err(EioError(
            StatusCode::SERVICE_UNAVAILABLE,
            3,
            "Server is draining",
        ));
    }
    if app.connections.fetch_add(1, Ordering::Relaxed) >= app.config.max_connections {
        app.connections.fetch_sub(1, Ordering::Relaxed);
        refused(app, "capacity");
        warn!(
            max = app.config.max_connections,
            "connection refused: connection cap reached"
        );
        return Err(EioError(
            StatusCode::SERVICE_UNAVAILABLE,
            3,
            "Server is at capacity",
        ));
    }
    Ok(Slot(app.clone()))
}

/// A new session (no `sid`): a WebSocket, or a polling session whose
/// handshake GET returns the open packet.
async fn open(
    app: &Arc<App>,
    q: &HashMap<String, String>,
    req: Request,
    peer: SocketAddr,
    polling: bool,
) -> Response {
    if req.method() != Method::GET {
        refused(app, "bad request");
        return eio_error(StatusCode::BAD_REQUEST, 2, "Bad handshake method");
    }
    let hs = Handshake {
        bearer: bearer(req.headers()),
        query_token: q.get("token").cloned(),
        peer: peer.to_string(),
    };
    if polling {
        let slot = match admit(app) {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        };
        let sid = app.eio_sessions.new_sid();
        let cfg = &app.config;
        let (transport, shared) = PollingTransport::open(
            sid.clone(),
            app.eio_sessions.map.clone(),
            (cfg.outbound_queue_bytes, cfg.outbound_queue),
            cfg.max_payload,
            app.metrics.upgrades.clone(),
        );
        let conn = engineio::serve(Box::new(transport), app.clone(), hs, sid, slot);
        app.drain.tracker().spawn(conn);
        return poll_response(shared.poll().await);
    }
    let mut req = req;
    let Some(ws) = WsUpgrade::from_request(&mut req, app) else {
        refused(app, "bad request");
        return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request");
    };
    let slot = match admit(app) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let app = app.clone();
    ws.respond(
        move |socket| {
            let transport = Box::new(WsTransport::new(socket, 0));
            let sid = crate::ids::random_id(20);
            // The connection's own task (`respond` spawns it): its cell
            // holds this future, nothing of the upgrade's.
            let conn = engineio::serve(transport, app.clone(), hs, sid, slot);
            app.drain.tracker().track_future(conn)
        },
        || {},
    )
}

/// A GET or POST of a polling session this node owns.
async fn serve_polling(app: &App, shared: &Shared, req: Request) -> Response {
    match *req.method() {
        Method::GET => poll_response(shared.poll().await),
        Method::POST => {
            // Before CONNECT the session is anyone's: it may post no more
            // than an unauthenticated WebSocket may hold.
            let cfg = &app.config;
            let limit = if shared.is_connected() {
                cfg.max_payload
            } else {
                cfg.max_payload_before_connect
            };
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let timeout = cfg.http_body_timeout;
            if !shared.is_connected()
                && declared.is_some_and(|n| n > limit as u64 && n <= cfg.max_payload as u64)
            {
                return connect_too_large(app, shared, req.into_body(), timeout).await;
            }
            let held = app.read_budget.account(limit);
            let body = match body::read(req.into_body(), held, declared, timeout).await {
                Ok(b) => b,
                Err(BodyError::Over(OverRead::Connection)) => return too_large(app, shared, limit),
                Err(BodyError::Over(OverRead::Node)) => {
                    warn!(
                        read_budget = cfg.read_budget,
                        "polling POST refused: the node's read budget is spent"
                    );
                    shared.read_budget_spent();
                    return eio_error(StatusCode::SERVICE_UNAVAILABLE, 3, "Try again later");
                }
                Err(BodyError::Broken) => {
                    return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request")
                }
                Err(BodyError::TimedOut) => {
                    return eio_error(StatusCode::REQUEST_TIMEOUT, 3, "Body not sent in time")
                }
            };
            match shared.post(body).await {
                Ok(()) => ok(),
                Err(e) => poll_error(e),
            }
        }
        _ => eio_error(StatusCode::BAD_REQUEST, 3, "Bad request"),
    }
}

/// A POST over the limit (the max payload, or the smaller one before
/// CONNECT): 413, and the session ends as a WebSocket connection does for
/// an oversize frame.
fn too_large(app: &App, shared: &Shared, limit: usize) -> Response {
    warn!(
        limit,
        max_payload = app.config.max_payload,
        "polling POST over its limit"
    );
    shared.oversize();
    eio_error(StatusCode::PAYLOAD_TOO_LARGE, 3, "Payload too large")
}

/// A POST over the limit before CONNECT, within the max payload: from a
/// stock client, a CONNECT with a token far over any real one. Its body is
/// read and dropped (nothing is held) and the POST answered `ok`, so the
/// client reads the CONNECT_ERROR the session ends with on its next GET
/// and stops; a 413 would be a broken transport to it, and it would
/// reconnect and post the same CONNECT again, forever.
async fn connect_too_large(app: &App, shared: &Shared, body: Body, timeout: Duration) -> Response {
    let limit = app.config.max_payload_before_connect;
    match body::discard(body, app.config.max_payload, timeout).await {
        Ok(()) => {
            warn!(
                limit,
                "polling CONNECT over the size allowed before authentication"
            );
            shared.oversize();
            ok()
        }
        Err(_) => too_large(app, shared, limit),
    }
}

fn ok() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/html"))],
        "ok",
    )
        .into_response()
}

fn poll_error(e: PollError) -> Response {
    match e {
        PollError::Unknown => unknown_sid(),
        PollError::BadRequest(_) => eio_error(StatusCode::BAD_REQUEST, 3, "Bad request"),
    }
}

fn poll_response(r: Result<String, PollError>) -> Response {
    match r {
        Ok(payload) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=UTF-8"),
            )],
            payload,
        )
            .into_response(),
        Err(e) => poll_error(e),
    }
}

/// A WebSocket with the `sid` of a polling session this node owns: the
/// upgrade probe.
async fn upgrade(app: &Arc<App>, shared: Arc<Shared>, mut req: Request) -> Response {
    let Some(ws) = WsUpgrade::from_request(&mut req, app) else {
        return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request");
    };
    if !shared.begin_probe() {
        return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request");
    }
    let tracker = app.drain.tracker().clone();
    let timeout = app.config.upgrade_timeout;
    let failed = shared.clone();
    ws.respond(
        move |socket| tracker.track_future(probe(WsTransport::new(socket, 0), shared, timeout)),
        move || failed.probe_failed(),
    )
}
