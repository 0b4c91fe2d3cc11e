//! Redis high availability with real processes: the cross-node behaviour
//! (relay, presence, order, the server API) on a six-node Redis Cluster
//! with rooms on every shard; persisted events queued on every master (the
//! event-log queue's shards) and all written to a real Postgres; the
//! master of a busy room's slot killed and replaced by its replica while
//! events flow; the same failover behind Sentinel; a TLS-only cluster
//! (client links, replication and cluster bus) reached with
//! `rediss-cluster://`. No node is restarted:
//! relay, presence and `/health` come back by themselves, and every
//! acknowledged event reaches every member once, in order.

use std::time::{Duration, Instant};

use flowgate_test_support::procs::PgStack;
use flowgate_test_support::redis_cluster::RedisCluster;
use flowgate_test_support::sentinel::SentinelSetup;
use flowgate_test_support::tls::TestCerts;
use flowgate_test_support::{api, http, token, RawClient, TestNode};
use serde_json::{json, Value};

/// Timings short enough for a test, with a dead-node bound longer than a
/// failover: every node stalls on Redis while it lasts, and none may
/// declare the others dead for it.
const TIMINGS: &[(&str, &str)] = &[
    ("FLOWGATE_NODE_HEARTBEAT_MS", "500"),
    ("FLOWGATE_NODE_DEAD_AFTER_MS", "8000"),
    ("FLOWGATE_PRESENCE_REFRESH_MS", "500"),
    ("FLOWGATE_SESSION_TTL_MS", "8000"),
    ("FLOWGATE_REDIS_TIMEOUT_MS", "1000"),
    ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
    ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
];

async fn nodes(url: &str, n: usize) -> Vec<TestNode> {
    nodes_with(url, n, &[]).await
}

async fn nodes_with(url: &str, n: usize, extra: &[(&str, &str)]) -> Vec<TestNode> {
    TestNode::start_redis_nodes(url, "ha", n, &[TIMINGS, extra].concat())
        .await
        .expect("nodes start")
}

async fn joined(n: &TestNode, user: &str, flow: &str) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    c.emit("flow:join", json!({"flowId": flow, "userName": user}))
        .await
        .unwrap();
    c.expect_event("flow:users").await.unwrap();
    c
}

async fn presence(n: &TestNode, flow: &str) -> Option<Vec<String>> {
    let path = format!("/v1/flows/{flow}/presence");
    let (s, body) = api(n.addr, "GET", &path, None).await.ok()?;
    if s != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    let mut ids: Vec<String> = v
        .as_array()?
        .iter()
        .filter_map(|u| u["userId"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Some(ids)
}

async fn health(n: &TestNode) -> u16 {
    http(n.addr, "GET", "/health", &[], None)
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// Sends `pod:move` x = 0..n, each acknowledged `{ok: true}`.
async fn moves_acked(c: &mut RawClient, n: i64, flow: &str) {
    for x in 0..n {
        let ack = c
            .emit_ack(
                x as u64,
                "pod:move",
                json!({"podId": "p", "position": {"x": x, "y": 0}}),
            )
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}), "{flow} move {x}");
    }
}

/// Every `pod:moved` x a client receives until it sees `last`.
async fn moves_until(c: &mut RawClient, last: i64) -> Vec<i64> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.last() != Some(&last) {
        match tokio::time::timeout_at(end, c.recv_event()).await {
            Ok(Ok((name, data))) if name == "pod:moved" => {
                got.push(data["position"]["x"].as_i64().unwrap_or(-1))
            }
            Ok(Ok(_)) => {}
            // Quiet for a while (a failover), or a frame of another kind.
            Ok(Err(e))
                if e.to_string().contains("no frame")
                    || e.to_string().contains("not a /flows event") => {}
            other => panic!("receiver stopped after {got:?}: {other:?}"),
        }
    }
    got
}

/// Flows whose rooms land on three different cluster masters.
fn flows_on_every_shard(cluster: &RedisCluster) -> Vec<String> {
    let mut by_master = std::collections::BTreeMap::new();
    for i in 0..200 {
        let flow = format!("spread{i}");
        let master = cluster.master_of(&format!("{{flow:{flow}}}")).unwrap();
        by_master.entry(master).or_insert(flow);
    }
    assert_eq!(by_master.len(), 3, "three masters serve the rooms");
    by_master.into_values().collect()
}

