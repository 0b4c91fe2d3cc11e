//! Faults of a node's Redis link, made with a TCP proxy the test controls:
//! a subscriber that loses its connection fills the gap from the room log
//! (clients miss nothing), and an event refused while the link stalls is
//! never delivered later.

use std::time::Duration;

use flowgate_test_support::chaos::ChaosProxy;
use flowgate_test_support::procs::RedisServer;
use flowgate_test_support::{api, token, RawClient, TestNode, SERVICE_TOKEN};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

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

/// Publishes `n` room events to `flow` through the server API of `node`.
async fn post_events(node: &TestNode, flow: &str, n: usize) {
    for i in 0..n {
        let (s, body) = api(
            node.addr,
            "POST",
            &format!("/v1/flows/{flow}/events"),
            Some(&format!(
                r#"{{"event":"execution:token","data":{{"i":{i}}}}}"#
            )),
        )
        .await
        .unwrap();
        assert_eq!(s, 202, "{body}");
    }
}

/// The next `event` frame `c` reads: its payload and its room offset.
async fn next_with_offset(c: &mut RawClient, event: &str) -> (Value, String) {
    loop {
        let t = c.recv_text().await.unwrap();
        let Some(json) = t.strip_prefix("42/flows,") else {
            continue;
        };
        let v: Vec<Value> = serde_json::from_str(json).unwrap();
        if v[0] == event {
            return (v[1].clone(), v[2].as_str().unwrap().to_owned());
        }
    }
}

/// CONNECTs `user` with a recovery attempt; the CONNECT reply and the
/// `execution:token` payloads replayed after it.
async fn reconnect(n: &TestNode, user: &str, pid: &Value, offset: &str) -> (Value, Vec<Value>) {
    let mut c = RawClient::open(&n.ws_url()).await.unwrap();
    c.send_text(&format!(
        "40/flows,{}",
        json!({"token": token(user, 600), "pid": pid, "offset": offset})
    ))
    .await
    .unwrap();
    let mut replayed = Vec::new();
    let reply = loop {
        let t = c.recv_text().await.unwrap();
        if let Some(r) = t.strip_prefix("40/flows,") {
            break serde_json::from_str::<Value>(r).unwrap();
        }
    };
    // Replayed events follow the reply.
    while let Ok(Ok((name, data))) =
        tokio::time::timeout(Duration::from_millis(500), c.recv_event()).await
    {
        if name == "execution:token" {
            replayed.push(data);
        }
    }
    (reply, replayed)
}

/// With Redis the room log is a stream trimmed by `XADD … MAXLEN ~`, which
/// removes the oldest entries without leaving a mark of what it removed.
/// A recovery whose offset is still in the log replays the gap; one whose
/// offset is older than what the log kept is a new session, never a
/// "recovered" session with the start of its gap silently missing.
#[tokio::test]
async fn a_recovery_older_than_the_trimmed_room_log_is_a_new_session() {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let n = TestNode::start(&[
        ("REDIS_URL", url.as_str()),
        ("FLOWGATE_NODE_ID", "trim"),
        ("FLOWGATE_ROOM_LOG_LEN", "10"),
        ("FLOWGATE_SERVICE_TOKEN", SERVICE_TOKEN),
    ])
    .await
    .unwrap();
    let mut rx = joined(&n, "rx", "trim").await;
    post_events(&n, "trim", 1).await;
    let (_, first) = next_with_offset(&mut rx, "execution:token").await;

    // A gap the log holds: recovered, replayed in order.
    let mut a = RawClient::open(&n.ws_url()).await.unwrap();
    a.send_text(&format!("40/flows,{}", json!({"token": token("ra", 600)})))
        .await
        .unwrap();
    let reply: Value = loop {
        let t = a.recv_text().await.unwrap();
        if let Some(r) = t.strip_prefix("40/flows,") {
            break serde_json::from_str(r).unwrap();
        }
    };
    a.expect_event("connected").await.unwrap();
    a.emit("flow:join", json!({"flowId": "trim"}))
        .await
        .unwrap();
    a.expect_event("flow:users").await.unwrap();
    post_events(&n, "trim", 1).await;
    let (_, offset) = next_with_offset(&mut a, "execution:token").await;
    assert!(offset > first, "{offset} after {first}");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_events(&n, "trim", 3).await;
    let (again, replayed) = reconnect(&n, "ra", &reply["pid"], &offset).await;
    assert_eq!(again, reply, "recovered: same sid and pid");
    assert_eq!(
        replayed,
        [json!({"i": 0}), json!({"i": 1}), json!({"i": 2})]
    );

    // Drop again; then far more events than the log keeps.
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_events(&n, "trim", 300).await;
    let len: u64 = redis
        .cli(&["XLEN", "{flow:trim}:log"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(len < 300, "the stream was trimmed ({len} entries)");
    let (fresh, replayed) = reconnect(&n, "ra", &reply["pid"], &offset).await;
    assert_ne!(
        fresh["pid"], reply["pid"],
        "a gap the log no longer holds is a new session"
    );
    assert!(replayed.is_empty(), "{} replayed", replayed.len());
}

/// A node whose subscriber comes back after more events than the room log
/// keeps cannot fill the gap: it closes that room's local members with
/// 1012, so they reconnect, and does not deliver the rest as if nothing
/// was missing.
#[tokio::test]
async fn a_subscriber_back_after_more_than_the_room_log_holds_closes_the_rooms_members() {
    let redis = RedisServer::start().unwrap();
    let proxy = ChaosProxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap())
        .await
        .unwrap();
    let log = [
        ("FLOWGATE_ROOM_LOG_LEN", "10"),
        ("FLOWGATE_SERVICE_TOKEN", SERVICE_TOKEN),
    ];
    let start = |url: String, id: &'static str| async move {
        let mut vars: Vec<(&str, &str)> = vec![("REDIS_URL", &url), ("FLOWGATE_NODE_ID", id)];
        vars.extend_from_slice(FAST);
        vars.extend_from_slice(&log);
        TestNode::start(&vars).await.expect("node starts")
    };
    let a = start(proxy.redis_url(), "ta").await;
    let b = start(redis.url(), "tb").await;
    let mut receiver = joined(&a, "rx", "lost").await;
    post_events(&b, "lost", 1).await;
    next_with_offset(&mut receiver, "execution:token").await;

    proxy.cut();
    post_events(&b, "lost", 300).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.open();
    let mut got = 0;
    let closed = loop {
        match receiver.recv_raw(Duration::from_secs(10)).await {
            Ok(Message::Close(c)) => break c.map(|c| u16::from(c.code)),
            Ok(Message::Text(t)) if t.contains("execution:token") => got += 1,
            Ok(_) => {}
            Err(e) => panic!("no close after {got} events: {e}"),
        }
    };
    assert_eq!(closed, Some(1012), "after {got} events");
    assert_eq!(
        got, 0,
        "nothing of a gap that cannot be filled is delivered"
    );
}
