//! The demo canvas and the ops view, served under `/demo/` when
//! `FLOWGATE_DEMO=1` (off by default).
//!
//! The canvas (`/demo/`) is a small front end on the stock `socket.io-client`
//! bundle that several browser tabs use to collaborate on one flow; the ops
//! view (`/demo/ops`) polls `/demo/ops.json` for this node's counters and a
//! flow's presence. Both exist to be looked at (and driven by the real-browser
//! test in `tests/browser/`), and the canvas doubles as an example for front
//! end teams.
//!
//! Enabling it is a development-only decision: `/demo/token` mints a user
//! token for any name, so anyone who can reach the node can act as anyone.
//! That is why it is off unless asked for, and loudly logged when on.
//!
//! Everything is compiled into the binary (no files to deploy, no CDN), and
//! the module only reads the node's state: it never touches rooms or the bus.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::warn;

use crate::app::App;
use crate::config::JwtKey;
use crate::rooms::room_of;

/// How long a minted demo token lives. The page refreshes it (with
/// `auth:refresh`) before it runs out.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The window over which the ops view's per-second rates are averaged: long
/// enough to smooth one poll's jitter, short enough to follow a load change.
const RATE_WINDOW: Duration = Duration::from_secs(3);

const INDEX_HTML: &str = include_str!("../demo/index.html");
const APP_JS: &str = include_str!("../demo/app.js");
const OPS_HTML: &str = include_str!("../demo/ops.html");
const OPS_JS: &str = include_str!("../demo/ops.js");
const STYLE_CSS: &str = include_str!("../demo/style.css");
/// The unmodified `dist/socket.io.min.js` of the npm package (see
/// `demo/vendor/README.md` for its version and checksum).
const SOCKET_IO_JS: &[u8] = include_bytes!("../demo/vendor/socket.io.min.js");

/// The demo's routes when `FLOWGATE_DEMO` is on, else an empty router (so
/// the caller can merge it unconditionally).
pub fn router(app: &Arc<App>) -> Router {
    if !app.config.demo {
        return Router::new();
    }
    warn!(
        "FLOWGATE_DEMO is on: /demo/ serves the demo canvas and /demo/token mints user tokens \
         for any name. Development only: never enable it on a node that users can reach."
    );
    let state = Arc::new(DemoState {
        app: app.clone(),
        samples: parking_lot::Mutex::new(VecDeque::new()),
    });
    Router::new()
        .route("/demo", get(|| async { Redirect::to("/demo/") }))
        .route("/demo/", get(|| async { asset("text/html", INDEX_HTML) }))
        .route(
            "/demo/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route(
            "/demo/style.css",
            get(|| async { asset("text/css", STYLE_CSS) }),
        )
        .route(
            "/demo/socket.io.min.js",
            get(|| async { asset("text/javascript", SOCKET_IO_JS) }),
        )
        .route("/demo/ops", get(|| async { asset("text/html", OPS_HTML) }))
        .route(
            "/demo/ops.js",
            get(|| async { asset("text/javascript", OPS_JS) }),
        )
        .route("/demo/token", get(token))
        .route("/demo/ops.json", get(ops))
        .with_state(state)
}

/// A compiled-in file. `no-cache` (revalidate) rather than a long max-age:
/// the assets change with the binary, and a stale `app.js` against a new
/// server is exactly the confusion a demo should not cause.
fn asset(content_type: &'static str, body: impl IntoResponse) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!("{content_type}; charset=utf-8"))
            .expect("a static content type is a valid header"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Shared by the demo's handlers.
struct DemoState {
    app: Arc<App>,
    /// Recent counter samples for the ops view's rates, oldest first.
    samples: parking_lot::Mutex<VecDeque<Sample>>,
}

/// The node's counters at one instant.
#[derive(Clone)]
struct Sample {
    at: Instant,
    events_in: BTreeMap<String, f64>,
    events_out: BTreeMap<String, f64>,
}

/// A demo API error, shaped like the server API's: `{error: {code, message}}`.
fn demo_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    user: Option<String>,
}

/// `GET /demo/token?user=NAME`: a token for user id `NAME`, valid for an
/// hour, signed with the node's own shared secret and algorithm (so the node
/// accepts it; `iss` and `aud` are added when the node requires them).
async fn token(State(demo): State<Arc<DemoState>>, Query(q): Query<TokenQuery>) -> Response {
    let jwt = &demo.app.config.jwt;
    let JwtKey::Secret(secret) = &jwt.key else {
        return demo_error(
            StatusCode::NOT_IMPLEMENTED,
            "NO_SHARED_SECRET",
            "this node verifies tokens with a public key (JWT_PUBLIC_KEY_FILE); the demo can \
             only mint tokens with a shared secret (JWT_ACCESS_TOKEN_SECRET)",
        );
    };
    let user = q.user.unwrap_or_default();
    let user = user.trim();
    let valid =
        !user.is_empty() && user.chars().count() <= 64 && !user.chars().any(char::is_control);
    if !valid {
        return demo_error(
            StatusCode::BAD_REQUEST,
            "INVALID_USER",
            "user must be 1-64 characters without control characters",
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let exp = now + TOKEN_TTL.as_secs();
    let mut claims = json!({"userId": user, "iat": now, "exp": exp});
    if let Some(iss) = &jwt.issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = jwt.audience.as_ref().and_then(|a| a.first()) {
        claims["aud"] = json!(aud);
    }
    let signed = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jwt.algorithm),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    );
    match signed {
        Ok(token) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({"token": token, "userId": user, "exp": exp})),
        )
            .into_response(),
        Err(e) => {
            warn!(error = %e, "demo token not signed");
            demo_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "SIGNING_FAILED",
                "the token could not be signed",
            )
        }
    }
}

