//! Several nodes, one real Redis: cross-node relay and presence, per-room
//! subscriptions, dead-node reaping, the shared limiter and Redis restarts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowgate_test_support::procs::{HaProxy, NodeProcess, RedisServer};
use flowgate_test_support::{api, http, token, RawClient, TestNode};
use serde_json::{json, Value};

const FAST: &[(&str, &str)] = &[
    ("FLOWGATE_NODE_HEARTBEAT_MS", "200"),
    ("FLOWGATE_NODE_DEAD_AFTER_MS", "1500"),
    ("FLOWGATE_PRESENCE_REFRESH_MS", "300"),
    ("FLOWGATE_SESSION_TTL_MS", "3000"),
];

async fn nodes(redis: &RedisServer, n: usize) -> Vec<TestNode> {
    nodes_with(redis, n, &[]).await
}

async fn joined(n: &TestNode, user: &str, flow: &str) -> (RawClient, Vec<Value>) {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    c.emit("flow:join", json!({"flowId": flow, "userName": user}))
        .await
        .unwrap();
    let users = c.expect_event("flow:users").await.unwrap();
    (c, users.as_array().unwrap().clone())
}

/// Sends `pod:move` of `pod` to `x` with ack `id`; panics unless it is
/// acknowledged `{ok: true}` (`what` names the event in the message).
async fn move_pod(c: &mut RawClient, id: u64, pod: &str, x: i64, what: &str) {
    let ack = c
        .emit_ack(
            id,
            "pod:move",
            json!({"podId": pod, "position": {"x": x, "y": 0}}),
        )
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}), "{what}");
}

fn user_ids(users: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = users
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

async fn presence(n: &TestNode, flow: &str) -> Vec<Value> {
    n.presence(flow).await
}

#[tokio::test]
async fn clients_on_three_nodes_see_each_other() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let (mut a, users) = joined(&ns[0], "alice", "f1").await;
    assert_eq!(user_ids(&users), ["alice"]);
    let (mut b, users) = joined(&ns[1], "bob", "f1").await;
    assert_eq!(user_ids(&users), ["alice", "bob"]);
    assert_eq!(
        a.expect_event("user:joined").await.unwrap()["userId"],
        "bob"
    );
    let (mut c, users) = joined(&ns[2], "carol", "f1").await;
    assert_eq!(user_ids(&users), ["alice", "bob", "carol"]);
    assert_eq!(
        a.expect_event("user:joined").await.unwrap()["userId"],
        "carol"
    );
    assert_eq!(
        b.expect_event("user:joined").await.unwrap()["userId"],
        "carol"
    );

    let ack = c
        .emit_ack(
            7,
            "pod:move",
            json!({"podId": "p", "position": {"x": 3, "y": 4}}),
        )
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    for r in [&mut a, &mut b] {
        let moved = r.expect_event("pod:moved").await.unwrap();
        assert_eq!(
            moved,
            json!({"podId": "p", "position": {"x": 3, "y": 4}, "userId": "carol"})
        );
    }

    // The server API on any node reaches members on every node.
    let (s, body) = api(
        ns[1].addr,
        "POST",
        "/v1/flows/f1/events",
        Some(r#"{"event":"execution:started","data":{"run":1}}"#),
    )
    .await
    .unwrap();
    assert_eq!(s, 202, "{body}");
    for r in [&mut a, &mut b, &mut c] {
        assert_eq!(
            r.expect_event("execution:started").await.unwrap(),
            json!({"run": 1})
        );
    }

    b.emit("flow:leave", json!({})).await.unwrap();
    for r in [&mut a, &mut c] {
        assert_eq!(r.expect_event("user:left").await.unwrap()["userId"], "bob");
    }
    assert_eq!(user_ids(&presence(&ns[0], "f1").await), ["alice", "carol"]);
}

#[tokio::test]
async fn a_room_spread_over_nodes_gets_each_event_once_in_order() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let (mut sender, _) = joined(&ns[0], "s", "order").await;
    let mut receivers = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        receivers.push(joined(n, &format!("r{i}"), "order").await.0);
    }
    // Let the joins' user:joined settle, then count only pod:moved.
    for r in &mut receivers {
        r.pump(Duration::from_millis(200)).await.unwrap();
    }
    for i in 0..15 {
        let ack = sender
            .emit_ack(
                100 + i,
                "pod:move",
                json!({"podId": "p", "position": {"x": i, "y": 0}}),
            )
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}), "event {i}");
    }
    for r in &mut receivers {
        let mut seen = Vec::new();
        while let Ok(Ok(v)) =
            tokio::time::timeout(Duration::from_millis(500), r.expect_event("pod:moved")).await
        {
            seen.push(v["position"]["x"].as_i64().unwrap());
        }
        assert_eq!(seen, (0..15).collect::<Vec<_>>(), "exactly once, in order");
    }
}

