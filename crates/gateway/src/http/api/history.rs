//! `GET /v1/flows/{flowId}/events`: the durable log of a flow, paged by
//! offset below the flow's watermark (see [`crate::eventlog`]).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::warn;

use super::{bearer, db_error, flow_room, service_auth, store, unavailable, ApiError};
use crate::app::App;
use crate::engine::Offset;
use crate::eventlog::HistoryError;

/// `after` and `limit` of a history request; an error names the parameter.
fn history_params(q: &HashMap<String, String>) -> Result<(Option<Offset>, i64), ApiError> {
    let limit = match q.get("limit").map(|l| l.trim()) {
        None | Some("") => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    "INVALID_LIMIT",
                    "query parameter `limit` must be an integer from 1 to 1000".into(),
                )
            })?,
    };
    let after = match q.get("after").map(|a| a.trim()) {
        None | Some("") => None,
        Some(a) => {
            // The store's check too: an offset Postgres cannot date is a
            // bad parameter (400), not a database failure (503).
            let offset = flowgate_store::parse_offset(a)
                .ok()
                .and_then(|_| a.parse::<Offset>().ok())
                .ok_or_else(|| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        "INVALID_OFFSET",
                        "query parameter `after` must be an event offset `<ms>-<seq>`".into(),
                    )
                })?;
            Some(offset)
        }
    };
    Ok((after, limit))
}

/// The durable log of a flow: a service token, or a user token whose user
/// may join the flow. Only events below the flow's watermark are served
/// (see [`crate::eventlog`]), so paging never skips one that commits later.
pub(super) async fn history(
    State(app): State<Arc<App>>,
    Path(flow_id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
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
    let (after, limit) = history_params(&q)?;
    let store = store(&app)?;
    let queue = app
        .engine
        .queue
        .as_deref()
        .ok_or_else(|| unavailable("no event-log queue"))?;
    match crate::eventlog::history(queue, store, &flow_id, after, limit).await {
        Ok(page) => Ok(Json(page).into_response()),
        Err(HistoryError::Store(e)) => Err(db_error(e)),
        Err(HistoryError::Queue(e)) => {
            warn!(error = %e, flow_id, "history watermark unavailable");
            Err(unavailable(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<(Option<Offset>, i64), ApiError> {
        history_params(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn params_default_and_errors_name_the_parameter() {
        assert_eq!(params(&[]).unwrap(), (None, 100));
        assert_eq!(
            params(&[("after", ""), ("limit", "")]).unwrap(),
            (None, 100)
        );
        let (after, limit) = params(&[("after", "5-1"), ("limit", "1000")]).unwrap();
        assert_eq!((after.unwrap().to_string(), limit), ("5-1".into(), 1000));
        for (k, v) in [
            ("limit", "0"),
            ("limit", "1001"),
            ("limit", "1.5"),
            ("after", "5"),
            ("after", "a-1"),
            ("after", "300000000000000-0"),
        ] {
            let e = params(&[(k, v)]).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert!(e.2.contains(&format!("`{k}`")), "{k}={v}: {}", e.2);
        }
    }
}
