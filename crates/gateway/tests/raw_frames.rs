//! Raw-frame tests: a real node on a free port, driven with
//! tokio-tungstenite frame by frame. Every malformed input closes only the
//! connection that sent it, with the reason counted, and the node keeps
//! serving the others.

use std::time::Duration;

use flowgate_test_support::{api, http, token, Closed, RawClient, TestNode, SERVICE_TOKEN};
use serde_json::{json, Value};

async fn node(vars: &[(&str, &str)]) -> TestNode {
    TestNode::start(vars).await.expect("node starts")
}

/// A connected client in flow `f`, to prove the node still serves others.
async fn bystander(n: &TestNode) -> RawClient {
    member_of_f(n, "bystander").await
}

/// `user`, connected and joined to flow `f`.
async fn member_of_f(n: &TestNode, user: &str) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    c
}

async fn still_serves(c: &mut RawClient, id: u64) {
    let ack = c
        .emit_ack(
            id,
            "pod:move",
            json!({"podId": "p", "position": {"x": 1, "y": 2}}),
        )
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
}

#[tokio::test]
async fn open_packet_advertises_the_contract_settings() {
    let n = node(&[]).await;
    let c = RawClient::open(&n.ws_url()).await.unwrap();
    assert_eq!(c.open["upgrades"], json!([]));
    assert_eq!(c.open["pingInterval"], json!(25000));
    assert_eq!(c.open["pingTimeout"], json!(60000));
    assert_eq!(c.open["maxPayload"], json!(1_000_000));
    assert_eq!(c.open["sid"].as_str().unwrap().len(), 20);
}

#[tokio::test]
async fn malformed_frames_close_only_their_connection() {
    let n = node(&[("FLOWGATE_MAX_PAYLOAD", "10000")]).await;
    let mut other = bystander(&n).await;
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "unknown engine.io type",
            vec!["9hello"],
            "bad engine.io packet",
        ),
        (
            "unknown socket.io type",
            vec!["49/flows,"],
            "bad socket.io packet",
        ),
        (
            "bad json",
            vec![r#"42/flows,["pod:move",{"podId":}]"#],
            "bad socket.io packet",
        ),
        (
            "event payload is an object",
            vec![r#"42/flows,{"a":1}"#],
            "bad socket.io packet",
        ),
        (
            "event payload is an empty array",
            vec!["42/flows,[]"],
            "bad socket.io packet",
        ),
        (
            "event name is not a string",
            vec!["42/flows,[1,2]"],
            "bad socket.io packet",
        ),
        (
            "ack without id",
            vec!["43/flows,[]"],
            "bad socket.io packet",
        ),
        (
            "ack id out of range",
            vec!["42/flows,99999999999999999999[\"a\"]"],
            "bad socket.io packet",
        ),
        (
            "ack for an id never issued",
            vec!["43/flows,7[{}]"],
            "ack for an id the server never issued",
        ),
        (
            "engine upgrade packet",
            vec!["5"],
            "unexpected engine.io packet",
        ),
        (
            "text while attachments due",
            vec![
                r#"451-/flows,["pod:update",{"_placeholder":true,"num":0}]"#,
                "42/flows,[\"a\"]",
            ],
            "text frame while attachments were due",
        ),
        (
            "too many attachments",
            vec![r#"4599-/flows,["a"]"#],
            "too many attachments",
        ),
    ];
    for (i, (what, frames, reason)) in cases.into_iter().enumerate() {
        let before = n.metric(&format!(
            "flowgate_protocol_errors_total{{reason=\"{reason}\"}}"
        ));
        let mut c = RawClient::connect(&n.ws_url(), &token("mallory", 600))
            .await
            .unwrap();
        for f in frames {
            c.send_text(f).await.unwrap();
        }
        let closed = c.closed(Duration::from_secs(3)).await.unwrap();
        assert_eq!(closed, Closed::Code(1002), "{what}");
        let after = n.metric(&format!(
            "flowgate_protocol_errors_total{{reason=\"{reason}\"}}"
        ));
        assert_eq!(after, before + 1.0, "{what}: counted under {reason:?}");
        still_serves(&mut other, 100 + i as u64).await;
    }
}

#[tokio::test]
async fn unexpected_binary_and_bad_placeholders_close() {
    let n = node(&[]).await;
    let mut other = bystander(&n).await;

    let mut c = RawClient::connect(&n.ws_url(), &token("m", 600))
        .await
        .unwrap();
    c.send_binary(vec![1, 2, 3]).await.unwrap();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1002)
    );

    // A placeholder pointing past the attachments would make every
    // receiving socket.io-client throw; the sender is closed instead.
    let mut c = RawClient::connect(&n.ws_url(), &token("m", 600))
        .await
        .unwrap();
    c.send_text(
        r#"451-/flows,["pod:update",{"podId":"p","updates":{"_placeholder":true,"num":3}}]"#,
    )
    .await
    .unwrap();
    c.send_binary(vec![1]).await.unwrap();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1002)
    );
    still_serves(&mut other, 2).await;
}