/// A rolling upgrade from the first releases: a node still publishing the
/// JSON bus format and one publishing the binary format understand each
/// other; a message of an unknown format is skipped and counted, and the
/// room goes on.
#[tokio::test]
async fn json_and_binary_bus_formats_mix_and_unknown_ones_are_refused() {
    let redis = RedisServer::start().unwrap();
    let old = nodes_with(&redis, 1, &[("FLOWGATE_BUS_FORMAT", "json")]).await;
    let url = redis.url();
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("FLOWGATE_NODE_ID", "new")];
    vars.extend_from_slice(FAST);
    let new = TestNode::start(&vars).await.unwrap();
    let (mut a, _) = joined(&old[0], "a", "mixed").await;
    let (b, _) = joined(&new, "b", "mixed").await;
    a.expect_event("user:joined").await.unwrap();
    redis
        .cli(&["SPUBLISH", "{flow:mixed}:bus", "FG2 a later format"])
        .unwrap();
    // One way, then the other (a client waiting for its ack skips events).
    let mut clients = [a, b];
    for (from, base) in [(0, 10), (1, 20)] {
        let [x, y] = &mut clients;
        let (from, to) = if from == 0 { (x, y) } else { (y, x) };
        for i in 0..3 {
            let p = json!({"podId": "p", "position": {"x": i, "y": 0}});
            let ack = from.emit_ack(base + i, "pod:move", p).await.unwrap();
            assert_eq!(ack, json!({"ok": true}));
        }
        let mut seen = Vec::new();
        while let Ok(Ok(v)) =
            tokio::time::timeout(Duration::from_millis(500), to.expect_event("pod:moved")).await
        {
            seen.push(v["position"]["x"].as_i64().unwrap());
        }
        assert_eq!(
            seen,
            [0, 1, 2],
            "each of the other's events, once, in order"
        );
    }
    for n in [&old[0], &new] {
        assert_eq!(n.metric("flowgate_bus_undecodable_total"), 1.0);
    }
}

