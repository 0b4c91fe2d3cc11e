//! Pod locks across nodes on one real Redis: one winner out of many
//! concurrent attempts, `flow:locks` and the locks API on every node, and
//! release when the holder leaves, disconnects for good, is revoked (real
//! Postgres for memberships), or its node is killed; kept when the session
//! is recovered on another node, and after a Redis restart.

use std::time::{Duration, Instant};

use flowgate_test_support::procs::{NodeProcess, PgStack, RedisServer};
use flowgate_test_support::{api, token, RawClient, TestNode};
use serde_json::{json, Value};

const WINDOW_MS: u64 = 1_000;
const FAST: &[(&str, &str)] = &[
    ("FLOWGATE_NODE_HEARTBEAT_MS", "200"),
    ("FLOWGATE_NODE_DEAD_AFTER_MS", "1500"),
    ("FLOWGATE_PRESENCE_REFRESH_MS", "300"),
    ("FLOWGATE_SESSION_TTL_MS", "3000"),
    ("FLOWGATE_RECOVERY_WINDOW_MS", "1000"),
];

async fn nodes(redis: &RedisServer, n: usize, extra: &[(&str, &str)]) -> Vec<TestNode> {
    TestNode::start_redis_nodes(&redis.url(), "node", n, &[FAST, extra].concat())
        .await
        .expect("nodes start")
}

/// Connects to `url` and joins `flow`; returns the client, its `{sid,
/// pid}` and the `flow:locks` it received.
async fn joined(url: &str, user: &str, flow: &str) -> (RawClient, Value, Value) {
    let mut c = RawClient::open(url).await.unwrap();
    c.send_text(&format!("40/flows,{}", json!({"token": token(user, 600)})))
        .await
        .unwrap();
    let reply = c.recv_text().await.unwrap();
    let ids: Value = serde_json::from_str(reply.strip_prefix("40/flows,").unwrap()).unwrap();
    c.emit("flow:join", json!({"flowId": flow})).await.unwrap();
    c.expect_event("flow:users").await.unwrap();
    // Right after flow:users.
    let (event, locks) = c.recv_event().await.unwrap();
    assert_eq!(event, "flow:locks");
    (c, ids, locks)
}

