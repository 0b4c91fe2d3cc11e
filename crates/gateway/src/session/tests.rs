//! The session driven without a socket: frames in through `on_message`,
//! frames out through `pop_local` and the connection's queue, exactly as
//! the connection task drives it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Handshake, Session};
use crate::app::App;
use crate::config::Config;
use crate::engine::memory::MemoryHub;
use crate::engineio::End;
use crate::outbound::{OutFrame, Outbound, OutboundRx};

const SECRET: &str = "session-test-secret";

pub(super) fn token(user: &str, exp_in: i64) -> String {
    token_with(json!({"userId": user}), exp_in)
}

/// A token with `claims` (and `exp` in `exp_in` seconds).
pub(super) fn token_with(mut claims: Value, exp_in: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    claims["exp"] = json!(now + exp_in);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub(super) async fn app(extra: &[(&str, &str)]) -> Arc<App> {
    let mut vars: std::collections::HashMap<String, String> = [
        ("JWT_ACCESS_TOKEN_SECRET", SECRET),
        ("JWT_LEEWAY_SECS", "0"),
        ("FLOWGATE_NODE_ID", "t1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    App::new(Config::from_vars(&vars).unwrap(), Some(MemoryHub::new()))
        .await
        .unwrap()
}

pub(super) struct Client {
    pub(super) session: Session,
    rx: OutboundRx,
}

impl Client {
    pub(super) fn new(app: &Arc<App>) -> Self {
        let (out, rx) = Outbound::new(64, 1 << 20, Duration::from_secs(5), app.metrics.clone());
        Client {
            session: Session::new(app.clone(), Handshake::default(), out),
            rx,
        }
    }

    pub(super) async fn send(&mut self, packet: &str) -> Result<(), End> {
        self.session.on_message(packet).await
    }

    /// Everything the client would read now, in write order: the session's
    /// own frames, then the queue, room frames filtered as the connection
    /// task filters them.
    pub(super) fn read(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = self.session.pop_local() {
            Self::text(&mut self.session, f, &mut out);
        }
        while let Some(f) = self.rx.try_recv() {
            Self::text(&mut self.session, f, &mut out);
        }
        out
    }

    fn text(session: &mut Session, f: OutFrame, out: &mut Vec<String>) {
        match f {
            OutFrame::Text(t) => out.push(t.to_string()),
            OutFrame::Room(r) => {
                if session.admit(&r) {
                    out.push(r.text.to_string())
                }
            }
            OutFrame::Evict(_) => out.push("evict".into()),
        }
    }

    pub(super) async fn connect(&mut self, auth: Value) -> Value {
        self.connect_reading(auth).await.0
    }

    /// CONNECT; the reply and everything else read with it.
    pub(super) async fn connect_reading(&mut self, auth: Value) -> (Value, Vec<String>) {
        self.send(&format!("0/flows,{auth}")).await.unwrap();
        let frames = self.read();
        let reply = frames
            .iter()
            .find_map(|f| f.strip_prefix("40/flows,"))
            .unwrap_or_else(|| panic!("no CONNECT reply in {frames:?}"));
        (serde_json::from_str(reply).unwrap(), frames)
    }
}

/// A connected client that sent `flow:join` with `join` (what it read is
/// left unread).
pub(super) async fn joined_with(app: &Arc<App>, user: &str, join: Value) -> Client {
    let mut c = Client::new(app);
    c.connect(json!({"token": token(user, 60)})).await;
    c.send(&format!(r#"2/flows,["flow:join",{join}]"#))
        .await
        .unwrap();
    c
}

/// The arguments of every event named `name` in `frames`.
pub(super) fn events(frames: &[String], name: &str) -> Vec<Vec<Value>> {
    frames
        .iter()
        .filter_map(|f| f.strip_prefix("42/flows,"))
        .filter_map(|j| serde_json::from_str::<Vec<Value>>(j).ok())
        .filter(|a| a[0] == name)
        .map(|a| a[1..].to_vec())
        .collect()
}

pub(super) fn acks(frames: &[String]) -> Vec<Value> {
    frames
        .iter()
        .filter_map(|f| f.strip_prefix("43/flows,"))
        .map(|j| {
            let j = j.trim_start_matches(|c: char| c.is_ascii_digit());
            serde_json::from_str::<Vec<Value>>(j).unwrap()[0].clone()
        })
        .collect()
}

#[tokio::test]
async fn connect_refuses_without_a_token_and_greets_with_one() {
    let app = app(&[]).await;
    let mut c = Client::new(&app);
    c.send("0/flows,{}").await.unwrap();
    let f = c.read();
    assert!(f[0].starts_with("44/flows,"), "{f:?}");
    assert!(f[0].contains("NO_TOKEN"));
    assert!(!c.session.is_connected());

    let reply = c.connect(json!({"token": token("ada", 60)})).await;
    assert!(
        reply["sid"].is_string() && reply["pid"].is_string(),
        "{reply}"
    );
    assert!(c.session.is_connected());
}

#[tokio::test]
async fn join_relay_and_refusals() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    let mut b = Client::new(&app);
    a.connect(json!({"token": token("ada", 60)})).await;
    b.connect(json!({"token": token("bob", 60)})).await;
    a.send(r#"2/flows,1["flow:join",{"flowId":"f1","userName":"Ada"}]"#)
        .await
        .unwrap();
    let fa = a.read();
    assert_eq!(events(&fa, "flow:users")[0][0].as_array().unwrap().len(), 1);
    assert_eq!(acks(&fa), [json!({"ok": true})]);
    b.send(r#"2/flows,["flow:join",{"flowId":"f1"}]"#)
        .await
        .unwrap();
    let fb = b.read();
    assert_eq!(events(&fb, "flow:users")[0][0].as_array().unwrap().len(), 2);
    let joined = events(&a.read(), "user:joined");
    assert_eq!(joined[0][0]["userId"], "bob");

    b.send(r#"2/flows,7["pod:move",{"podId":"p","position":{"x":1,"y":2},"userId":"forged"}]"#)
        .await
        .unwrap();
    assert_eq!(acks(&b.read()), [json!({"ok": true})]);
    let moved = events(&a.read(), "pod:moved");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0][0]["userId"], "bob");
    assert_eq!(moved[0][0]["position"], json!({"x":1,"y":2}));
    // The room offset travels as the trailing argument.
    assert!(moved[0][1].as_str().unwrap().contains('-'), "{moved:?}");

    b.send(r#"2/flows,8["no:such",{}]"#).await.unwrap();
    let fb = b.read();
    assert_eq!(acks(&fb)[0]["code"], "UNKNOWN_EVENT");
    assert_eq!(events(&fb, "error")[0][0]["code"], "UNKNOWN_EVENT");
    b.send(r#"2/flows,9["pod:move",{"podId":"p"}]"#)
        .await
        .unwrap();
    assert_eq!(acks(&b.read())[0]["code"], "INVALID_PAYLOAD");
    assert!(a.read().is_empty(), "a refused event is not relayed");
}

/// JSON nested past the parser's depth is well-formed input: the event is
/// refused with `INVALID_PAYLOAD` and the connection stays; before CONNECT
/// it is a broken packet like any other.
#[tokio::test]
async fn an_event_nested_too_deeply_is_refused_and_the_connection_stays() {
    let app = app(&[]).await;
    let deep = |id: u64| {
        format!(
            r#"2/flows,{id}["pod:update",{{"podId":"p","updates":{}{}}}]"#,
            "[".repeat(300),
            "]".repeat(300)
        )
    };
    let mut stranger = Client::new(&app);
    assert!(stranger.send(&deep(1)).await.is_err());

    let mut a = joined_with(&app, "ada", json!({"flowId": "f"})).await;
    a.read();
    a.send(&deep(2)).await.expect("the connection stays");
    let f = a.read();
    assert_eq!(acks(&f)[0]["code"], "INVALID_PAYLOAD", "{f:?}");
    assert_eq!(events(&f, "error")[0][0]["code"], "INVALID_PAYLOAD");
    a.send(r#"2/flows,3["pod:delete",{"podId":"p"}]"#)
        .await
        .unwrap();
    assert_eq!(acks(&a.read()), [json!({"ok": true})]);
}

#[tokio::test]
async fn the_rate_limit_refuses_past_the_burst() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    a.connect(json!({"token": token("ada", 60)})).await;
    a.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    a.read();
    for i in 0..25 {
        a.send(&format!(
            r#"2/flows,{i}["cursor:move",{{"position":{{"x":1,"y":1}}}}]"#
        ))
        .await
        .unwrap();
    }
    let codes: Vec<Value> = acks(&a.read())
        .into_iter()
        .map(|a| a["code"].clone())
        .collect();
    let limited = codes.iter().filter(|c| *c == "RATE_LIMIT").count();
    // The join spent one of the burst of 20.
    assert!((5..=7).contains(&limited), "{codes:?}");
}

#[tokio::test]
async fn an_expired_token_ends_the_session() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    a.connect(json!({"token": token("ada", 1)})).await;
    let deadline = a.session.deadline().unwrap();
    assert!(deadline <= Instant::now() + Duration::from_secs(2));
    assert_eq!(
        a.session
            .on_timer(deadline + Duration::from_millis(1))
            .await,
        Err(End::TokenExpired)
    );
    let f = a.read();
    assert_eq!(events(&f, "error")[0][0]["code"], "TOKEN_EXPIRED");
    assert!(f.iter().any(|f| f == "41/flows,"), "{f:?}");
}

#[tokio::test]
async fn a_lost_session_recovers_with_what_it_missed() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    let mut b = Client::new(&app);
    let first = a.connect(json!({"token": token("ada", 60)})).await;
    b.connect(json!({"token": token("bob", 60)})).await;
    a.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    b.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    b.send(r#"2/flows,["pod:delete",{"podId":"seen"}]"#)
        .await
        .unwrap();
    let seen = events(&a.read(), "pod:deleted");
    let offset = seen[0][1].as_str().unwrap().to_owned();
    // The transport is lost.
    a.session.close(&End::ClientClosed).await;
    assert_eq!(events(&b.read(), "user:left").len(), 1);
    for i in 0..3 {
        b.send(&format!(r#"2/flows,["pod:delete",{{"podId":"m{i}"}}]"#))
            .await
            .unwrap();
    }
    b.send(r#"2/flows,["cursor:move",{"position":{"x":0,"y":0}}]"#)
        .await
        .unwrap();
    b.read();

    let mut a2 = Client::new(&app);
    let (reply, f) = a2
        .connect_reading(json!({"token": token("ada", 60), "pid": first["pid"], "offset": offset}))
        .await;
    assert_eq!(reply, first, "same sid and pid");
    assert!(
        f[0].starts_with("40/flows,"),
        "the CONNECT reply comes first: {f:?}"
    );
    let missed: Vec<Value> = events(&f, "pod:deleted")
        .into_iter()
        .map(|a| a[0]["podId"].clone())
        .collect();
    assert_eq!(missed, ["m0", "m1", "m2"], "{f:?}");
    assert!(
        events(&f, "cursor:updated").is_empty(),
        "volatile events are not replayed"
    );
    assert_eq!(events(&b.read(), "user:joined").len(), 1);

    // Live events follow, exactly once.
    b.send(r#"2/flows,["pod:delete",{"podId":"live"}]"#)
        .await
        .unwrap();
    let live = events(&a2.read(), "pod:deleted");
    assert_eq!(live.len(), 1);
    assert_eq!(live[0][0]["podId"], "live");

    // Another user cannot take the session over, and an unknown pid gets a
    // new session.
    let mut m = Client::new(&app);
    let r = m
        .connect(json!({"token": token("mallory", 60), "pid": first["pid"]}))
        .await;
    assert_ne!(r["sid"], first["sid"]);
    let mut u = Client::new(&app);
    let r = u
        .connect(json!({"token": token("ada", 60), "pid": "nope"}))
        .await;
    assert_ne!(r["pid"], "nope");
}

#[tokio::test]
async fn a_session_left_on_purpose_is_not_recovered() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    let first = a.connect(json!({"token": token("ada", 60)})).await;
    a.send("1/flows,").await.unwrap();
    a.session.close(&End::ClientClosed).await;
    let mut a2 = Client::new(&app);
    let r = a2
        .connect(json!({"token": token("ada", 60), "pid": first["pid"]}))
        .await;
    assert_ne!(r["pid"], first["pid"]);
}

#[tokio::test]
async fn recovery_is_refused_when_the_log_no_longer_holds_the_gap() {
    let app = app(&[("FLOWGATE_ROOM_LOG_LEN", "2")]).await;
    let mut a = Client::new(&app);
    let mut b = Client::new(&app);
    let first = a.connect(json!({"token": token("ada", 60)})).await;
    b.connect(json!({"token": token("bob", 60)})).await;
    a.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    b.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    a.read();
    a.session.close(&End::ClientClosed).await;
    for i in 0..5 {
        b.send(&format!(r#"2/flows,["pod:delete",{{"podId":"m{i}"}}]"#))
            .await
            .unwrap();
    }
    let mut a2 = Client::new(&app);
    let (r, f) = a2
        .connect_reading(json!({"token": token("ada", 60), "pid": first["pid"]}))
        .await;
    assert_ne!(
        r["pid"], first["pid"],
        "a gap that cannot be filled is a new session"
    );
    assert!(events(&f, "pod:deleted").is_empty());
}

#[tokio::test]
async fn a_session_lost_longer_than_the_window_is_not_recovered() {
    let app = app(&[("FLOWGATE_RECOVERY_WINDOW_MS", "50")]).await;
    let mut a = Client::new(&app);
    let first = a.connect(json!({"token": token("ada", 60)})).await;
    a.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    a.session.close(&End::ClientClosed).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let mut a2 = Client::new(&app);
    let r = a2
        .connect(json!({"token": token("ada", 60), "pid": first["pid"]}))
        .await;
    assert_ne!(r["pid"], first["pid"]);
    assert_ne!(r["sid"], first["sid"]);
}

#[tokio::test]
async fn one_user_cannot_take_every_slot_of_a_node() {
    let app = app(&[("FLOWGATE_MAX_CONNECTIONS_PER_USER", "2")]).await;
    let mut a = Client::new(&app);
    let mut b = Client::new(&app);
    a.connect(json!({"token": token("ada", 60)})).await;
    b.connect(json!({"token": token("ada", 60)})).await;
    let mut c = Client::new(&app);
    c.send(&format!("0/flows,{}", json!({"token": token("ada", 60)})))
        .await
        .unwrap();
    let f = c.read();
    assert!(
        f[0].starts_with("44/flows,") && f[0].contains("TOO_MANY_CONNECTIONS"),
        "{f:?}"
    );
    // Another user is not affected, and a slot comes back when a socket ends.
    Client::new(&app)
        .connect(json!({"token": token("bob", 60)}))
        .await;
    drop(a);
    c.connect(json!({"token": token("ada", 60)})).await;
}

#[tokio::test]
async fn connect_churn_on_one_connection_closes_it() {
    let app = app(&[]).await;
    let mut a = Client::new(&app);
    let auth = json!({"token": token("ada", 60)});
    let mut end = Ok(());
    for _ in 0..20 {
        end = a.send(&format!("0/flows,{auth}")).await;
        if end.is_err() {
            break;
        }
        a.send("1/flows,").await.unwrap();
    }
    assert!(
        matches!(end, Err(End::Protocol("connect churn", _))),
        "{end:?}"
    );
}
