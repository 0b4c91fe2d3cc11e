//! The server API under `/v1` for backend services: publish into a flow,
//! read its presence, locks and history, grant and revoke membership.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::bearer;
use crate::app::App;
use crate::engine::{Control, QueuedEvent, RoomMessage};
use crate::events::{GATEWAY_EVENTS, RESERVED};
use crate::rooms::room_of;

mod error;
mod history;
use error::{db_error, no_such_route, unavailable, wrong_method, ApiError};
use history::history;

/// The `/v1` routes.
pub(super) fn routes(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route(
            "/v1/flows/{flow_id}/events",
            post(publish_event).get(history).fallback(wrong_method),
        )
        .route(
            "/v1/flows/{flow_id}/presence",
            get(presence).fallback(wrong_method),
        )
        .route(
            "/v1/flows/{flow_id}/locks",
            get(locks).fallback(wrong_method),
        )
        .route(
            "/v1/flows/{flow_id}/members/{user_id}",
            axum::routing::put(grant)
                .delete(revoke)
                .fallback(wrong_method),
        )
        .route_layer(axum::middleware::from_fn_with_state(app, token_first))
        // After the layer: an unknown path is 404 for anyone.
        .route("/v1", axum::routing::any(no_such_route))
        .route("/v1/", axum::routing::any(no_such_route))
        .route("/v1/{*rest}", axum::routing::any(no_such_route))
}

/// Writes (POST, PUT, DELETE) need the service token, and it is checked
/// before anything reads the body: an anonymous client cannot make the
/// node buffer a body. An announced body over the max payload is 413 at
/// once; one that grows past it while read is cut by `DefaultBodyLimit`. (Reads check their own credentials: the history
/// also takes a member's JWT.)
async fn token_first(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let write = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if write {
        if let Err(e) = service_auth(&app, req.headers()) {
            return e.into_response();
        }
        // An announced body over the limit is refused before it is read.
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > app.config.max_payload as u64) {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "TOO_LARGE",
                format!("the body is over {} bytes", app.config.max_payload),
            )
            .into_response();
        }
    }
    next.run(req).await
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
    let Json(body) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "TOO_LARGE",
            "the body is over the max payload".into(),
        ),
        _ => ApiError(StatusCode::BAD_REQUEST, "INVALID_BODY", e.body_text()),
    })?;
    // Not a name the client library reserves, nor one the gateway sends
    // itself (a backend's `user:left` would corrupt every client's
    // presence), nor one with control characters (NUL is refused by
    // Postgres: the event would be acknowledged, then dead-lettered).
    let event = body.event.as_str();
    if event.is_empty()
        || event.len() > 128
        || RESERVED.contains(&event)
        || GATEWAY_EVENTS.contains(&event)
        || event.chars().any(char::is_control)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "INVALID_EVENT",
            "event must be a name of 1-128 characters, without control characters, that neither the client library nor the gateway reserves".into(),
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
    if persist {
        // Before the publish: an event the queue cannot take is refused
        // before anyone received it.
        crate::eventlog::admit(&app, &flow_id, &body.event, &data)
            .await
            .map_err(unavailable)?;
    }
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
    // The eviction needs Redis: while it is unreachable, refuse before the
    // row is deleted, so that a 503 means nothing changed. (Redis failing
    // between the two still answers 503 with the row gone; the retry then
    // completes the eviction and says `removed: false`.)
    app.engine.health.ping().await.map_err(unavailable)?;
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