#[derive(Debug, Deserialize)]
struct OpsQuery {
    flow: Option<String>,
}

/// `GET /demo/ops.json?flow=ID`: this node's id, connections, rooms, event
/// rates from its own counters, and the flow's presence (on every node).
async fn ops(State(demo): State<Arc<DemoState>>, Query(q): Query<OpsQuery>) -> Response {
    let app = &demo.app;
    let flow_id = q.flow.unwrap_or_else(|| "demo".to_owned());
    let flow_ok = !flow_id.is_empty()
        && flow_id.len() <= 128
        && flow_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if !flow_ok {
        return demo_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FLOW_ID",
            "flow must be 1-128 characters of A-Z a-z 0-9 _ - . :",
        );
    }

    let now = Sample {
        at: Instant::now(),
        events_in: by_label(&app.metrics.events_in),
        events_out: by_label(&app.metrics.events_out),
    };
    let rates = rates_in(&demo.samples, &now);

    // Presence is read through the engine, so it lists the flow's sessions
    // on every node, not only this one's.
    let room = room_of(&flow_id);
    let presence = match app.engine.presence.members(&room).await {
        Ok(members) => json!({"sessions": members}),
        Err(e) => json!({"error": e.to_string()}),
    };

    let refusals = by_label(&app.metrics.refusals);
    let body = json!({
        "node": app.config.node_id,
        "engine": app.engine.kind,
        "draining": app.drain.is_draining(),
        "connections": app.metrics.connections.get(),
        "rooms": app.metrics.rooms.get(),
        "eventsInTotal": total(&now.events_in),
        "deliveriesTotal": total(&now.events_out),
        "rates": rates,
        "refusals": refusals,
        "slowConsumerDisconnects": app.metrics.slow_consumer_disconnects.get(),
        "queueDrops": app.metrics.queue_drops.get(),
        "flow": {"id": flow_id, "room": room, "presence": presence},
    });
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// Rates per second between `now` and the oldest sample still inside
/// [`RATE_WINDOW`], then remembers `now`. `null` on the first call.
/// Several ops pages polling at once only add samples; the window stays the
/// same, so they all see the same averages.
fn rates_in(samples: &parking_lot::Mutex<VecDeque<Sample>>, now: &Sample) -> Value {
    let mut samples = samples.lock();
    while samples
        .front()
        .is_some_and(|s| now.at.duration_since(s.at) > RATE_WINDOW)
    {
        samples.pop_front();
    }
    let rates = samples.front().and_then(|old| {
        let secs = now.at.duration_since(old.at).as_secs_f64();
        // Two polls in the same instant would divide by ~0.
        (secs >= 0.2).then(|| {
            let per_event = |new: &BTreeMap<String, f64>, old: &BTreeMap<String, f64>| {
                new.iter()
                    .map(|(k, v)| (k.clone(), (v - old.get(k).unwrap_or(&0.0)) / secs))
                    .filter(|(_, r)| *r > 0.0)
                    .collect::<BTreeMap<_, _>>()
            };
            let events_in = per_event(&now.events_in, &old.events_in);
            let events_out = per_event(&now.events_out, &old.events_out);
            json!({
                "windowSecs": secs,
                "eventsInPerSec": total(&events_in),
                "deliveriesPerSec": total(&events_out),
                "eventsIn": events_in,
                "deliveries": events_out,
            })
        })
    });
    // Bounded: at most one sample per 100 ms is kept, however many
    // pages poll.
    if samples
        .back()
        .is_none_or(|s| now.at.duration_since(s.at) >= Duration::from_millis(100))
    {
        samples.push_back(now.clone());
    }
    rates.unwrap_or(Value::Null)
}

/// The sum of a labelled counter's values. (`Iterator::sum` of no floats
/// is -0.0, which would show as "-0" on the page.)
fn total(values: &BTreeMap<String, f64>) -> f64 {
    values.values().fold(0.0, |a, b| a + b)
}

/// A labelled counter's current values, by its (single) label's value.
fn by_label(counter: &IntCounterVec) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for family in counter.collect() {
        for m in family.get_metric() {
            let label = m
                .get_label()
                .first()
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            *out.entry(label).or_insert(0.0) += m.get_counter().get_value();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_average_over_the_window() {
        let samples = parking_lot::Mutex::new(VecDeque::new());
        let t0 = Instant::now();
        let sample = |secs: u64, n: f64| Sample {
            at: t0 + Duration::from_secs(secs),
            events_in: BTreeMap::from([("pod:move".to_owned(), n)]),
            events_out: BTreeMap::from([("pod:moved".to_owned(), 2.0 * n)]),
        };
        let rates = |now: &Sample| rates_in(&samples, now);
        assert_eq!(rates(&sample(0, 0.0)), Value::Null);
        let r = rates(&sample(1, 10.0));
        assert_eq!(r["eventsInPerSec"], json!(10.0));
        assert_eq!(r["deliveriesPerSec"], json!(20.0));
        let r = rates(&sample(2, 30.0));
        assert_eq!(r["eventsInPerSec"], json!(15.0));
        // The first sample falls out of the 3 s window.
        let r = rates(&sample(4, 30.0));
        assert_eq!(r["eventsInPerSec"], json!(20.0 / 3.0));
    }
}
