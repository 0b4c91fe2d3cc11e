//! Long-polling across nodes with a real Redis and no sticky sessions:
//! every request of a session may reach any node, which forwards it to the
//! session's owner (the upgrade too); a sid of a node that is not alive is
//! unknown; a forwarded request is never forwarded again.

use std::time::Duration;

use flowgate_test_support::polling::{request, PollClient, SEP};
use flowgate_test_support::procs::{HaProxy, RedisServer};
use flowgate_test_support::{token, TestNode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const W: Duration = Duration::from_secs(5);

async fn nodes(redis: &RedisServer, n: usize) -> Vec<TestNode> {
    let url = redis.url();
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("node{i}");
        let vars = [
            ("REDIS_URL", url.as_str()),
            ("FLOWGATE_NODE_ID", id.as_str()),
            ("FLOWGATE_NODE_HEARTBEAT_MS", "200"),
            ("FLOWGATE_NODE_DEAD_AFTER_MS", "1500"),
        ];
        out.push(TestNode::start(&vars).await.expect("node starts"));
    }
    // Each node publishes its address once it listens.
    let deadline = tokio::time::Instant::now() + W;
    while redis
        .cli(&["KEYS", "flowgate:node:*:url"])
        .unwrap()
        .lines()
        .count()
        < n
    {
        assert!(tokio::time::Instant::now() < deadline, "nodes not listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

fn forwarded(n: &TestNode, kind: &str) -> f64 {
    n.metric(&format!(
        r#"flowgate_forwarded_requests_total{{kind="{kind}",outcome="ok"}}"#
    ))
}

#[tokio::test]
async fn every_request_may_reach_another_node_and_the_upgrade_too() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let mut a = PollClient::connect(ns[0].addr, &token("a", 600))
        .await
        .unwrap();
    // From now on, each request goes to the next node.
    for (i, id) in (1..=6).enumerate() {
        a.addr = ns[i % 3].addr;
        let ack = a
            .emit_ack(
                id,
                "pod:move",
                json!({"podId": "p", "position": {"x": 1, "y": 2}}),
            )
            .await
            .unwrap();
        // Not joined: refused, but answered by the owner, in order.
        assert!(ack.get("ok").is_some(), "{ack}");
    }
    a.addr = ns[1].addr;
    let ack = a
        .emit_ack(7, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    assert!(forwarded(&ns[1], "polling") > 0.0);
    assert!(forwarded(&ns[2], "polling") > 0.0);
    assert_eq!(
        ns[0].metric(r#"flowgate_connections_opened_total{transport="polling"}"#),
        1.0
    );

    // The upgrade lands on node 2: its WebSocket is tunnelled to node 0.
    let (addr, path) = (ns[1].addr, a.path());
    let pending =
        tokio::spawn(async move { request(addr, "GET", &path, &[], b"", W).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={}",
        ns[2].addr, a.sid
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    let next = |m: Option<Result<Message, _>>| match m {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    };
    assert_eq!(next(ws.next().await), "3probe");
    let r = pending.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "6"));
    ws.send(Message::text("5")).await.unwrap();
    let emit = r#"42/flows,8["flow:leave",{}]"#;
    ws.send(Message::text(emit)).await.unwrap();
    let ack = tokio::time::timeout(W, async {
        loop {
            let t = next(ws.next().await);
            if t.starts_with("43/flows,8") {
                return t;
            }
        }
    })
    .await
    .unwrap();
    assert!(ack.contains("\"ok\":true"), "{ack}");
    assert_eq!(ns[0].metric("flowgate_upgrades_total"), 1.0);
    assert_eq!(forwarded(&ns[2], "websocket"), 1.0);
}

#[tokio::test]
async fn sids_of_dead_nodes_are_unknown_and_forwarding_happens_once() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 2).await;
    // `Z2hvc3Q` is "ghost": no such node in the directory.
    let path = "/socket.io/?EIO=4&transport=polling&sid=aaaaaaaaaaaaaaaaaaaa.Z2hvc3Q";
    let r = request(ns[0].addr, "GET", path, &[], b"", W).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&r.body).unwrap(),
        json!({"code": 1, "message": "Session ID unknown"})
    );
    // A live node's session, but the request says it was forwarded
    // already: it is not forwarded again.
    let c = PollClient::open(ns[0].addr).await.unwrap();
    let hdr = [("X-Flowgate-Forwarded", "node9")];
    let r = request(ns[1].addr, "GET", &c.path(), &hdr, b"", W)
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    // Once its node stops, a session's sid is unknown everywhere.
    let sid_path = c.path();
    let mut ns = ns;
    let owner = ns.remove(0);
    owner.stop().await.unwrap();
    let r = request(ns[0].addr, "GET", &sid_path, &[], b"", W)
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn a_polling_session_through_round_robin_haproxy() {
    let redis = RedisServer::start().unwrap();
    let ns = nodes(&redis, 3).await;
    let lb =
        HaProxy::round_robin([ns[0].addr.port(), ns[1].addr.port(), ns[2].addr.port()]).unwrap();
    let mut a = PollClient::connect(lb.addr(), &token("a", 600))
        .await
        .unwrap();
    let mut b = PollClient::connect(lb.addr(), &token("b", 600))
        .await
        .unwrap();
    for c in [&mut a, &mut b] {
        let ack = c
            .emit_ack(1, "flow:join", json!({"flowId": "f"}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
    }
    let batch: Vec<String> = (0..10)
        .map(|x| {
            let d = json!(["pod:move", {"podId": "p", "position": {"x": x, "y": 0}}]);
            format!("42/flows,{d}")
        })
        .collect();
    a.post_ok(&batch.join(&SEP.to_string())).await.unwrap();
    for x in 0..10 {
        let moved = b.expect_event("pod:moved").await.unwrap();
        assert_eq!(moved["position"]["x"], json!(x), "{moved}");
    }
    let hops: f64 = ns.iter().map(|n| forwarded(n, "polling")).sum();
    assert!(hops > 0.0, "no request was forwarded");
}