#[tokio::test]
async fn rooms_on_every_shard_relay_across_nodes() {
    let cluster = RedisCluster::start().unwrap();
    let ns = nodes(&cluster.url(), 3).await;
    for flow in flows_on_every_shard(&cluster) {
        let mut a = joined(&ns[0], "alice", &flow).await;
        let mut b = joined(&ns[1], "bob", &flow).await;
        assert_eq!(
            a.expect_event("user:joined").await.unwrap()["userId"],
            "bob"
        );
        let mut c = joined(&ns[2], "carol", &flow).await;
        for r in [&mut a, &mut b] {
            assert_eq!(
                r.expect_event("user:joined").await.unwrap()["userId"],
                "carol"
            );
        }
        // Order across nodes: the room's stream and its shard channel
        // live on one master, written by one script.
        moves_acked(&mut c, 20, &flow).await;
        for r in [&mut a, &mut b] {
            assert_eq!(
                moves_until(r, 19).await,
                (0..20).collect::<Vec<_>>(),
                "{flow}"
            );
        }
        // The server API on any node reaches members on every node.
        let (s, body) = api(
            ns[1].addr,
            "POST",
            &format!("/v1/flows/{flow}/events"),
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
        assert_eq!(
            presence(&ns[0], &flow).await.unwrap(),
            ["alice", "bob", "carol"]
        );
        b.emit("flow:leave", json!({})).await.unwrap();
        for r in [&mut a, &mut c] {
            assert_eq!(r.expect_event("user:left").await.unwrap()["userId"], "bob");
        }
    }
    for n in &ns {
        assert_eq!(health(n).await, 200);
    }
}

#[tokio::test]
async fn a_tls_cluster_relays_on_every_shard_and_an_untrusted_one_refuses_to_start() {
    let certs = TestCerts::generate().unwrap();
    let cluster = RedisCluster::start_tls(&certs).unwrap();
    let url = cluster.url();
    assert!(url.starts_with("rediss-cluster://"), "{url}");
    // The cluster has no plaintext port: a node that works at all, on
    // every shard (each a separate TLS connection), has encrypted.
    let ca = certs.ca().display().to_string();
    let ns = nodes_with(&url, 2, &[("FLOWGATE_REDIS_CA_FILE", &ca)]).await;
    for flow in flows_on_every_shard(&cluster) {
        let mut a = joined(&ns[0], "alice", &flow).await;
        let mut b = joined(&ns[1], "bob", &flow).await;
        assert_eq!(
            a.expect_event("user:joined").await.unwrap()["userId"],
            "bob"
        );
        moves_acked(&mut b, 5, &flow).await;
        assert_eq!(moves_until(&mut a, 4).await, (0..5).collect::<Vec<_>>());
        assert_eq!(presence(&ns[1], &flow).await.unwrap(), ["alice", "bob"]);
    }
    for n in &ns {
        assert_eq!(health(n).await, 200);
    }
    // A CA that did not sign the cluster's certificates: no silent
    // downgrade, no degraded start, a start-up error.
    let other = TestCerts::generate().unwrap();
    let wrong_ca = other.ca().display().to_string();
    let e = TestNode::start(&[("REDIS_URL", &url), ("FLOWGATE_REDIS_CA_FILE", &wrong_ca)])
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("TLS handshake") && text.contains("certificate"),
        "{text}"
    );
}