#[tokio::test]
async fn only_nodes_with_members_are_subscribed() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let (mut a, _) = joined(&ns[0], "a", "quiet").await;
    let (_b, _) = joined(&ns[1], "b", "quiet").await;
    let shard = |r: &RedisServer| {
        r.cli(&["PUBSUB", "SHARDNUMSUB", "{flow:quiet}:bus"])
            .unwrap()
    };
    assert!(shard(&redis).ends_with('2'), "{}", shard(&redis));
    for i in 0..10 {
        a.emit_ack(i + 1, "pod:delete", json!({"podId": format!("p{i}")}))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ns[1].metric("flowgate_bus_messages_total") >= 10.0);
    assert_eq!(
        ns[2].metric("flowgate_bus_messages_total"),
        0.0,
        "node2 has no member"
    );

    // The last local member leaving unsubscribes its node.
    a.emit("flow:leave", json!({})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !shard(&redis).ends_with('1') {
        assert!(Instant::now() < deadline, "{}", shard(&redis));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn nodes_with(redis: &RedisServer, n: usize, extra: &[(&str, &str)]) -> Vec<TestNode> {
    TestNode::start_redis_nodes(&redis.url(), "node", n, &[FAST, extra].concat())
        .await
        .expect("nodes start")
}

/// `greedy` floods through every node, `other` through the first only, for
/// `secs`; returns what each got accepted and the time it took.
async fn flood(ns: &[TestNode], secs: f64) -> (HashMap<&'static str, u32>, f64) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        for user in ["greedy", "other"] {
            if user == "other" && i > 0 {
                continue;
            }
            let url = n.ws_url();
            tasks.push(tokio::spawn(async move {
                let mut c = RawClient::connect(&url, &token(user, 600)).await.unwrap();
                let (mut ok, mut id) = (0u32, 0u64);
                while started.elapsed().as_secs_f64() < secs {
                    id += 1;
                    // Unknown to the relay table, so it is refused after
                    // the budget check; what matters is which code.
                    let ack = c.emit_ack(id, "flow:leave", json!({})).await.unwrap();
                    if ack["code"] != "RATE_LIMIT" {
                        ok += 1;
                    }
                }
                (user, ok)
            }));
        }
    }
    let mut accepted: HashMap<&str, u32> = HashMap::new();
    for t in tasks {
        let (user, ok) = t.await.unwrap();
        *accepted.entry(user).or_default() += ok;
    }
    (accepted, started.elapsed().as_secs_f64())
}

#[tokio::test]
async fn one_user_shares_one_budget_across_nodes() {
    // Lease 1: one Redis call per event, the budget exact.
    let redis = RedisServer::start().unwrap();
    let ns = nodes_with(&redis, 3, &[("FLOWGATE_RATE_LIMIT_LEASE", "1")]).await;
    let (accepted, elapsed) = flood(&ns, 3.0).await;
    // Burst of 20, then 20/s, ±1/s.
    let expected = 20.0 + 20.0 * elapsed;
    let greedy = f64::from(accepted["greedy"]);
    assert!(
        (greedy - expected).abs() <= elapsed + 1.0,
        "greedy accepted {greedy} in {elapsed:.2}s, expected {expected:.0}±{elapsed:.0}"
    );
    // A different user has a budget of its own.
    assert!(
        f64::from(accepted["other"]) >= expected - elapsed - 1.0,
        "{accepted:?}"
    );
}

