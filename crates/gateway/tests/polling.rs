//! Raw HTTP tests of the Engine.IO long-polling transport on one node: the
//! handshake, payloads (several packets, binary as base64), heartbeat, the
//! protocol's errors, CORS, drain, and the upgrade to WebSocket with no
//! packet lost across the switch.

use std::time::Duration;

use flowgate_test_support::polling::{request, PollClient, SEP};
use flowgate_test_support::{api, token, RawClient, TestNode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const W: Duration = Duration::from_secs(5);

async fn node(vars: &[(&str, &str)]) -> TestNode {
    TestNode::start(vars).await.expect("node starts")
}

fn code(body: &str) -> Value {
    serde_json::from_str::<Value>(body).unwrap()["code"].clone()
}

fn pod_move(id: u64, x: i64) -> String {
    let data = json!(["pod:move", {"podId": "p", "position": {"x": x, "y": 0}}]);
    format!("42/flows,{id}{data}")
}

#[tokio::test]
async fn a_session_over_polling_offers_the_upgrade_and_works() {
    let n = node(&[]).await;
    let mut c = PollClient::connect(n.addr, &token("alice", 600))
        .await
        .unwrap();
    assert_eq!(c.open["upgrades"], json!(["websocket"]));
    assert_eq!(c.open["pingInterval"], json!(25000));
    assert_eq!(c.open["maxPayload"], json!(1_000_000));
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    // Several packets in one POST are handled in order.
    c.post_ok(&format!("{}{SEP}{}", pod_move(2, 1), pod_move(3, 2)))
        .await
        .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        let p = c.next_packet().await.unwrap();
        if p.starts_with("43/flows,") {
            acks.push(p);
        }
    }
    assert_eq!(
        acks,
        [r#"43/flows,2[{"ok":true}]"#, r#"43/flows,3[{"ok":true}]"#]
    );
    assert_eq!(
        n.metric(r#"flowgate_connections_opened_total{transport="polling"}"#),
        1.0
    );
    assert_eq!(n.metric("flowgate_connections"), 1.0);
}

#[tokio::test]
async fn binary_attachments_travel_as_base64_and_relay_to_websocket_peers() {
    let n = node(&[]).await;
    let mut a = PollClient::connect(n.addr, &token("a", 600)).await.unwrap();
    a.emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    let mut b = RawClient::connect(&n.ws_url(), &token("b", 600))
        .await
        .unwrap();
    b.emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    // Polling → WebSocket: one attachment, as `b` + base64.
    a.post_ok(&format!(
        r#"451-/flows,["pod:update",{{"podId":"p","updates":{{"_placeholder":true,"num":0}}}}]{SEP}bAQID"#
    ))
    .await
    .unwrap();
    loop {
        let t = b.recv_text().await.unwrap();
        if t.starts_with("451-/flows,[\"pod:updated\"") {
            break;
        }
    }
    match b.recv_raw(W).await.unwrap() {
        Message::Binary(d) => assert_eq!(&d[..], [1, 2, 3]),
        other => panic!("expected the attachment, got {other:?}"),
    }
    // WebSocket → polling: the attachment arrives base64-encoded.
    b.send_text(
        r#"451-/flows,["pod:update",{"podId":"p","updates":{"_placeholder":true,"num":0}}]"#,
    )
    .await
    .unwrap();
    b.send_binary(vec![255, 0, 7]).await.unwrap();
    loop {
        let p = a.next_packet().await.unwrap();
        if p.starts_with("451-/flows,[\"pod:updated\"") {
            break;
        }
    }
    assert_eq!(a.next_packet().await.unwrap(), "b/wAH");
}

#[tokio::test]
async fn protocol_errors_are_engine_io_errors() {
    let n = node(&[]).await;
    let path = "/socket.io/?EIO=4&transport=polling";
    let unknown = format!("{path}&sid=nosuchsession.bm9kZQ");
    for method in ["GET", "POST"] {
        let r = request(n.addr, method, &unknown, &[], b"3", W)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{method}");
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).unwrap(),
            json!({"code": 1, "message": "Session ID unknown"})
        );
    }
    // The handshake is a GET.
    let r = request(n.addr, "POST", path, &[], b"", W).await.unwrap();
    assert_eq!((r.status, code(&r.body)), (400, json!(2)));
    // A session accepts GET and POST only.
    let c = PollClient::open(n.addr).await.unwrap();
    let r = request(n.addr, "PUT", &c.path(), &[], b"", W)
        .await
        .unwrap();
    assert_eq!((r.status, code(&r.body)), (400, json!(3)));
    // A malformed payload ends the session.
    let r = c.post("\x1e\x1e").await.unwrap();
    assert_eq!(r.status, 400);
    let r = c.get(W).await.unwrap();
    assert!(r.status == 400 || r.body.ends_with('1'), "{r:?}");
    let r = c.get(W).await.unwrap();
    assert_eq!((r.status, code(&r.body)), (400, json!(1)));
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="bad polling payload"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_second_concurrent_get_closes_the_session() {
    let n = node(&[]).await;
    let c = PollClient::open(n.addr).await.unwrap();
    let (addr, path) = (c.addr, c.path());
    let first =
        tokio::spawn(async move { request(addr, "GET", &path, &[], b"", W).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = c.get(W).await.unwrap();
    assert_eq!(second.status, 400);
    // The waiting GET is answered with the close packet.
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, "1"));
    let r = c.get(W).await.unwrap();
    assert_eq!((r.status, code(&r.body)), (400, json!(1)));
}

#[tokio::test]
async fn a_post_over_max_payload_is_413_and_ends_the_session() {
    let n = node(&[("FLOWGATE_MAX_PAYLOAD", "1000")]).await;
    assert_eq!(
        PollClient::open(n.addr).await.unwrap().open["maxPayload"],
        1000
    );
    let c = PollClient::connect(n.addr, &token("big", 600))
        .await
        .unwrap();
    let big = format!("42/flows,[\"pod:move\",\"{}\"]", "x".repeat(2000));
    let r = c.post(&big).await.unwrap();
    assert_eq!(r.status, 413);
    let r = c.get(W).await.unwrap();
    assert!(r.status == 400 || r.body.ends_with('1'), "{r:?}");
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="oversize frame"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_close_packet_ends_the_session() {
    let n = node(&[]).await;
    let c = PollClient::connect(n.addr, &token("c", 600)).await.unwrap();
    c.post_ok("1").await.unwrap();
    let r = c.get(W).await.unwrap();
    assert!(r.status == 400 || r.body.ends_with('1'), "{r:?}");
    let deadline = tokio::time::Instant::now() + W;
    while n.metric("flowgate_connections") > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "session still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c.get(W).await.unwrap();
    assert_eq!((r.status, code(&r.body)), (400, json!(1)));
}

#[tokio::test]
async fn heartbeat_over_polling_and_a_client_that_stops_polling_is_dropped() {
    let n = node(&[
        ("FLOWGATE_PING_INTERVAL_MS", "200"),
        ("FLOWGATE_PING_TIMEOUT_MS", "300"),
    ])
    .await;
    let c = PollClient::connect(n.addr, &token("h", 600)).await.unwrap();
    let mut pings = 0;
    while pings < 5 {
        let r = c.get(W).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        for p in r.body.split(SEP) {
            if p == "2" {
                pings += 1;
                c.post_ok("3").await.unwrap();
            }
        }
    }
    assert_eq!(n.metric("flowgate_connections"), 1.0);
    // No GET (so no pong) for interval + timeout: the session ends.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let deadline = tokio::time::Instant::now() + W;
    while n.metric("flowgate_connections") > 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "session still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn cors_echoes_allowed_origins_with_credentials_and_refuses_others() {
    let n = node(&[("FRONTEND_URL", "https://app.example")]).await;
    let path = "/socket.io/?EIO=4&transport=polling";
    let ok = [("Origin", "https://app.example")];
    let r = request(n.addr, "GET", path, &ok, b"", W).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let pre = [
        ("Origin", "https://app.example"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type"),
    ];
    let r = request(n.addr, "OPTIONS", path, &pre, b"", W)
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let bad = [("Origin", "https://evil.example")];
    for method in ["GET", "OPTIONS"] {
        let r = request(n.addr, method, path, &bad, b"", W).await.unwrap();
        assert_eq!((r.status, code(&r.body)), (403, json!(4)), "{method}");
        assert_eq!(r.header("access-control-allow-origin"), None);
    }
    // Not a browser: no Origin, no CORS headers.
    let r = request(n.addr, "GET", path, &[], b"", W).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn drain_answers_the_waiting_get_with_a_close() {
    let n = node(&[]).await;
    let c = PollClient::connect(n.addr, &token("d", 600)).await.unwrap();
    let (addr, path) = (c.addr, c.path());
    let pending =
        tokio::spawn(async move { request(addr, "GET", &path, &[], b"", W).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    n.stop().await.unwrap();
    let r = pending.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.split(SEP).next_back(), Some("1"), "{}", r.body);
}

/// The output of a session that stops polling is bounded in frames as a
/// WebSocket's queue is, not only in bytes: many small events past
/// `FLOWGATE_OUTBOUND_QUEUE` make it a slow consumer.
#[tokio::test]
async fn a_session_that_stops_polling_is_held_to_the_frame_bound() {
    let n = node(&[
        ("FLOWGATE_OUTBOUND_QUEUE", "8"),
        ("FLOWGATE_SLOW_CONSUMER_MS", "300"),
    ])
    .await;
    let mut c = PollClient::connect(n.addr, &token("still", 600))
        .await
        .unwrap();
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let body = json!({"event": "execution:token", "data": {"n": 1}}).to_string();
    for _ in 0..40 {
        let (s, _) = api(n.addr, "POST", "/v1/flows/f/events", Some(&body))
            .await
            .unwrap();
        assert_eq!(s, 202);
    }
    let mut cut = false;
    for _ in 0..50 {
        if n.metric("flowgate_slow_consumer_disconnects_total") >= 1.0 {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cut,
        "40 small frames never polled: not cut as a slow consumer"
    );
}

/// A session's last packets and its close packet come in two payloads: the
/// stock client acts on a close at once but hands the packets before it to
/// the socket a tick later, so in one payload the close overtook them (an
/// `error` TOKEN_EXPIRED was never seen; at a drain, an event came again
/// in the recovery replay).
#[tokio::test]
async fn the_close_packet_comes_in_a_payload_of_its_own() {
    let n = node(&[("JWT_LEEWAY_SECS", "0")]).await;
    let c = PollClient::connect(n.addr, &token("brief", 1))
        .await
        .unwrap();
    let mut payloads = Vec::new();
    loop {
        let r = c.get(W).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let done = r.body.split(SEP).any(|p| p == "1");
        payloads.push(r.body);
        if done {
            break;
        }
        assert!(payloads.len() < 20, "{payloads:?}");
    }
    let last = payloads.pop().unwrap();
    assert_eq!(last, "1", "{payloads:?}");
    // The error and the DISCONNECT may come in one payload or two, but
    // both before the close.
    assert!(
        payloads.iter().any(|p| p.contains("TOKEN_EXPIRED")),
        "{payloads:?}"
    );
    assert!(
        payloads
            .iter()
            .any(|p| p.split(SEP).any(|q| q == "41/flows,")),
        "{payloads:?}"
    );
}

/// During the drain window a polling session still reaches its node on new
/// connections (each request of the stock client is one, through a load
/// balancer or forwarded by another node) until its own close: what it
/// posts is read and acknowledged, and it ends with the close packet, not
/// with an error. (The listener used to stop accepting when the window
/// began, so every polling session of the node broke at once with a
/// refused connection and what it was posting was lost.)
#[tokio::test]
async fn a_polling_session_keeps_its_node_until_its_own_close_in_the_drain_window() {
    let n = node(&[
        ("FLOWGATE_DRAIN_NOTICE_MS", "0"),
        ("FLOWGATE_DRAIN_WINDOW_MS", "3000"),
        ("FLOWGATE_SHUTDOWN_DEADLINE_MS", "8000"),
    ])
    .await;
    let addr = n.addr;
    let mut c = PollClient::connect(addr, &token("d", 600)).await.unwrap();
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": "drain"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let stopped = tokio::spawn(n.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;

    // A new connection while draining: /health says so, it is not refused.
    let health = request(addr, "GET", "/health", &[], b"", W).await.unwrap();
    assert_eq!(health.status, 503, "{}", health.body);
    // Emits go on until the session's close comes; each is acknowledged
    // unless the close came first.
    let mut packets: Vec<String> = Vec::new();
    let mut acked = 0;
    for id in 2.. {
        let post = c
            .post(&pod_move(id, id as i64))
            .await
            .expect("the POST reaches the node");
        let get = c.get(W).await.expect("the GET reaches the node");
        assert_eq!(get.status, 200, "{}", get.body);
        packets.extend(get.body.split(SEP).map(str::to_owned));
        if post.status == 200 {
            acked += 1;
        } else {
            assert_eq!(post.status, 400, "{}", post.body);
        }
        if packets.iter().any(|p| p == "1") {
            break;
        }
        assert!(id < 200, "no close packet within the window: {packets:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acks = packets
        .iter()
        .filter(|p| p.starts_with("43/flows,"))
        .count();
    assert!(
        acked >= 1 && acks >= 1,
        "nothing was read while draining: {packets:?}"
    );
    assert_eq!(packets.last().map(String::as_str), Some("1"), "{packets:?}");
    stopped.await.unwrap().unwrap();
}

/// Reads WebSocket text frames until one satisfies `f`.
async fn ws_until(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    f: impl Fn(&str) -> bool,
) -> String {
    loop {
        let m = tokio::time::timeout(W, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("a frame");
        if let Message::Text(t) = m {
            if f(t.as_str()) {
                return t.to_string();
            }
        }
    }
}

#[tokio::test]
async fn the_upgrade_loses_nothing_and_moves_the_session_to_websocket() {
    let n = node(&[]).await;
    let mut a = PollClient::connect(n.addr, &token("a", 600)).await.unwrap();
    a.emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    let mut peer = RawClient::connect(&n.ws_url(), &token("peer", 600))
        .await
        .unwrap();
    peer.emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    a.expect_event("user:joined").await.unwrap();
    let (addr, path) = (a.addr, a.path());
    let pending =
        tokio::spawn(async move { request(addr, "GET", &path, &[], b"", W).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&sid={}",
        n.addr, a.sid
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text("2probe")).await.unwrap();
    ws_until(&mut ws, |t| t == "3probe").await;
    // The waiting GET is released with a noop.
    let r = pending.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "6"));
    // Events between the probe and the switch wait for the WebSocket.
    for x in 0..3 {
        peer.emit(
            "pod:move",
            json!({"podId": "p", "position": {"x": x, "y": 0}}),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send(Message::text("5")).await.unwrap();
    for x in 0..3 {
        let t = ws_until(&mut ws, |t| t.contains("pod:moved")).await;
        assert!(t.contains(&format!("\"x\":{x}")), "{t}");
    }
    ws.send(Message::text(pod_move(9, 7))).await.unwrap();
    ws_until(&mut ws, |t| t == r#"43/flows,9[{"ok":true}]"#).await;
    assert_eq!(n.metric("flowgate_upgrades_total"), 1.0);
    // Polling is over for this session.
    let r = a.get(W).await.unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(n.metric("flowgate_connections"), 2.0);
}
