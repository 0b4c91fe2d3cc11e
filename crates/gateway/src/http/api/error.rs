//! The server API's errors: every one is `{error: {code, message}}` with
//! its HTTP status, the router's own 404 and 405 included.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::warn;

/// A server API error: `{error: {code, message}}` with its status.
#[derive(Debug)]
pub(super) struct ApiError(
    pub(super) StatusCode,
    pub(super) &'static str,
    pub(super) String,
);

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
pub(super) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "UNAVAILABLE",
        e.to_string(),
    )
}

/// The membership store failed: 503, try again (the cause is logged, not
/// shown).
pub(super) fn db_error(e: flowgate_store::StoreError) -> ApiError {
    warn!(error = %e, "database request failed");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        "the database is unavailable; try again".into(),
    )
}

/// 405 for a method a resource does not take.
pub(super) async fn wrong_method(method: axum::http::Method) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("{method} is not allowed on this resource"),
    )
}

/// 404 for a path under `/v1` that no route has.
pub(super) async fn no_such_route() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "no such API resource".to_owned(),
    )
}
