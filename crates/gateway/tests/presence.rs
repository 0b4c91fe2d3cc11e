//! Presence on Redis without a per-session refresh: a session's liveness is
//! its node's heartbeat, so a node that stays costs Redis nothing per room;
//! and a node verifies its own entries when something says they may be
//! wrong — it was reaped while frozen, the command client reconnected after
//! Redis lost data, a leave failed while Redis was unreachable.

use std::time::{Duration, Instant};

use flowgate_test_support::chaos::ChaosProxy;
use flowgate_test_support::procs::{NodeProcess, RedisServer};
use flowgate_test_support::{http, token, RawClient, TestNode};
use serde_json::json;

/// Fast heartbeats; the lock refresh (which also drove the presence refresh
/// before) every 300 ms; the periodic verification left at its default
/// (5 minutes), so only the triggers under test can heal presence.
const FAST: &[(&str, &str)] = &[
    ("FLOWGATE_NODE_HEARTBEAT_MS", "200"),
    ("FLOWGATE_NODE_DEAD_AFTER_MS", "1500"),
    ("FLOWGATE_PRESENCE_REFRESH_MS", "300"),
    ("FLOWGATE_SESSION_TTL_MS", "3000"),
];

async fn node(url: &str, id: &str, extra: &[(&str, &str)]) -> TestNode {
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", url), ("FLOWGATE_NODE_ID", id)];
    vars.extend_from_slice(FAST);
    vars.extend_from_slice(extra);
    TestNode::start(&vars).await.expect("node starts")
}

async fn joined(ws_url: &str, user: &str, flow: &str) -> RawClient {
    let mut c = RawClient::connect(ws_url, &token(user, 600)).await.unwrap();
    c.emit("flow:join", json!({"flowId": flow})).await.unwrap();
    c.expect_event("flow:users").await.unwrap();
    c
}

