//! Faults of a node's Redis link, made with a TCP proxy the test controls:
//! a subscriber that loses its connection fills the gap from the room log
//! (clients miss nothing), and an event refused while the link stalls is
//! never delivered later.

use std::time::Duration;

use flowgate_test_support::chaos::ChaosProxy;
use flowgate_test_support::procs::RedisServer;
use flowgate_test_support::{token, RawClient, TestNode};
use serde_json::{json, Value};

const FAST: &[(&str, &str)] = &[
    ("FLOWGATE_NODE_HEARTBEAT_MS", "200"),
    ("FLOWGATE_NODE_DEAD_AFTER_MS", "3000"),
    ("FLOWGATE_PRESENCE_REFRESH_MS", "300"),
    ("FLOWGATE_SESSION_TTL_MS", "5000"),
    ("FLOWGATE_REDIS_TIMEOUT_MS", "500"),
];

async fn node(url: &str, id: &str) -> TestNode {
    let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", url), ("FLOWGATE_NODE_ID", id)];
    vars.extend_from_slice(FAST);
    TestNode::start(&vars).await.expect("node starts")
}

async fn joined(n: &TestNode, user: &str, flow: &str) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    c.emit("flow:join", json!({"flowId": flow})).await.unwrap();
    c.expect_event("flow:users").await.unwrap();
    c
}

/// Every `pod:deleted` podId `c` receives within `wait`.
async fn deleted(c: &mut RawClient, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    while let Ok(Ok((name, data))) = tokio::time::timeout_at(end, c.recv_event()).await {
        if name == "pod:deleted" {
            got.push(data["podId"].as_str().unwrap_or_default().to_owned());
        }
    }
    got
}

#[tokio::test]
async fn a_subscriber_that_reconnects_fills_the_gap_from_the_room_log() {
    let redis = RedisServer::start().unwrap();
    let proxy = ChaosProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap())
        .await
        .unwrap();
    let a = node(&proxy.redis_url(), "fa").await;
    let b = node(&redis.url(), "fb").await;
    let mut receiver = joined(&a, "rx", "gap").await;
    let mut sender = joined(&b, "tx", "gap").await;
    receiver.expect_event("user:joined").await.unwrap();

    sender
        .emit_ack(1, "pod:delete", json!({"podId": "before"}))
        .await
        .unwrap();
    proxy.cut();
    for i in 0..10 {
        let ack = sender
            .emit_ack(10 + i, "pod:delete", json!({"podId": format!("gap{i}")}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.open();
    let got = deleted(&mut receiver, Duration::from_secs(5)).await;
    let mut want = vec!["before".to_owned()];
    want.extend((0..10).map(|i| format!("gap{i}")));
    assert_eq!(got, want, "every event once, in order, nobody kicked");
    assert!(a.metric("flowgate_bus_gap_filled_total") >= 10.0);
    // Live delivery goes on.
    sender
        .emit_ack(50, "pod:delete", json!({"podId": "after"}))
        .await
        .unwrap();
    assert_eq!(
        deleted(&mut receiver, Duration::from_secs(2)).await,
        ["after"]
    );
}

#[tokio::test]
async fn an_event_refused_while_the_link_stalls_is_never_delivered_later() {
    let redis = RedisServer::start().unwrap();
    let proxy = ChaosProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap())
        .await
        .unwrap();
    let a = node(&proxy.redis_url(), "sa").await;
    let b = node(&redis.url(), "sb").await;
    let mut sender = joined(&a, "tx", "stall").await;
    let mut receiver = joined(&b, "rx", "stall").await;
    sender.expect_event("user:joined").await.unwrap();

    proxy.stall();
    let ack: Value = sender
        .emit_ack(1, "pod:delete", json!({"podId": "refused"}))
        .await
        .unwrap();
    assert_eq!(ack["ok"], false, "{ack}");
    assert_eq!(ack["code"], "UNAVAILABLE");
    // The stalled bytes reach Redis now, after the sender gave up.
    proxy.open();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = deleted(&mut receiver, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "a refused event arrived late: {got:?}");
    let log = redis
        .cli(&["XRANGE", "{flow:stall}:log", "-", "+"])
        .unwrap();
    assert!(log.contains("user:joined"), "the log is read: {log}");
    assert!(!log.contains("refused"), "nor is it in the room log: {log}");
    drop(a);
}
