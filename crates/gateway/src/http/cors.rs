//! CORS for the polling transport: browsers on another origin send their
//! long-polling requests with credentials, so the allowed origin is echoed
//! (never `*`, which credentials forbid) with
//! `Access-Control-Allow-Credentials: true`, and preflights are answered.
//!
//! The origins are `FRONTEND_URL`'s (empty allows any, as for the
//! WebSocket). A request from another origin is refused with 403 rather
//! than served without headers: the browser would hide the answer anyway,
//! and the session is never created.

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::EioError;
use crate::app::App;

/// Checks the `Origin` of a polling request: `Ok(Some(origin))` to echo,
/// `Ok(None)` when there is none (not a browser's cross-origin request),
/// `Err` with the 403 to send.
pub(super) fn check(app: &App, headers: &HeaderMap) -> Result<Option<HeaderValue>, EioError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(None);
    };
    let allowed = &app.config.allowed_origins;
    let ok = allowed.is_empty()
        || origin
            .to_str()
            .is_ok_and(|o| allowed.iter().any(|a| a == o.trim_end_matches('/')));
    if ok {
        Ok(Some(origin.clone()))
    } else {
        app.metrics
            .connections_refused
            .with_label_values(&["origin"])
            .inc();
        tracing::info!(origin = ?origin, "polling request refused: origin not allowed");
        Err(EioError(StatusCode::FORBIDDEN, 4, "Forbidden"))
    }
}

/// The answer to a preflight `OPTIONS`.
pub(super) fn preflight(origin: Option<HeaderValue>, headers: &HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    // The client sends Content-Type on POSTs and any `extraHeaders` the
    // application set (e.g. Authorization): allow what is asked.
    let asked = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("content-type"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    apply(resp, origin)
}

/// Adds the CORS headers of an allowed origin to a response (replacing any
/// a forwarding owner set, so they are never doubled).
pub(super) fn apply(mut resp: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

/// Whether a request is a CORS preflight.
pub(super) fn is_preflight(method: &Method) -> bool {
    method == Method::OPTIONS
}