/// The bound the limiter's docs and the README state: with leases of L
/// tokens, a user sending through n nodes gets at most n·(L − 1) events
/// more than the shared budget, and at most n·(L − 1) fewer.
#[tokio::test]
async fn leased_budget_stays_within_its_stated_bound() {
    let redis = RedisServer::start().unwrap();
    let lease = 5.0;
    let ns = nodes_with(&redis, 3, &[("FLOWGATE_RATE_LIMIT_LEASE", "5")]).await;
    let (accepted, elapsed) = flood(&ns, 3.0).await;
    let n = ns.len() as f64;
    let expected = 20.0 + 20.0 * elapsed;
    let slack = n * (lease - 1.0) + elapsed + 1.0;
    let greedy = f64::from(accepted["greedy"]);
    assert!(
        (greedy - expected).abs() <= slack,
        "greedy accepted {greedy} in {elapsed:.2}s, expected {expected:.0}±{slack:.0}"
    );
    // On one node, the local filter keeps it exact.
    let other = f64::from(accepted["other"]);
    assert!(
        other <= expected + elapsed + 1.0 && other >= expected - lease - elapsed - 1.0,
        "other accepted {other} in {elapsed:.2}s, expected {expected:.0}"
    );
    // And the point of it: a user within its budget costs one Redis call
    // per lease, not per event.
    let before = ns[1].metric("flowgate_limiter_redis_calls_total");
    let mut c = RawClient::connect(&ns[1].ws_url(), &token("paced", 600))
        .await
        .unwrap();
    let mut accepted = 0;
    for id in 1..=30u64 {
        let ack = c.emit_ack(id, "flow:leave", json!({})).await.unwrap();
        if ack["code"] != "RATE_LIMIT" {
            accepted += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted, 30, "10/s is within the budget");
    let calls = ns[1].metric("flowgate_limiter_redis_calls_total") - before;
    assert!(
        (1.0..=30.0 / lease + 2.0).contains(&calls),
        "{calls} Redis calls for 30 events with leases of {lease}"
    );
}

#[tokio::test]
async fn relay_and_presence_recover_after_a_redis_restart() {
    let mut redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2).await;
    let (mut a, _) = joined(&ns[0], "a", "phoenix").await;
    let (mut b, _) = joined(&ns[1], "b", "phoenix").await;
    a.expect_event("user:joined").await.unwrap();

    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, _) = http(ns[0].addr, "GET", "/health", &[], None).await.unwrap();
        if s == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "health did not turn 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refused, not lost: the sender is told. More events than a lease
    // holds, so the limiter has to decide without Redis at least once.
    for id in 1..=6 {
        let ack = a
            .emit_ack(id, "pod:delete", json!({"podId": "x"}))
            .await
            .unwrap();
        assert_eq!(ack["ok"], false);
    }
    assert!(ns[0].metric("flowgate_redis_outages_total") >= 1.0);
    // A join is refused the same way: the contract's UNAVAILABLE (a
    // dependency is down, retry), not a generic JOIN_ERROR.
    let mut late = RawClient::connect(&ns[0].ws_url(), &token("late", 600))
        .await
        .unwrap();
    let ack = late
        .emit_ack(1, "flow:join", json!({"flowId": "phoenix"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "UNAVAILABLE", "{ack}");
    // The limiter fell back to the per-node budget, and said so.
    assert!(ns[0].metric("flowgate_limiter_fallback_total") >= 1.0);
    assert_eq!(ns[0].metric("flowgate_redis_up"), 0.0);

    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok0 = http(ns[0].addr, "GET", "/health", &[], None)
            .await
            .unwrap()
            .0
            == 200;
        let ok1 = http(ns[1].addr, "GET", "/health", &[], None)
            .await
            .unwrap()
            .0
            == 200;
        if ok0 && ok1 && presence(&ns[0], "phoenix").await.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Subscriptions are back: relay across nodes works again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut id = 10;
    loop {
        id += 1;
        let ack = a
            .emit_ack(id, "pod:delete", json!({"podId": format!("y{id}")}))
            .await
            .unwrap();
        if ack["ok"] == true {
            if let Ok(Ok(v)) =
                tokio::time::timeout(Duration::from_millis(500), b.expect_event("pod:deleted"))
                    .await
            {
                assert_eq!(v["podId"], format!("y{id}"));
                break;
            }
        }
        assert!(Instant::now() < deadline, "relay did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis outage longer than the dead-node bound, with the data kept (a
/// failover to a replica, a restart from a snapshot): every node's
/// heartbeat is stale when Redis comes back, yet every node is alive. No
/// node may reap another: nobody gets `user:left`.
#[tokio::test]
async fn nodes_back_from_a_long_outage_do_not_reap_each_other() {
    let mut redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2).await;
    let (mut a, _) = joined(&ns[0], "a", "phoenix").await;
    let (mut b, _) = joined(&ns[1], "b", "phoenix").await;
    a.expect_event("user:joined").await.unwrap();
    redis.cli(&["SAVE"]).unwrap();
    redis.stop();
    // Longer than FLOWGATE_NODE_DEAD_AFTER_MS (1.5 s) and a beat.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &ns {
        while http(n.addr, "GET", "/health", &[], None).await.unwrap().0 != 200 {
            assert!(Instant::now() < deadline, "nodes did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Well past the moment a node would have reaped the other.
    for c in [&mut a, &mut b] {
        let left = tokio::time::timeout(Duration::from_secs(3), c.expect_event("user:left")).await;
        assert!(left.is_err(), "a live peer was announced gone: {left:?}");
    }
    assert_eq!(presence(&ns[0], "phoenix").await.len(), 2);
    assert_eq!(ns[0].metric("flowgate_presence_reaped_sessions_total"), 0.0);
    assert_eq!(ns[1].metric("flowgate_presence_reaped_sessions_total"), 0.0);
}

/// A node in its own process (so it can be killed), named `doomed`.
fn doomed_node(redis: &RedisServer) -> NodeProcess {
    let url = redis.url();
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("FLOWGATE_NODE_ID", "doomed")];
    vars.extend_from_slice(FAST);
    NodeProcess::start(std::path::Path::new(env!("CARGO_BIN_EXE_flowgate")), &vars).unwrap()
}

#[tokio::test]
async fn a_killed_node_leaves_no_ghosts() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2).await;
    let doomed = doomed_node(&redis);

    let (mut a, _) = joined(&ns[0], "a", "ghosts").await;
    let (mut b, _) = joined(&ns[1], "b", "ghosts").await;
    let mut victims = Vec::new();
    for i in 0..3 {
        let (c, _) = joined_url(&doomed.ws_url(), &format!("v{i}"), "ghosts").await;
        victims.push(c);
    }
    assert_eq!(presence(&ns[0], "ghosts").await.len(), 5);
    a.pump(Duration::from_millis(100)).await.unwrap();
    b.pump(Duration::from_millis(100)).await.unwrap();

    let killed = Instant::now();
    doomed.signal("KILL").unwrap();
    for r in [&mut a, &mut b] {
        let mut left = Vec::new();
        while left.len() < 3 {
            let v = r.expect_event("user:left").await.unwrap();
            left.push(v["userId"].as_str().unwrap().to_owned());
        }
        left.sort();
        assert_eq!(left, ["v0", "v1", "v2"], "each dead session announced once");
    }
    let bound = Duration::from_millis(1500 + 200) + Duration::from_secs(2);
    assert!(
        killed.elapsed() < bound,
        "user:left took {:?}",
        killed.elapsed()
    );
    assert_eq!(user_ids(&presence(&ns[1], "ghosts").await), ["a", "b"]);
    let reaped: f64 = ns
        .iter()
        .map(|n| n.metric("flowgate_presence_reaped_sessions_total"))
        .sum();
    assert_eq!(reaped, 3.0, "{}", ns[0].app.metrics.render());
    drop(victims);
}

async fn joined_url(url: &str, user: &str, flow: &str) -> (RawClient, Value) {
    let mut c = RawClient::connect(url, &token(user, 600)).await.unwrap();
    c.emit("flow:join", json!({"flowId": flow})).await.unwrap();
    let users = c.expect_event("flow:users").await.unwrap();
    (c, users)
}

#[tokio::test]
async fn clients_through_haproxy_reach_every_node() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let lb = HaProxy::start([ns[0].addr.port(), ns[1].addr.port(), ns[2].addr.port()]).unwrap();
    let mut clients = Vec::new();
    for i in 0..6 {
        let (c, users) = joined_url(&lb.ws_url(), &format!("lb{i}"), "balanced").await;
        assert_eq!(
            users.as_array().unwrap().len(),
            i + 1,
            "flow:users spans every node"
        );
        clients.push(c);
    }
    let spread = ns
        .iter()
        .filter(|n| n.metric("flowgate_connections") > 0.0)
        .count();
    assert!(spread >= 2, "leastconn spreads connections over the nodes");
    let (mut direct, _) = joined(&ns[0], "direct", "balanced").await;
    direct.pump(Duration::from_millis(100)).await.unwrap();
    clients[5]
        .emit_ack(1, "edge:create", json!({"edge": {"id": "e1"}}))
        .await
        .unwrap();
    assert_eq!(
        direct.expect_event("edge:created").await.unwrap()["edge"]["id"],
        "e1"
    );
}

#[tokio::test]
async fn expired_sessions_are_hidden_and_swept() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 1).await;
    let (_a, _) = joined(&ns[0], "alive", "sweep").await;
    // A session whose leave never reached Redis: its expiry is in the past.
    let ghost = r#"{"userId":"ghost","socketId":"g1","flowId":"sweep","userName":"g","userColor":"c","joinedAt":"t"}"#;
    redis
        .cli(&["HSET", "{flow:sweep}:presence", "g1", ghost])
        .unwrap();
    redis
        .cli(&["ZADD", "{flow:sweep}:presence:exp", "1", "g1"])
        .unwrap();
    assert_eq!(user_ids(&presence(&ns[0], "sweep").await), ["alive"]);
    assert_eq!(redis.cli(&["HLEN", "{flow:sweep}:presence"]).unwrap(), "1");
    assert_eq!(
        redis.cli(&["ZCARD", "{flow:sweep}:presence:exp"]).unwrap(),
        "1"
    );
}