#[tokio::test]
async fn oversize_frames_close_with_1009() {
    let n = node(&[("FLOWGATE_MAX_PAYLOAD", "1000")]).await;
    let mut other = bystander(&n).await;
    let mut c = RawClient::connect(&n.ws_url(), &token("big", 600))
        .await
        .unwrap();
    let big = format!(
        r#"42/flows,["pod:create",{{"pod":"{}"}}]"#,
        "x".repeat(2000)
    );
    c.send_text(&big).await.unwrap();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1009)
    );
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="oversize frame"}"#),
        1.0
    );
    // Attachments count against the same limit.
    let mut c = RawClient::connect(&n.ws_url(), &token("big", 600))
        .await
        .unwrap();
    c.send_text(r#"452-/flows,["pod:update",{"podId":"p","updates":[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]}]"#)
        .await
        .unwrap();
    c.send_binary(vec![0; 600]).await.unwrap();
    c.send_binary(vec![0; 600]).await.unwrap();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1009)
    );
    still_serves(&mut other, 2).await;
}

#[tokio::test]
async fn unknown_namespace_gets_connect_error_and_the_connection_stays() {
    let n = node(&[]).await;
    let mut c = RawClient::open(&n.ws_url()).await.unwrap();
    c.send_text("40/admin,").await.unwrap();
    assert_eq!(
        c.recv_text().await.unwrap(),
        r#"44/admin,{"message":"Invalid namespace"}"#
    );
    c.send_text("40").await.unwrap();
    assert_eq!(
        c.recv_text().await.unwrap(),
        r#"44{"message":"Invalid namespace"}"#
    );
    // Same connection, right namespace.
    c.send_text(&format!("40/flows,{}", json!({"token": token("u", 600)})))
        .await
        .unwrap();
    assert!(c
        .recv_text()
        .await
        .unwrap()
        .starts_with("40/flows,{\"sid\":"));
}

#[tokio::test]
async fn no_connect_closes_after_the_connect_timeout() {
    let n = node(&[("FLOWGATE_CONNECT_TIMEOUT_MS", "300")]).await;
    let mut c = RawClient::open(&n.ws_url()).await.unwrap();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1008)
    );
}

#[tokio::test]
async fn heartbeat_closes_a_silent_client_and_keeps_a_live_one() {
    let n = node(&[
        ("FLOWGATE_PING_INTERVAL_MS", "100"),
        ("FLOWGATE_PING_TIMEOUT_MS", "200"),
    ])
    .await;
    // Answers pings (recv_text does) across several intervals.
    let mut live = RawClient::connect(&n.ws_url(), &token("live", 600))
        .await
        .unwrap();
    let mut silent = RawClient::open(&n.ws_url()).await.unwrap();
    let (silent_end, live_end) = tokio::join!(
        async {
            let first = silent.recv_raw(Duration::from_secs(2)).await.unwrap();
            assert_eq!(first.to_text().unwrap(), "2");
            silent.closed(Duration::from_secs(3)).await.unwrap()
        },
        live.pump(Duration::from_millis(800))
    );
    assert_eq!(silent_end, Closed::Code(1000));
    live_end.unwrap();
    assert_eq!(
        live.emit_ack(1, "flow:join", json!({"flowId": "x"}))
            .await
            .unwrap(),
        json!({"ok": true})
    );
}