/// The event-log queue stream of a flow's shard among the default 16
/// (FNV-1a of the flow id, as the engine computes it).
fn queue_shard(flow: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flow.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{{flowgate:eventlog:{}}}", h % 16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_events_queue_on_every_master_and_all_reach_postgres() {
    let cluster = RedisCluster::start().unwrap();
    let mut pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .expect("postgres + pgbouncer");
    flowgate_store::migrate(&pg.direct_url()).await.unwrap();
    // One flow whose queue shard each master serves: the queue is no
    // longer one stream on one master.
    let mut by_master = std::collections::BTreeMap::new();
    for i in 0..200 {
        let flow = format!("logged{i}");
        let shard = queue_shard(&flow);
        by_master
            .entry(cluster.master_of(&shard).unwrap())
            .or_insert((flow, shard));
    }
    assert_eq!(by_master.len(), 3, "the shards spread over three masters");
    let (url, db) = (cluster.url(), pg.bouncer_url());
    let mut ns = Vec::new();
    for id in ["q0", "q1"] {
        let mut vars: Vec<(&str, &str)> = vec![
            ("REDIS_URL", &url),
            ("DATABASE_URL", &db),
            ("FLOWGATE_NODE_ID", id),
            ("FLOWGATE_ACCESS_POLICY", "open"),
        ];
        vars.extend_from_slice(TIMINGS);
        ns.push(TestNode::start(&vars).await.expect("node starts"));
    }
    // With Postgres down the writers cannot drain: the events stay queued
    // where they landed.
    pg.stop_postgres();
    for (i, (flow, _)) in by_master.values().enumerate() {
        let mut c = joined(&ns[i % 2], "w", flow).await;
        for n in 0..5u64 {
            let ack = c
                .emit_ack(n + 1, "pod:create", json!({"pod": {"n": n}}))
                .await
                .unwrap();
            assert_eq!(ack, json!({"ok": true}), "{flow}");
        }
    }
    for (master, (flow, shard)) in &by_master {
        let server = cluster.nodes.iter().find(|n| n.port == *master).unwrap();
        assert_eq!(
            server.cli(&["XLEN", shard]).unwrap(),
            "5",
            "{flow}'s events on its shard's master {master}"
        );
    }

    tokio::task::block_in_place(|| pg.start_postgres().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    for (flow, _) in by_master.values() {
        loop {
            let path = format!("/v1/flows/{flow}/events?limit=100");
            let (s, body) = api(ns[1].addr, "GET", &path, None).await.unwrap();
            let page: Value = serde_json::from_str(&body).unwrap_or_default();
            let got: Vec<u64> = page["events"]
                .as_array()
                .map(|es| {
                    es.iter()
                        .filter_map(|e| e["data"]["pod"]["n"].as_u64())
                        .collect()
                })
                .unwrap_or_default();
            if got.len() >= 5 {
                assert_eq!(got, vec![0, 1, 2, 3, 4], "{flow}: once, in order");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{flow}: {s} {body}: not all in the log"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (master, (_, shard)) in &by_master {
        let server = cluster.nodes.iter().find(|n| n.port == *master).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.cli(&["XLEN", shard]).unwrap() != "0" {
            assert!(Instant::now() < deadline, "{shard} did not drain");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for n in &ns {
        assert_eq!(n.metric("flowgate_eventlog_dead_letters_total"), 0.0);
    }
}

/// Three members of `flow` on three nodes; `kill` takes the room's Redis
/// master down after ten events and returns once its replacement serves.
/// The sender keeps emitting throughout; afterwards relay, presence and
/// `/health` must be back on every node without a restart, and each
/// receiver must have every acknowledged event exactly once, in order.
async fn busy_room_survives_failover(url: &str, flow: &str, kill: impl FnOnce() + Send) {
    let ns = nodes(url, 3).await;
    let mut rx1 = joined(&ns[0], "r1", flow).await;
    let mut rx2 = joined(&ns[1], "r2", flow).await;
    let mut tx = joined(&ns[2], "tx", flow).await;
    let mut acked = Vec::new();
    let mut kill = Some(kill);
    let mut after_failover = 0;
    let started = Instant::now();
    let mut x = 0i64;
    // Ten events before, then until ten more are acknowledged after the
    // failover completed.
    while after_failover < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "relay did not come back: acked {acked:?}"
        );
        let ack = tx
            .emit_ack(
                x as u64,
                "pod:move",
                json!({"podId": "p", "position": {"x": x, "y": 0}}),
            )
            .await
            .unwrap();
        if ack == json!({"ok": true}) {
            acked.push(x);
            if kill.is_none() {
                after_failover += 1;
            }
        }
        if x == 10 {
            // The nodes run on the other worker threads meanwhile.
            tokio::task::block_in_place(kill.take().unwrap());
        }
        x += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = *acked.last().unwrap();
    for rx in [&mut rx1, &mut rx2] {
        let got = moves_until(rx, last).await;
        // Refused events may or may not have run; acknowledged ones must
        // all be there, and nothing twice or out of order.
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order: {got:?}");
        for a in &acked {
            assert!(got.contains(a), "acknowledged {a} missing: {got:?}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ok = true;
        for n in &ns {
            ok &= health(n).await == 200;
            ok &= presence(n, flow).await.as_deref()
                == Some(&["r1", "r2", "tx"].map(String::from)[..]);
        }
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "health or presence not back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The failover was a reconnect to every node, and the nodes said so
    // (a node whose subscriber connection is idle, such as the sender's,
    // may notice a little later, on a busy machine after the checks above).
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, n) in ns.iter().enumerate() {
        while n.metric("flowgate_bus_resubscribes_total") < 1.0 {
            assert!(Instant::now() < deadline, "node {i} never re-subscribed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_heals_without_restarting_a_node() {
    let mut cluster = RedisCluster::start().unwrap();
    let flow = "busy";
    let tag = format!("{{flow:{flow}}}");
    let master = cluster.master_of(&tag).unwrap();
    let url = cluster.url();
    let cluster_ref = &mut cluster;
    busy_room_survives_failover(&url, flow, || {
        cluster_ref.kill(master).unwrap();
        let new = cluster_ref
            .wait_failover(&tag, master, Duration::from_secs(30))
            .unwrap();
        assert_ne!(new, master);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_heals_without_restarting_a_node() {
    let mut setup = SentinelSetup::start().unwrap();
    assert_eq!(setup.master_port().unwrap(), setup.master.port);
    let url = setup.url();
    let setup_ref = &mut setup;
    busy_room_survives_failover(&url, "watched", || {
        setup_ref.master.stop();
        setup_ref.wait_failover(Duration::from_secs(30)).unwrap();
    })
    .await;
}