fn commandstat(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Events published at the same time from many sessions of one node go to
/// Redis in batches (fewer script calls than events), and batching changes
/// nothing a client sees: each event has its own log entry, every member
/// gets every acknowledged event once, and each sender's events arrive in
/// the order it sent them, volatile cursors (in the same batches, never
/// logged) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_go_in_batches_each_with_its_own_offset_in_order() {
    const SENDERS: usize = 8;
    const EVENTS: i64 = 30;
    let redis = RedisServer::start().unwrap();
    let ns = nodes_with(
        &redis,
        1,
        &[
            ("FLOWGATE_RATE_LIMIT_PER_SEC", "10000"),
            ("FLOWGATE_RATE_LIMIT_BURST", "10000"),
        ],
    )
    .await;
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for flow in ["batch-a", "batch-b"] {
        receivers.push((flow, joined(&ns[0], &format!("{flow}-r"), flow).await.0));
        for k in 0..SENDERS {
            senders.push((
                flow,
                k,
                joined(&ns[0], &format!("{flow}-s{k}"), flow).await.0,
            ));
        }
    }
    for (_, r) in &mut receivers {
        r.pump(Duration::from_millis(300)).await.unwrap();
    }
    let (xadd0, evalsha0) = (commandstat(&redis, "xadd"), commandstat(&redis, "evalsha"));
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|(flow, k, mut c)| {
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    let what = format!("{flow} s{k} event {i}");
                    move_pod(&mut c, i as u64 + 1, &format!("s{k}"), i, &what).await;
                    if i % 5 == 0 {
                        let ack = c
                            .emit_ack(
                                1000 + i as u64,
                                "cursor:move",
                                json!({"position": {"x": i, "y": k}}),
                            )
                            .await
                            .unwrap();
                        assert_eq!(ack, json!({"ok": true}), "{flow} s{k} cursor {i}");
                    }
                }
                c
            })
        })
        .collect();
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.unwrap());
    }
    let xadds = commandstat(&redis, "xadd") - xadd0;
    let scripts = commandstat(&redis, "evalsha") - evalsha0;
    let events = 2 * SENDERS as u64 * EVENTS as u64;
    assert_eq!(xadds, events, "one log entry per event");
    // Every script call counts: publishes, limiter leases, refreshes.
    assert!(
        scripts < events,
        "{scripts} script calls for {events} events: not batched"
    );
    for (flow, r) in &mut receivers {
        let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
        let mut cursors: HashMap<String, Vec<i64>> = HashMap::new();
        while let Ok(Ok((name, v))) =
            tokio::time::timeout(Duration::from_millis(800), r.recv_event()).await
        {
            let x = v["position"]["x"].as_i64().unwrap_or(-1);
            match name.as_str() {
                "pod:moved" => seen.entry(v["podId"].as_str().unwrap().to_owned()),
                "cursor:updated" => cursors.entry(v["userId"].as_str().unwrap().to_owned()),
                _ => continue,
            }
            .or_default()
            .push(x);
        }
        assert_eq!(seen.len(), SENDERS, "{flow}: every sender heard");
        for (sender, xs) in &seen {
            assert_eq!(
                xs,
                &(0..EVENTS).collect::<Vec<_>>(),
                "{flow} {sender}: once, in order"
            );
        }
        assert_eq!(cursors.len(), SENDERS, "{flow}: every sender's cursor");
        let sent: Vec<i64> = (0..EVENTS).step_by(5).collect();
        for (sender, xs) in &cursors {
            assert_eq!(xs, &sent, "{flow} {sender}: cursors once, in order");
        }
        let len: u64 = redis
            .cli(&["xlen", &format!("{{flow:{flow}}}:log")])
            .unwrap()
            .parse()
            .unwrap();
        // Its moves and the user:joined of its receiver and senders.
        let logged = SENDERS as u64 * EVENTS as u64 + SENDERS as u64 + 1;
        assert_eq!(len, logged, "{flow}: an entry of its own for each event");
    }
    eprintln!("{events} events in {scripts} script calls");
}

