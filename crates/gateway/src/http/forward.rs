//! Forwarding a request of another node's Engine.IO session to that node,
//! so that no sticky sessions are needed: a round-robin load balancer may
//! send every polling request (and the upgrade) of one session to a
//! different node.
//!
//! The owner is read from the sid; its address from the node directory in
//! Redis. A polling GET or POST is replayed with a pooled HTTP/1.1 client,
//! its body streamed both ways (never buffered here: the owner enforces
//! the max payload). A WebSocket upgrade is replayed the same way and,
//! once the owner answers 101, both upgraded connections are joined byte
//! for byte, so the WebSocket handshake and frames pass untouched.
//! Forwarded requests carry a header and are never forwarded again: a
//! forwarded request for a sid the owner does not know (the node died and
//! its id came back, or the directory is stale) gets "Session ID unknown",
//! and the client reconnects (and recovers).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, warn};

use super::eio_error;
use crate::app::App;

/// Marks a forwarded request; its value is the forwarding node's id.
pub(super) const FORWARDED: &str = "x-flowgate-forwarded";

type HttpClient = Client<HttpConnector, Body>;

/// One pooled client per process: the internal hops are few and reused.
fn client() -> &'static HttpClient {
    static CLIENT: OnceLock<HttpClient> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector)
    })
}

/// The protocol's answer for a session no live node holds.
pub(super) fn unknown_sid() -> Response {
    eio_error(StatusCode::BAD_REQUEST, 1, "Session ID unknown")
}

/// Forwards `req` (a polling request, or the upgrade when `websocket`) to
/// `node`, the owner of its session.
pub(super) async fn forward(app: &Arc<App>, node: &str, req: Request, websocket: bool) -> Response {
    let kind = if websocket { "websocket" } else { "polling" };
    let count = |outcome: &str| {
        app.metrics
            .forwarded
            .with_label_values(&[kind, outcome])
            .inc()
    };
    if req.headers().contains_key(FORWARDED) {
        // Already forwarded once: the owner does not know the sid.
        count("unknown");
        return unknown_sid();
    }
    let base = match app.eio_sessions.url_of(node).await {
        Ok(Some(url)) => url,
        Ok(None) => {
            count("unknown");
            debug!(node, "request for a session of a node that is not alive");
            return unknown_sid();
        }
        Err(e) => {
            count("failed");
            warn!(error = %e, node, "node directory unavailable");
            return eio_error(
                StatusCode::SERVICE_UNAVAILABLE,
                3,
                "Session owner unreachable",
            );
        }
    };
    let (mut parts, body) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/socket.io/", |p| p.as_str());
    let Ok(uri) = format!("{base}{path}").parse::<Uri>() else {
        count("failed");
        warn!(node, base, "bad advertise URL in the node directory");
        return unknown_sid();
    };
    parts.uri = uri;
    parts.version = axum::http::Version::HTTP_11;
    parts.extensions = Default::default();
    let h = &mut parts.headers;
    h.remove(header::HOST);
    if !websocket {
        // Hop-by-hop; the pooled connection decides its own.
        h.remove(header::CONNECTION);
    }
    if let Ok(v) = HeaderValue::from_str(&app.config.node_id) {
        h.insert(FORWARDED, v);
    }
    let mut resp = match client().request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            // Registered but unreachable: it is dying. The client
            // reconnects elsewhere.
            count("failed");
            warn!(error = %e, node, "forwarding to the session owner failed");
            return unknown_sid();
        }
    };
    count("ok");
    if websocket && resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let owner_upgrade = hyper::upgrade::on(&mut resp);
        let Some(client_upgrade) = client_upgrade else {
            return eio_error(StatusCode::BAD_REQUEST, 3, "Bad request");
        };
        let app2 = app.clone();
        app.drain.tracker().spawn(async move {
            let (client, owner) = tokio::join!(client_upgrade, owner_upgrade);
            let (Ok(client), Ok(owner)) = (client, owner) else {
                return debug!("forwarded upgrade did not complete");
            };
            let (mut client, mut owner) = (TokioIo::new(client), TokioIo::new(owner));
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut owner) => {}
                // This node drains: cut the tunnel within the window; the
                // client reconnects elsewhere.
                _ = async {
                    let delay = app2.drain.closing().await;
                    tokio::time::sleep(delay).await;
                } => {}
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    resp.map(Body::new).into_response()
}
