//! The server API under `/v1` for backend services: publish into a flow,
//! read its presence and history, grant and revoke membership.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

use super::bearer;
use crate::app::App;

/// The `/v1` routes.
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/v1/flows/{flow_id}/events",
            post(publish_event).get(history),
        )
        .route("/v1/flows/{flow_id}/presence", get(presence))
        .route(
            "/v1/flows/{flow_id}/members/{user_id}",
            axum::routing::put(grant).delete(revoke),
        )
}
use crate::engine::{Control, QueuedEvent, RoomMessage};
use crate::events::RESERVED;
use crate::rooms::room_of;

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
    if user_id.is_empty() || user_id.len() > 256 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_ID",
            "userId must be 1-256 characters".into(),
        ));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    role: Option<String>,
}

async fn grant(
    State(app): State<Arc<App>>,
    Path((flow_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    flow_room(&flow_id)?;
    check_user_id(&user_id)?;
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

async fn revoke(
    State(app): State<Arc<App>>,
    Path((flow_id, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    service_auth(&app, &headers)?;
    let room = flow_room(&flow_id)?;
    check_user_id(&user_id)?;
    let removed = store(&app)?
        .revoke(&flow_id, &user_id)
        .await
        .map_err(db_error)?;
    // Cache the refusal rather than forgetting the grant: a join that read
    // the membership just before the delete cannot then cache it back.
    if let Some(cache) = &app.engine.access_cache {
        let _ = cache
            .put(&flow_id, &user_id, false, app.config.access_cache_ttl)
            .await;
    }
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

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// The durable log of a flow: a service token, or a user token whose user
/// may join the flow.
async fn history(
    State(app): State<Arc<App>>,
    Path(flow_id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    flow_room(&flow_id)?;
    if service_auth(&app, &headers).is_err() {
        let token = bearer(&headers).ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "Authorization: Bearer <token> required".into(),
            )
        })?;
        let identity = app
            .verifier
            .verify(&token)
            .map_err(|e| ApiError(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
        let allowed = crate::access::may_join(&app, &identity, &flow_id)
            .await
            .map_err(unavailable)?;
        if !allowed {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "not a member of this flow".into(),
            ));
        }
    }
    let Query(q) =
        query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, "INVALID_QUERY", e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_LIMIT",
            "limit must be 1-1000".into(),
        ));
    }
    let after = q.after.filter(|a| !a.is_empty());
    if let Some(a) = &after {
        flowgate_store::parse_offset(a)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "INVALID_OFFSET", e.to_string()))?;
    }
    let events = store(&app)?
        .events(&flow_id, after.as_deref(), limit)
        .await
        .map_err(db_error)?;
    let next = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.offset.clone()))
        .flatten();
    Ok(Json(json!({"events": events, "next": next})).into_response())
}