/// The publish linger (`FLOWGATE_PUBLISH_LINGER_US`): a node sends at most
/// one publish call per linger, so concurrent events go together even when
/// Redis answers at once; every event keeps its own offset and order. A
/// node that was quiet for a linger sends its next event at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sends_at_most_one_publish_call_per_linger_and_a_quiet_one_at_once() {
    const SENDERS: usize = 6;
    const EVENTS: i64 = 10;
    const LINGER_MS: u64 = 100;
    let redis = RedisServer::start().unwrap();
    let ns = nodes_with(
        &redis,
        1,
        &[
            ("FLOWGATE_RATE_LIMIT_PER_SEC", "10000"),
            ("FLOWGATE_RATE_LIMIT_BURST", "10000"),
            ("FLOWGATE_PUBLISH_LINGER_US", "100000"),
        ],
    )
    .await;
    let flow = "linger";
    let (mut r, _) = joined(&ns[0], "linger-r", flow).await;
    let mut senders = Vec::new();
    for k in 0..SENDERS {
        senders.push(joined(&ns[0], &format!("linger-s{k}"), flow).await.0);
    }
    r.pump(Duration::from_millis(300)).await.unwrap();

    // Quiet for more than a linger: the next event is not held back.
    tokio::time::sleep(Duration::from_millis(2 * LINGER_MS)).await;
    let t = Instant::now();
    move_pod(&mut senders[0], 1, "quiet", 0, "quiet event").await;
    let quiet = t.elapsed();
    assert!(
        quiet < Duration::from_millis(LINGER_MS),
        "a quiet node held its event back for {quiet:?}"
    );

    // One sender waiting for each ack: its next event comes within the
    // linger of the last call, so it waits for the linger to end.
    let calls0 = ns[0].metric("flowgate_bus_publish_calls_total");
    let t = Instant::now();
    for i in 1..=4 {
        move_pod(&mut senders[0], 1 + i as u64, "quiet", i, "lone sender").await;
    }
    let (sequential, calls) = (
        t.elapsed(),
        ns[0].metric("flowgate_bus_publish_calls_total") - calls0,
    );
    assert_eq!(calls, 4.0, "one call per event of a lone sender");
    assert!(
        sequential >= Duration::from_millis(3 * LINGER_MS),
        "4 calls in {sequential:?}: closer together than the linger"
    );

    let calls0 = ns[0].metric("flowgate_bus_publish_calls_total");
    let events0 = ns[0].metric("flowgate_bus_published_events_total");
    let started = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    let what = format!("s{k} event {i}");
                    move_pod(&mut c, 10 + i as u64, &format!("s{k}"), i, &what).await;
                }
                c
            })
        })
        .collect();
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let calls = ns[0].metric("flowgate_bus_publish_calls_total") - calls0;
    let events = ns[0].metric("flowgate_bus_published_events_total") - events0;
    assert_eq!(
        events,
        (SENDERS as i64 * EVENTS) as f64,
        "every event published"
    );
    // One call at once, then at most one per linger (and one more for the
    // linger under way when the senders stopped).
    let bound = (elapsed.as_millis() as f64 / LINGER_MS as f64).floor() + 2.0;
    assert!(
        calls <= bound,
        "{calls} publish calls in {elapsed:?}: more than one per {LINGER_MS} ms linger"
    );
    assert!(
        events / calls >= 2.0,
        "{events} events in {calls} calls: not batched"
    );
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    while let Ok(Ok((name, v))) =
        tokio::time::timeout(Duration::from_millis(800), r.recv_event()).await
    {
        if name == "pod:moved" {
            seen.entry(v["podId"].as_str().unwrap().to_owned())
                .or_default()
                .push(v["position"]["x"].as_i64().unwrap());
        }
    }
    assert_eq!(seen.remove("quiet"), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(seen.len(), SENDERS, "every sender heard");
    for (sender, xs) in &seen {
        assert_eq!(
            xs,
            &(0..EVENTS).collect::<Vec<_>>(),
            "{sender}: once, in order"
        );
    }
    // Each event its own log entry: the receiver's and senders' joins,
    // the quiet event and the moves.
    let len: u64 = redis
        .cli(&["xlen", &format!("{{flow:{flow}}}:log")])
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, 1 + SENDERS as u64 + 5 + SENDERS as u64 * EVENTS as u64);
    eprintln!("{events} events in {calls} calls over {elapsed:?}");
}