#[tokio::test]
async fn handshake_errors_are_engine_io_errors() {
    let n = node(&[]).await;
    let cases = [
        ("GET", "/socket.io/?EIO=3&transport=websocket", 400, 5),
        ("GET", "/socket.io/?EIO=4&transport=flashsocket", 400, 0),
        ("GET", "/socket.io/?EIO=4", 400, 0),
        ("POST", "/socket.io/?EIO=4&transport=websocket", 400, 2),
        ("GET", "/socket.io/?EIO=4&transport=websocket", 400, 3),
        (
            "GET",
            "/socket.io/?EIO=4&transport=websocket&sid=abc",
            400,
            1,
        ),
    ];
    for (method, path, status, code) in cases {
        let (s, body) = http(n.addr, method, path, &[], None).await.unwrap();
        assert_eq!(s, status, "{method} {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], json!(code), "{method} {path}");
        assert!(v["message"].is_string());
    }
}

#[tokio::test]
async fn origins_outside_frontend_url_are_refused() {
    let n = node(&[("FRONTEND_URL", "https://app.example, https://b.example")]).await;
    let req = |origin: &'static str| {
        let mut r = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            n.ws_url(),
        )
        .unwrap();
        r.headers_mut().insert("Origin", origin.parse().unwrap());
        r
    };
    let err = tokio_tungstenite::connect_async(req("https://evil.example"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    tokio_tungstenite::connect_async(req("https://b.example"))
        .await
        .unwrap();
}

#[tokio::test]
async fn connection_cap_refuses_upgrades_with_503() {
    let n = node(&[("FLOWGATE_MAX_CONNECTIONS", "2")]).await;
    let _a = RawClient::open(&n.ws_url()).await.unwrap();
    let health = || async {
        let (s, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
        (
            s,
            serde_json::from_str::<Value>(&body).unwrap()["status"].clone(),
        )
    };
    assert_eq!(health().await, (200, json!("ok")), "one slot left");
    let b = RawClient::open(&n.ws_url()).await.unwrap();
    let err = RawClient::open(&n.ws_url()).await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    // A node that accepts no connection tells the load balancer so.
    assert_eq!(health().await, (503, json!("full")));
    drop(b);
    // The slot comes back once the connection task has ended.
    let mut ok = false;
    for _ in 0..50 {
        if RawClient::open(&n.ws_url()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot released after a close");
    let mut back = false;
    for _ in 0..50 {
        if health().await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "/health is 200 again once a slot is free");
}

#[tokio::test]
async fn health_and_metrics() {
    let n = node(&[]).await;
    let (s, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["dependencies"]["engine"]["state"], "up");
    let _c = bystander(&n).await;
    let (s, text) = http(n.addr, "GET", "/metrics", &[], None).await.unwrap();
    assert_eq!(s, 200);
    for name in [
        "flowgate_connections 1",
        "flowgate_rooms 1",
        "flowgate_events_in_total{event=\"flow:join\"} 1",
        "flowgate_events_out_total{event=\"flow:users\"} 1",
        "flowgate_fanout_latency_seconds_bucket",
        "flowgate_queue_drops_total 0",
        "flowgate_slow_consumer_disconnects_total 0",
        "flowgate_max_connections 100000",
        // Series that alerts and dashboards name exist before their first
        // event, at 0.
        "flowgate_connections_refused_total{reason=\"capacity\"} 0",
        "flowgate_protocol_errors_total{reason=\"bad socket.io packet\"} 0",
        "flowgate_refusals_total{code=\"UNAVAILABLE\"} 0",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    // Without a database there is no Postgres to report (an alert on a
    // 0 there would fire forever).
    assert!(!text.contains("flowgate_postgres_up"), "{text}");
}

#[tokio::test]
async fn api_errors_all_have_the_error_shape() {
    let n = node(&[]).await;
    let auth = format!("Bearer {SERVICE_TOKEN}");
    for (method, path, status, code) in [
        ("GET", "/v1/nope", 404, "NOT_FOUND"),
        ("GET", "/v1", 404, "NOT_FOUND"),
        ("GET", "/v1/", 404, "NOT_FOUND"),
        ("POST", "/v1/flows/f/nothing/here", 404, "NOT_FOUND"),
        ("DELETE", "/v1/flows/f/presence", 405, "METHOD_NOT_ALLOWED"),
        ("PATCH", "/v1/flows/f/events", 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/v1/flows/f/members/u", 405, "METHOD_NOT_ALLOWED"),
    ] {
        for headers in [vec![], vec![("Authorization", auth.as_str())]] {
            let (s, body) = http(n.addr, method, path, &headers, None).await.unwrap();
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
            let got = (s, v["error"]["code"].as_str().unwrap_or_default());
            let want = if headers.is_empty() && method != "GET" && status == 405 {
                // A write without the service token is refused first.
                (401, "UNAUTHORIZED")
            } else {
                (status, code)
            };
            assert_eq!(got, want, "{method} {path} {body}");
            assert!(v["error"]["message"].is_string(), "{body}");
        }
    }
    // The routes themselves still answer.
    assert_eq!(presence(&n).await.0, 200);
}

#[tokio::test]
async fn unknown_event_names_do_not_grow_metric_labels() {
    let n = node(&[]).await;
    let mut c = bystander(&n).await;
    for i in 0..5 {
        let ack = c
            .emit_ack(10 + i, &format!("made:up:{i}"), json!({}))
            .await
            .unwrap();
        assert_eq!(ack["code"], "UNKNOWN_EVENT");
    }
    assert_eq!(n.metric(r#"flowgate_events_in_total{event="other"}"#), 5.0);
    assert!(!n.app.metrics.render().contains("made:up"));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_as_slow_consumer() {
    let n = node(&[("FLOWGATE_OUTBOUND_QUEUE", "8")]).await;
    let mut reader = bystander(&n).await;
    // Joins the flow, then never reads again.
    let mut stuck = member_of_f(&n, "stuck").await;

    let body = room_event(200_000);
    for _ in 0..400 {
        post_to_room(&n, &body).await;
        if n.metric("flowgate_slow_consumer_disconnects_total") >= 1.0 {
            break;
        }
        // The reader keeps up.
        keep_up(&mut reader).await;
    }
    assert_eq!(n.metric("flowgate_slow_consumer_disconnects_total"), 1.0);
    // Reading again, it gets whole frames (the one the node was writing
    // when it gave up is finished), then the close frame.
    assert_eq!(
        stuck.closed(Duration::from_secs(10)).await.unwrap(),
        Closed::Code(1008)
    );
    let mut joined = false;
    for _ in 0..100 {
        let (_, body) = presence(&n).await;
        let users: Value = serde_json::from_str(&body).unwrap();
        if users.as_array().unwrap().len() == 1 {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(joined, "the slow consumer left the flow's presence");
}

#[tokio::test]
async fn a_write_the_client_never_takes_ends_as_a_counted_slow_consumer() {
    // Queue bounds far away: what ends it is a write the socket does not
    // take for the whole grace, the other way a slow consumer is found.
    let n = node(&[
        ("FLOWGATE_OUTBOUND_QUEUE", "100000"),
        ("FLOWGATE_OUTBOUND_QUEUE_BYTES", "268435456"),
        ("FLOWGATE_SLOW_CONSUMER_MS", "300"),
    ])
    .await;
    let mut reader = bystander(&n).await;
    let mut stuck = member_of_f(&n, "stuck").await;
    // 40 MB: more than the loopback socket buffers hold.
    let body = room_event(500_000);
    for _ in 0..80 {
        post_to_room(&n, &body).await;
        keep_up(&mut reader).await;
    }
    let mut counted = false;
    for _ in 0..100 {
        keep_up(&mut reader).await;
        if n.metric("flowgate_slow_consumer_disconnects_total") == 1.0 {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted, "the slow consumer was not counted");
    assert_eq!(
        stuck.closed(Duration::from_secs(20)).await.unwrap(),
        Closed::Code(1008)
    );
}

/// The API body of a room event carrying `bytes` bytes.
fn room_event(bytes: usize) -> String {
    json!({"event": "execution:token", "data": {"chunk": "x".repeat(bytes)}}).to_string()
}

/// Publishes `body` to flow `f` through the server API.
async fn post_to_room(n: &TestNode, body: &str) {
    let (s, _) = api(n.addr, "POST", "/v1/flows/f/events", Some(body))
        .await
        .unwrap();
    assert_eq!(s, 202);
}

/// Flow `f`'s presence through the server API: status and body.
async fn presence(n: &TestNode) -> (u16, String) {
    api(n.addr, "GET", "/v1/flows/f/presence", None)
        .await
        .unwrap()
}

/// Reads whatever `reader` has been sent so far.
async fn keep_up(reader: &mut RawClient) {
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1), reader.recv_text()).await {
    }
}

/// One masked client text frame with the shortest header, as RFC 6455
/// §5.2 lays it out.
fn masked_text_frame(payload: &str) -> Vec<u8> {
    masked_frame(true, 0x1, payload.as_bytes())
}

/// One masked client frame: `fin`, the opcode, the payload.
fn masked_frame(fin: bool, opcode: u8, p: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match p.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=65535 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    f.extend_from_slice(&mask);
    f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn large_events_arrive_whole_both_ways_and_the_connection_goes_on() {
    // Larger than the gateway's 4 KiB fragments and its 1 KiB read buffer,
    // so each one is fragmented going out and grows the buffers coming in.
    let n = node(&[]).await;
    let mut a = bystander(&n).await;
    let mut b = bystander(&n).await;
    for (i, size) in [20_000usize, 70_000, 300_000].into_iter().enumerate() {
        let text = "x".repeat(size);
        let ack = a
            .emit_ack(
                10 + i as u64,
                "pod:update",
                json!({"podId": "p", "updates": {"text": text}}),
            )
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}), "update of {size} bytes");
        let got = b.expect_event("pod:updated").await.unwrap();
        assert_eq!(got["updates"]["text"].as_str().map(str::len), Some(size));
        // Small frames right after a large one, on both connections.
        still_serves(&mut a, 20 + i as u64).await;
        assert_eq!(b.expect_event("pod:moved").await.unwrap()["podId"], "p");
        still_serves(&mut b, 30 + i as u64).await;
        assert_eq!(a.expect_event("pod:moved").await.unwrap()["podId"], "p");
    }
}

/// The arguments of the ack `id`, skipping other frames.
async fn ack_frame(c: &mut RawClient, id: u64) -> String {
    let prefix = format!("43/flows,{id}");
    loop {
        let t = c.recv_text().await.unwrap();
        if let Some(rest) = t.strip_prefix(&prefix) {
            return rest.to_owned();
        }
    }
}

#[tokio::test]
async fn a_large_frame_then_part_of_the_next_keeps_the_part() {
    // The gateway drops a codec a large frame grew once it holds nothing;
    // here it holds the first bytes of the next frame while it answers the
    // large one, and those must survive.
    let n = node(&[]).await;
    let mut c = bystander(&n).await;
    let big = json!(["pod:update", {"podId": "p", "updates": {"text": "y".repeat(30_000)}}]);
    let small = json!(["pod:move", {"podId": "p", "position": {"x": 3, "y": 4}}]);
    let first = masked_text_frame(&format!("42/flows,5{big}"));
    let second = masked_text_frame(&format!("42/flows,6{small}"));
    for split in [1, 2, 5, second.len() - 1] {
        let mut wire = first.clone();
        wire.extend_from_slice(&second[..split]);
        c.send_wire(&wire).await.unwrap();
        // The large event is answered (and the connection flushed) while
        // the rest of the small frame is still on its way.
        assert_eq!(
            ack_frame(&mut c, 5).await,
            r#"[{"ok":true}]"#,
            "split {split}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.send_wire(&second[split..]).await.unwrap();
        assert_eq!(
            ack_frame(&mut c, 6).await,
            r#"[{"ok":true}]"#,
            "split {split}"
        );
    }
    still_serves(&mut c, 7).await;
}

#[tokio::test]
async fn codecs_rebuilt_after_large_frames_lose_and_reorder_nothing() {
    // Every 9 KiB event rebuilds the sender's codec once it is answered; a
    // relay of 120 events, with a ping each 20 ms in between, spans
    // seventeen rebuilds while frames and pongs keep coming.
    let n = node(&[
        ("FLOWGATE_PING_INTERVAL_MS", "20"),
        ("FLOWGATE_PING_TIMEOUT_MS", "5000"),
        ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
        ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
    ])
    .await;
    let mut a = bystander(&n).await;
    let mut b = bystander(&n).await;
    for i in 0..120u64 {
        let text = if i % 7 == 0 {
            "z".repeat(9_000)
        } else {
            String::new()
        };
        let ack = a
            .emit_ack(
                100 + i,
                "pod:update",
                json!({"podId": format!("p{i}"), "updates": {"text": text}}),
            )
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}), "event {i}");
        if i % 10 == 0 {
            a.pump(Duration::from_millis(30)).await.unwrap();
        }
    }
    for i in 0..120u64 {
        let got = b.expect_event("pod:updated").await.unwrap();
        assert_eq!(got["podId"], format!("p{i}"));
        let len = if i % 7 == 0 { 9_000 } else { 0 };
        assert_eq!(got["updates"]["text"].as_str().map(str::len), Some(len));
    }
    still_serves(&mut b, 1).await;
}

#[tokio::test]
async fn an_idle_connection_reads_frames_however_they_arrive() {
    // Between frames the gateway holds the bare socket and builds the
    // WebSocket codec again from the first bytes the client sends; every
    // way a frame can arrive after a pause must read as before.
    let n = node(&[]).await;
    let mut c = bystander(&n).await;
    let pause = Duration::from_millis(20);
    let mov = |id: u64| {
        format!(r#"42/flows,{id}["pod:move",{{"podId":"p","position":{{"x":1,"y":2}}}}]"#)
    };

    // A frame in single bytes: the idle read gets one byte of it.
    for b in masked_text_frame(&mov(1)) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        c.send_wire(&[b]).await.unwrap();
    }
    assert_eq!(ack_frame(&mut c, 1).await, r#"[{"ok":true}]"#);

    // A WebSocket ping after a pause is answered with its payload.
    tokio::time::sleep(pause).await;
    c.send_wire(&masked_frame(true, 0x9, b"still there"))
        .await
        .unwrap();
    match c.recv_raw(Duration::from_secs(5)).await.unwrap() {
        tokio_tungstenite::tungstenite::Message::Pong(p) => assert_eq!(&p[..], b"still there"),
        other => panic!("expected a pong, got {other:?}"),
    }

    // A message in two fragments with a pause between them.
    let text = mov(2);
    let (head, tail) = text.as_bytes().split_at(10);
    tokio::time::sleep(pause).await;
    c.send_wire(&masked_frame(false, 0x1, head)).await.unwrap();
    tokio::time::sleep(pause).await;
    c.send_wire(&masked_frame(true, 0x0, tail)).await.unwrap();
    assert_eq!(ack_frame(&mut c, 2).await, r#"[{"ok":true}]"#);

    // Two frames in one write, then a large one, after pauses.
    tokio::time::sleep(pause).await;
    let mut two = masked_text_frame(&mov(3));
    two.extend(masked_text_frame(&mov(4)));
    c.send_wire(&two).await.unwrap();
    assert_eq!(ack_frame(&mut c, 3).await, r#"[{"ok":true}]"#);
    assert_eq!(ack_frame(&mut c, 4).await, r#"[{"ok":true}]"#);
    tokio::time::sleep(pause).await;
    let big = json!(["pod:update", {"podId": "p", "updates": {"text": "y".repeat(5_000)}}]);
    c.send_wire(&masked_text_frame(&format!("42/flows,5{big}")))
        .await
        .unwrap();
    assert_eq!(ack_frame(&mut c, 5).await, r#"[{"ok":true}]"#);

    // A close frame from an idle client is answered with a close.
    tokio::time::sleep(pause).await;
    c.send_wire(&masked_frame(true, 0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    match c.recv_raw(Duration::from_secs(5)).await.unwrap() {
        tokio_tungstenite::tungstenite::Message::Close(_) => {}
        other => panic!("expected a close, got {other:?}"),
    }
}
