//! The WebSocket handshake (RFC 6455 §4.2) on hyper's upgrade, handing the
//! upgraded connection to tokio-tungstenite with this gateway's buffer
//! sizes.
//!
//! Written here rather than taken from axum's `WebSocketUpgrade` because
//! that type hides the tungstenite stream, and with it two things the
//! WebSocket transport needs to keep a connection's memory bounded after a
//! burst and every delivery free of copies (`engineio::ws`): writing data
//! frames to the socket itself, from the room's shared frame bytes, and
//! taking the socket back to rebuild the codec without the read buffer a
//! large frame grew. The handshake itself is a few header
//! checks and tungstenite's `derive_accept_key`.

use std::future::Future;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use crate::app::App;
use crate::engineio::ws::{config, Counted, WsStream};
use crate::read_budget::Held;

/// A valid WebSocket upgrade request, not yet answered.
#[derive(Debug)]
pub(crate) struct WsUpgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
    /// The socket's account of held bytes, at the limit of a socket that
    /// has not connected yet.
    held: Held,
}

/// Whether a comma-separated header has `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl WsUpgrade {
    /// Checks the request's handshake headers; `None` if it is not a
    /// WebSocket upgrade this server can take (answered 400 by the caller).
    pub(crate) fn from_request(req: &mut Request, app: &App) -> Option<Self> {
        let h = req.headers();
        if req.method() != Method::GET
            || !has_token(h, header::CONNECTION, "upgrade")
            || !has_token(h, header::UPGRADE, "websocket")
            || h.get(header::SEC_WEBSOCKET_VERSION)
                .is_none_or(|v| v.as_bytes() != b"13")
        {
            return None;
        }
        let key = h.get(header::SEC_WEBSOCKET_KEY)?;
        let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()?;
        let on_upgrade = req.extensions_mut().remove::<OnUpgrade>()?;
        let cfg = &app.config;
        Some(WsUpgrade {
            accept,
            on_upgrade,
            config: config(cfg.max_payload),
            held: app.read_budget.account(cfg.max_payload_before_connect),
        })
    }

    /// Answers 101 and runs `serve` on the WebSocket once hyper hands the
    /// connection over, in a task of its own; `failed` if it never does.
    ///
    /// The upgrade waits in one task, the connection runs in another: a
    /// task that awaited the upgrade and then the connection would keep
    /// the upgrade's state (and `serve`, `failed`) in its cell for the
    /// connection's whole life (measured: a ~770-byte cell per connection).
    pub(crate) fn respond<F, Fut>(
        self,
        serve: F,
        failed: impl FnOnce() + Send + 'static,
    ) -> Response
    where
        F: FnOnce(WsStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let WsUpgrade {
            accept,
            on_upgrade,
            config,
            held,
        } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let io = Counted::new(TokioIo::new(upgraded), held);
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                    tokio::spawn(serve(ws));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    failed();
                }
            }
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (header::SEC_WEBSOCKET_ACCEPT, accept),
            ],
        )
            .into_response()
    }
}