/// A session whose node was killed, and whose presence the reaper removed
/// (peers were told `user:left`), recovers on another node: its replay
/// does not tell it that it left, and the peers are told it is back.
#[tokio::test]
async fn a_session_recovered_after_its_dead_node_was_reaped_is_not_told_it_left() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 1).await;
    let doomed = doomed_node(&redis);

    let (mut peer, _) = joined(&ns[0], "peer", "reaped").await;
    let mut v = RawClient::open(&doomed.ws_url()).await.unwrap();
    v.send_text(&format!("40/flows,{}", json!({"token": token("v", 600)})))
        .await
        .unwrap();
    let reply: Value = serde_json::from_str(
        v.recv_text()
            .await
            .unwrap()
            .strip_prefix("40/flows,")
            .unwrap(),
    )
    .unwrap();
    v.emit("flow:join", json!({"flowId": "reaped"}))
        .await
        .unwrap();
    v.expect_event("flow:users").await.unwrap();
    peer.expect_event("user:joined").await.unwrap();

    doomed.signal("KILL").unwrap();
    let left = peer.expect_event("user:left").await.unwrap();
    assert_eq!(left["socketId"], reply["sid"]);
    drop(v);

    let mut back = RawClient::open(&ns[0].ws_url()).await.unwrap();
    back.send_text(&format!(
        "40/flows,{}",
        json!({"token": token("v", 600), "pid": reply["pid"]})
    ))
    .await
    .unwrap();
    let mut frames = Vec::new();
    while let Ok(Ok(t)) = tokio::time::timeout(Duration::from_millis(700), back.recv_text()).await {
        frames.push(t);
    }
    let again: Value = serde_json::from_str(
        frames[0]
            .strip_prefix("40/flows,")
            .expect("the CONNECT reply first"),
    )
    .unwrap();
    assert_eq!(again, reply, "recovered");
    assert!(
        !frames.iter().any(|f| f.contains("user:left")),
        "told it left: {frames:?}"
    );
    let joined = peer.expect_event("user:joined").await.unwrap();
    assert_eq!(joined["socketId"], reply["sid"]);
}