/// The user ids `GET /v1/flows/{flow}/presence` lists on `n`, sorted.
async fn listed(n: &TestNode, flow: &str) -> Vec<String> {
    let mut ids: Vec<String> = n
        .presence(flow)
        .await
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Waits until `n` lists exactly `want` in `flow`.
async fn until_listed(n: &TestNode, flow: &str, want: &[&str], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = listed(n, flow).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "listed {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next `event` `c` gets, its `userId`.
async fn next_user(c: &mut RawClient, event: &str) -> String {
    let v = tokio::time::timeout(Duration::from_secs(8), c.expect_event(event))
        .await
        .unwrap_or_else(|_| panic!("no {event}"))
        .unwrap();
    v["userId"].as_str().unwrap().to_owned()
}

fn evalsha_calls(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A node holding sessions in 60 rooms and doing nothing else sends Redis
/// its heartbeat, its dead-node scan and its lock sweep — not one script
/// per room per refresh (that was 60 every 300 ms here: 400 in 2 s).
#[tokio::test]
async fn an_idle_node_costs_redis_nothing_per_room() {
    const ROOMS: usize = 60;
    let redis = RedisServer::start().unwrap();
    let n = node(&redis.url(), "idle", &[]).await;
    let mut clients = Vec::new();
    for i in 0..ROOMS {
        clients.push(joined(&n.ws_url(), &format!("u{i}"), &format!("idle-{i}")).await);
    }
    // Past the joins' own calls.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = evalsha_calls(&redis);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = evalsha_calls(&redis) - before;
    // 10 heartbeats, 10 scans, a few sweeps: well under one per room.
    assert!(
        calls < ROOMS as u64 / 2,
        "{calls} script calls in 2 s for an idle node with {ROOMS} rooms"
    );
    assert_eq!(listed(&n, "idle-7").await, ["u7"]);
    drop(clients);
}

/// A node frozen past the dead-node timeout is reaped (its peers get
/// `user:left`); when it runs again, its heartbeat finds it was not listed
/// and it re-registers its live sessions at once (`user:joined`), without
/// waiting for the periodic verification.
#[tokio::test]
async fn a_node_reaped_while_frozen_re_registers_its_sessions() {
    let redis = RedisServer::start().unwrap();
    let watcher = node(&redis.url(), "watcher", &[]).await;
    let url = redis.url();
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("FLOWGATE_NODE_ID", "frozen")];
    vars.extend_from_slice(FAST);
    let frozen =
        NodeProcess::start(std::path::Path::new(env!("CARGO_BIN_EXE_flowgate")), &vars).unwrap();
    let mut a = joined(&watcher.ws_url(), "a", "thaw").await;
    let _v = joined(&frozen.ws_url(), "v", "thaw").await;
    assert_eq!(next_user(&mut a, "user:joined").await, "v");

    frozen.signal("STOP").unwrap();
    assert_eq!(next_user(&mut a, "user:left").await, "v", "reaped");
    until_listed(&watcher, "thaw", &["a"], Duration::from_secs(2)).await;
    let thawed = Instant::now();
    frozen.signal("CONT").unwrap();
    assert_eq!(next_user(&mut a, "user:joined").await, "v", "re-registered");
    until_listed(&watcher, "thaw", &["a", "v"], Duration::from_secs(2)).await;
    assert!(
        thawed.elapsed() < Duration::from_secs(3),
        "re-registered after {:?}",
        thawed.elapsed()
    );
}

/// Redis lost a room's presence (a failover to a replica that had not got
/// the writes): the nodes' command clients reconnect, and each verifies
/// its entries then, re-registering the lost sessions.
#[tokio::test]
async fn a_reconnect_after_redis_lost_presence_re_registers_it() {
    let redis = RedisServer::start().unwrap();
    let n0 = node(&redis.url(), "n0", &[]).await;
    let n1 = node(&redis.url(), "n1", &[]).await;
    let mut a = joined(&n0.ws_url(), "a", "lossy").await;
    let _b = joined(&n1.ws_url(), "b", "lossy").await;
    assert_eq!(next_user(&mut a, "user:joined").await, "b");
    for k in ["presence", "presence:exp", "presence:owner"] {
        redis.cli(&["DEL", &format!("{{flow:lossy}}:{k}")]).unwrap();
    }
    assert!(listed(&n0, "lossy").await.is_empty());
    // Nothing heals it by itself before the next periodic verification.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(listed(&n0, "lossy").await.is_empty());
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
    until_listed(&n0, "lossy", &["a", "b"], Duration::from_secs(5)).await;
    assert_eq!(next_user(&mut a, "user:joined").await, "b");
}

/// A session that ends while its node cannot reach Redis leaves its entry
/// behind (the leave fails). When Redis is back, the node's verification
/// removes it and announces `user:left` — the peers are told, not left
/// with a ghost.
#[tokio::test]
async fn a_leave_that_failed_during_an_outage_is_completed_when_redis_is_back() {
    let redis = RedisServer::start().unwrap();
    let proxy = ChaosProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap())
        .await
        .unwrap();
    // Nobody reaps the cut node during the outage.
    let slow_death = [("FLOWGATE_NODE_DEAD_AFTER_MS", "20000")];
    let watcher = node(&redis.url(), "watcher", &slow_death).await;
    let cut = node(&proxy.redis_url(), "cut", &slow_death).await;
    let mut a = joined(&watcher.ws_url(), "a", "outage").await;
    let v = joined(&cut.ws_url(), "v", "outage").await;
    assert_eq!(next_user(&mut a, "user:joined").await, "v");

    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(cut.addr, "GET", "/health", &[], None).await.unwrap().0 != 503 {
        assert!(Instant::now() < deadline, "health did not turn 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(v);
    // The session's end tries (the unsubscribe may wait out its command
    // timeout first) and fails to reach Redis.
    let deadline = Instant::now() + Duration::from_secs(8);
    while cut.metric("flowgate_engine_errors_total{operation=\"presence\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the leave did not fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The entry is still there: its leave could not reach Redis.
    assert_eq!(listed(&watcher, "outage").await, ["a", "v"]);
    proxy.open();
    assert_eq!(next_user(&mut a, "user:left").await, "v");
    until_listed(&watcher, "outage", &["a"], Duration::from_secs(2)).await;
    // Counted before its `user:left` went out.
    assert_eq!(cut.metric("flowgate_presence_leftovers_removed_total"), 1.0);
}