async fn api_locks(addr: std::net::SocketAddr, flow: &str) -> Vec<Value> {
    let (s, body) = api(addr, "GET", &format!("/v1/flows/{flow}/locks"), None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn pods(locks: &[Value]) -> Vec<(String, String)> {
    locks
        .iter()
        .map(|l| {
            (
                l["podId"].as_str().unwrap().to_owned(),
                l["userId"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits up to `within` for `event`; `None` if it does not come.
async fn maybe(c: &mut RawClient, event: &str, within: Duration) -> Option<Value> {
    tokio::time::timeout(within, c.expect_event(event))
        .await
        .ok()
        .map(|r| r.unwrap())
}

#[tokio::test]
async fn twenty_concurrent_attempts_have_exactly_one_winner() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3, &[]).await;
    let (mut watcher, _, _) = joined(&ns[0].ws_url(), "watcher", "race").await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let url = ns[i % 3].ws_url();
        clients.push(joined(&url, &format!("racer{i}"), "race").await.0);
    }
    watcher.pump(Duration::from_millis(200)).await.unwrap();
    // Every attempt is on the wire before any answer is read.
    for c in &mut clients {
        c.send_text(r#"42/flows,5["pod:lock",{"podId":"hot"}]"#)
            .await
            .unwrap();
    }
    let mut winners = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let ack = loop {
            let t = c.recv_text().await.unwrap();
            if let Some(rest) = t.strip_prefix("43/flows,5") {
                break serde_json::from_str::<Value>(rest).unwrap()[0].clone();
            }
        };
        if ack == json!({"ok": true}) {
            winners.push(format!("racer{i}"));
        } else {
            assert_eq!(ack["code"], "LOCKED", "{ack}");
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let locked = watcher.expect_event("pod:locked").await.unwrap();
    assert_eq!(locked["userId"], winners[0]);
    assert!(
        maybe(&mut watcher, "pod:locked", Duration::from_millis(300))
            .await
            .is_none(),
        "exactly one pod:locked"
    );
    for n in &ns {
        assert_eq!(
            pods(&api_locks(n.addr, "race").await),
            [("hot".to_owned(), winners[0].clone())]
        );
    }
}

#[tokio::test]
async fn leaving_releases_and_joiners_on_any_node_see_the_locks() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut holder, _, locks) = joined(&ns[0].ws_url(), "holder", "fl").await;
    assert_eq!(locks, json!([]));
    let ack = holder
        .emit_ack(2, "pod:lock", json!({"podId": "p1"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let (mut other, _, locks) = joined(&ns[1].ws_url(), "other", "fl").await;
    let locks = locks.as_array().unwrap().clone();
    assert_eq!(pods(&locks), [("p1".to_owned(), "holder".to_owned())]);
    assert!(locks[0]["lockedAt"].as_str().unwrap().ends_with('Z'));
    let ack = other
        .emit_ack(3, "pod:lock", json!({"podId": "p1"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "LOCKED", "across nodes");
    let ack = other
        .emit_ack(4, "pod:unlock", json!({"podId": "p1"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "NOT_LOCK_OWNER");

    holder.emit("flow:leave", json!({})).await.unwrap();
    let u = other.expect_event("pod:unlocked").await.unwrap();
    assert_eq!(
        (u["podId"].clone(), u["userId"].clone(), u["reason"].clone()),
        (json!("p1"), json!("holder"), json!("released"))
    );
    assert!(api_locks(ns[1].addr, "fl").await.is_empty());
    let ack = other
        .emit_ack(5, "pod:lock", json!({"podId": "p1"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
}

#[tokio::test]
async fn a_lost_holder_keeps_its_locks_for_the_window_then_loses_them() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut holder, _, _) = joined(&ns[0].ws_url(), "holder", "win").await;
    let (mut other, _, _) = joined(&ns[1].ws_url(), "other", "win").await;
    holder
        .emit_ack(2, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    other.expect_event("pod:locked").await.unwrap();
    drop(holder);
    let lost = Instant::now();
    other.expect_event("user:left").await.unwrap();
    assert_eq!(api_locks(ns[1].addr, "win").await.len(), 1, "kept for now");
    let u = other.expect_event("pod:unlocked").await.unwrap();
    let took = lost.elapsed();
    assert_eq!(u["reason"], "released");
    assert!(
        took >= Duration::from_millis(WINDOW_MS - 100),
        "released after {took:?}, before the window ended"
    );
    assert!(took < Duration::from_millis(WINDOW_MS + 1500), "{took:?}");
    assert!(api_locks(ns[0].addr, "win").await.is_empty());
}

#[tokio::test]
async fn a_session_recovered_on_another_node_keeps_its_locks() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut holder, ids, _) = joined(&ns[0].ws_url(), "holder", "rec").await;
    let (mut other, _, _) = joined(&ns[1].ws_url(), "other", "rec").await;
    holder
        .emit_ack(2, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    other.expect_event("pod:locked").await.unwrap();
    drop(holder);
    other.expect_event("user:left").await.unwrap();

    let mut back = RawClient::open(&ns[1].ws_url()).await.unwrap();
    back.send_text(&format!(
        "40/flows,{}",
        json!({"token": token("holder", 600), "pid": ids["pid"]})
    ))
    .await
    .unwrap();
    // Replayed room events may come first.
    let reply = loop {
        let t = back.recv_text().await.unwrap();
        if let Some(r) = t.strip_prefix("40/flows,") {
            break r.to_owned();
        }
    };
    let again: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(again, ids, "recovered");
    other.expect_event("user:joined").await.unwrap();
    // Twice the window, answering pings: nothing is released.
    back.pump(Duration::from_millis(WINDOW_MS * 2))
        .await
        .unwrap();
    assert!(
        maybe(&mut other, "pod:unlocked", Duration::from_millis(10))
            .await
            .is_none(),
        "a recovered session keeps its locks"
    );
    assert_eq!(
        pods(&api_locks(ns[0].addr, "rec").await),
        [("p".to_owned(), "holder".to_owned())]
    );
    let ack = back
        .emit_ack(3, "pod:unlock", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    assert!(other.expect_event("pod:unlocked").await.unwrap()["reason"].is_null());
}

#[tokio::test]
async fn killing_the_holders_node_releases_within_the_user_left_bound() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let url = redis.url();
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("FLOWGATE_NODE_ID", "doomed")];
    vars.extend_from_slice(FAST);
    // A window and a holder TTL far beyond the bound: only the reaper can
    // release in time.
    vars.push(("FLOWGATE_RECOVERY_WINDOW_MS", "60000"));
    vars.push(("FLOWGATE_SESSION_TTL_MS", "60000"));
    let doomed =
        NodeProcess::start(std::path::Path::new(env!("CARGO_BIN_EXE_flowgate")), &vars).unwrap();
    let (mut watcher, _, _) = joined(&ns[0].ws_url(), "watcher", "kill").await;
    let (mut holder, _, _) = joined(&doomed.ws_url(), "victim", "kill").await;
    for (i, pod) in ["a", "b"].iter().enumerate() {
        let ack = holder
            .emit_ack(2 + i as u64, "pod:lock", json!({"podId": pod}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
    }
    watcher.pump(Duration::from_millis(200)).await.unwrap();

    let killed = Instant::now();
    doomed.signal("KILL").unwrap();
    let mut released = Vec::new();
    while released.len() < 2 {
        let u = watcher.expect_event("pod:unlocked").await.unwrap();
        assert_eq!(
            (u["userId"].clone(), u["reason"].clone()),
            (json!("victim"), json!("released"))
        );
        released.push(u["podId"].as_str().unwrap().to_owned());
    }
    released.sort();
    assert_eq!(released, ["a", "b"]);
    let bound = Duration::from_millis(1500 + 200) + Duration::from_secs(2);
    assert!(killed.elapsed() < bound, "took {:?}", killed.elapsed());
    assert!(api_locks(ns[1].addr, "kill").await.is_empty());
    drop(holder);
}

#[tokio::test]
async fn locks_come_back_after_a_redis_restart() {
    let mut redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut holder, _, _) = joined(&ns[0].ws_url(), "holder", "phoenix").await;
    let (mut other, _, _) = joined(&ns[1].ws_url(), "other", "phoenix").await;
    holder
        .emit_ack(2, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    other.expect_event("pod:locked").await.unwrap();

    redis.stop();
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        holder.pump(Duration::from_millis(100)).await.unwrap();
        let (s, body) = api(ns[1].addr, "GET", "/v1/flows/phoenix/locks", None)
            .await
            .unwrap();
        if s == 200 && body.contains("\"p\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the lock was not re-registered");
    }
    let ack = other
        .emit_ack(3, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "LOCKED", "the holder's lock is back");
}

#[tokio::test]
async fn revoking_the_holders_membership_releases_its_locks() {
    let pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .expect("postgres + pgbouncer");
    flowgate_store::migrate(&pg.direct_url()).await.unwrap();
    let redis = RedisServer::start().unwrap();
    let db = pg.bouncer_url();
    let ns = nodes(&redis, 2, &[("DATABASE_URL", &db)]).await;
    for user in ["alice", "mallory"] {
        let (s, body) = api(
            ns[0].addr,
            "PUT",
            &format!("/v1/flows/secret/members/{user}"),
            None,
        )
        .await
        .unwrap();
        assert_eq!(s, 200, "{body}");
    }
    let (mut alice, _, _) = joined(&ns[0].ws_url(), "alice", "secret").await;
    let (mut mallory, _, _) = joined(&ns[1].ws_url(), "mallory", "secret").await;
    for (i, pod) in ["m1", "m2"].iter().enumerate() {
        let ack = mallory
            .emit_ack(2 + i as u64, "pod:lock", json!({"podId": pod}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
    }
    alice.pump(Duration::from_millis(200)).await.unwrap();
    let (s, body) = api(
        ns[0].addr,
        "DELETE",
        "/v1/flows/secret/members/mallory",
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    let mut released = Vec::new();
    for _ in 0..2 {
        let u = alice.expect_event("pod:unlocked").await.unwrap();
        assert_eq!(u["reason"], "released");
        released.push(u["podId"].as_str().unwrap().to_owned());
    }
    released.sort();
    assert_eq!(released, ["m1", "m2"]);
    assert_eq!(
        mallory.expect_event("error").await.unwrap()["code"],
        "FORBIDDEN"
    );
    assert!(api_locks(ns[1].addr, "secret").await.is_empty());
    assert!(
        maybe(&mut alice, "pod:unlocked", Duration::from_millis(300))
            .await
            .is_none(),
        "each release announced once"
    );
}

#[tokio::test]
async fn two_tabs_of_one_user_on_two_nodes_share_the_lock() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut tab1, _, _) = joined(&ns[0].ws_url(), "ada", "tabs").await;
    let (mut tab2, _, _) = joined(&ns[1].ws_url(), "ada", "tabs").await;
    let (mut other, _, _) = joined(&ns[1].ws_url(), "bob", "tabs").await;
    let ack = tab1
        .emit_ack(2, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let ack = tab2
        .emit_ack(2, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}), "already held by the same user");
    other.expect_event("pod:locked").await.unwrap();

    tab1.emit("flow:leave", json!({})).await.unwrap();
    other.expect_event("user:left").await.unwrap();
    assert!(
        maybe(&mut other, "pod:unlocked", Duration::from_millis(500))
            .await
            .is_none(),
        "the other tab still holds it"
    );
    let ack = other
        .emit_ack(3, "pod:lock", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "LOCKED");
    drop(tab2);
    // Lost, not left: released once the window is over.
    let u = other.expect_event("pod:unlocked").await.unwrap();
    assert_eq!(u["reason"], "released");
    assert_eq!(
        redis.cli(&["HLEN", "{flow:tabs}:locks:holders"]).unwrap(),
        "0",
        "no holder entry is left behind"
    );
}

#[tokio::test]
async fn an_integer_pod_id_comes_back_as_an_integer_in_every_lock_event() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2, &[]).await;
    let (mut holder, _, _) = joined(&ns[0].ws_url(), "holder", "fi").await;
    let ack = holder
        .emit_ack(2, "pod:lock", json!({"podId": 7}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    // A joiner on the other node, and the API, see the integer.
    let (mut other, _, locks) = joined(&ns[1].ws_url(), "other", "fi").await;
    assert_eq!(locks[0]["podId"], json!(7), "{locks}");
    assert_eq!(api_locks(ns[1].addr, "fi").await[0]["podId"], json!(7));
    // The string "7" is another pod (as it is another key to a front end).
    let ack = other
        .emit_ack(3, "pod:lock", json!({"podId": "7"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let ack = other
        .emit_ack(4, "pod:lock", json!({"podId": 7}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "LOCKED");
    // The release announced for a holder that left carries the integer.
    holder.emit("flow:leave", json!({})).await.unwrap();
    let u = other.expect_event("pod:unlocked").await.unwrap();
    assert_eq!(
        (u["podId"].clone(), u["reason"].clone()),
        (json!(7), json!("released"))
    );
    let left = api_locks(ns[0].addr, "fi").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["podId"], json!("7"));
}
