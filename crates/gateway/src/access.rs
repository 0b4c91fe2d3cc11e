//! Who may join which flow: the configured policy (`open`, `claims`,
//! `members`). `members` reads a membership row through the Postgres pool
//! and caches the decision briefly in Redis, so a reconnect storm does not
//! become a query storm.

use serde_json::Value;
use tracing::warn;

use crate::app::App;
use crate::auth::Identity;
use crate::config::AccessPolicy;

/// The decision could not be taken (the membership store is down).
#[derive(Debug, thiserror::Error)]
#[error("membership check unavailable: {0}")]
pub struct AccessUnavailable(pub String);

/// Whether `identity` may join (or read the history of) `flow_id`.
pub async fn may_join(
    app: &App,
    identity: &Identity,
    flow_id: &str,
) -> Result<bool, AccessUnavailable> {
    match &app.config.access {
        AccessPolicy::Open => Ok(true),
        AccessPolicy::Claims { claim } => Ok(claim_allows(identity.claims.get(claim), flow_id)),
        AccessPolicy::Members => {
            let user = identity.user_id.as_str();
            let cache = app.engine.access_cache.as_ref();
            if let Some(cache) = cache {
                match cache.get(flow_id, user).await {
                    Ok(Some(decision)) => return Ok(decision),
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "access cache unavailable"),
                }
            }
            let store = app
                .store
                .as_ref()
                .ok_or_else(|| AccessUnavailable("no membership store".into()))?;
            // Bounded below the query timeout: a stalled database answers
            // a join with `UNAVAILABLE` in seconds (dropping the read is
            // safe: the pooled client reads and discards its reply).
            let member = tokio::time::timeout(
                app.config.access_check_timeout,
                store.is_member(flow_id, user),
            )
            .await
            .map_err(|_| AccessUnavailable("membership read timed out".into()))?
            .map_err(|e| AccessUnavailable(e.to_string()))?;
            if let Some(cache) = cache {
                if let Err(e) = cache
                    .put(flow_id, user, member, app.config.access_cache_ttl)
                    .await
                {
                    warn!(error = %e, "access decision not cached");
                }
            }
            Ok(member)
        }
    }
}

/// The `claims` policy: the claim is `"*"`, the flow id, or a list of them.
fn claim_allows(claim: Option<&Value>, flow_id: &str) -> bool {
    let one = |v: &Value| match v {
        Value::String(s) => s == "*" || s == flow_id,
        Value::Number(n) => n.to_string() == flow_id,
        _ => false,
    };
    match claim {
        Some(Value::Array(a)) => a.iter().any(one),
        Some(v) => one(v),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::claim_allows;
    use serde_json::json;

    #[test]
    fn claims() {
        assert!(claim_allows(Some(&json!("*")), "f"));
        assert!(claim_allows(Some(&json!(["a", "f"])), "f"));
        assert!(claim_allows(Some(&json!([7])), "7"));
        assert!(!claim_allows(Some(&json!(["a"])), "f"));
        assert!(!claim_allows(None, "f"));
        assert!(!claim_allows(Some(&json!({"f": true})), "f"));
    }
}
