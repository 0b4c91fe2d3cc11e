//! Attacks on a node's resources, one test per class. Each keeps a
//! bystander connected and checks it is still served quickly, and that the
//! attacker gets the documented refusal.

use std::time::{Duration, Instant};

use flowgate_test_support::procs::free_port;
use flowgate_test_support::{http, token, Closed, RawClient, TestNode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn bystander(n: &TestNode) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token("bystander", 600))
        .await
        .unwrap();
    c.emit_ack(1, "flow:join", json!({"flowId": "calm"}))
        .await
        .unwrap();
    c
}

/// The bystander's ack round trip.
async fn latency(c: &mut RawClient, id: u64) -> Duration {
    let t = Instant::now();
    let ack = c
        .emit_ack(
            id,
            "pod:move",
            json!({"podId": "p", "position": {"x": 1, "y": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    t.elapsed()
}

/// Whether the server closed `s` within `wait` (EOF or reset).
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let end = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn unfinished_headers_and_idle_keep_alive_are_cut_at_the_header_deadline() {
    let n = TestNode::start(&[("FLOWGATE_HTTP_HEADER_TIMEOUT_MS", "400")])
        .await
        .unwrap();
    let mut by = bystander(&n).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(n.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let mut idle = TcpStream::connect(n.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(latency(&mut by, 2).await < Duration::from_millis(500));
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "slowloris kept"
        );
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(3)).await,
        "idle keep-alive kept"
    );
    assert!(latency(&mut by, 3).await < Duration::from_millis(500));
}

#[tokio::test]
async fn a_flood_of_idle_connections_cannot_starve_health_on_the_admin_port() {
    let admin = free_port().unwrap();
    let admin_s = admin.to_string();
    let n = TestNode::start(&[
        ("FLOWGATE_MAX_HTTP_CONNECTIONS", "40"),
        ("FLOWGATE_ADMIN_PORT", &admin_s),
    ])
    .await
    .unwrap();
    let mut by = bystander(&n).await;
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(TcpStream::connect(n.addr).await.unwrap());
    }
    // Past the cap, connections are closed at once.
    let mut refused = 0;
    for s in flood.iter_mut().rev().take(20) {
        if closed_within(s, Duration::from_millis(500)).await {
            refused += 1;
        }
    }
    assert!(refused >= 15, "refused {refused}");
    assert!(n.metric(r#"flowgate_connections_refused_total{reason="http cap"}"#) >= 15.0);
    let t = Instant::now();
    let (status, body) = http(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        "GET",
        "/health",
        &[],
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(t.elapsed() < Duration::from_millis(500));
    assert!(latency(&mut by, 2).await < Duration::from_millis(500));
}

/// Behind a load balancer every client comes from the balancer's address:
/// a storm of clients that have opened but not yet sent CONNECT (a node
/// died and its clients came back at once) is let through by default.
#[tokio::test]
async fn a_reconnect_storm_from_one_address_is_let_through_by_default() {
    let n = TestNode::start(&[]).await.unwrap();
    let mut storm = Vec::new();
    for _ in 0..300 {
        storm.push(RawClient::open(&n.ws_url()).await.unwrap());
    }
    for (i, c) in storm.iter_mut().enumerate() {
        c.send_text(&format!(
            "40/flows,{}",
            json!({"token": token(&format!("u{i}"), 600)})
        ))
        .await
        .unwrap();
    }
    for c in storm.iter_mut() {
        assert!(c.recv_text().await.unwrap().starts_with("40/flows,"));
    }
    assert_eq!(
        n.metric(r#"flowgate_connections_refused_total{reason="unauthenticated per address"}"#),
        0.0
    );
}

#[tokio::test]
async fn one_address_cannot_hold_many_unauthenticated_connections() {
    let n = TestNode::start(&[("FLOWGATE_MAX_UNAUTHENTICATED_PER_IP", "5")])
        .await
        .unwrap();
    let mut by = bystander(&n).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(RawClient::open(&n.ws_url()).await.unwrap());
    }
    assert!(
        RawClient::open(&n.ws_url()).await.is_err(),
        "a sixth is refused"
    );
    assert!(
        n.metric(r#"flowgate_connections_refused_total{reason="unauthenticated per address"}"#)
            >= 1.0
    );
    // One of them authenticates: its slot is free again.
    idle[0]
        .send_text(&format!("40/flows,{}", json!({"token": token("u", 600)})))
        .await
        .unwrap();
    assert!(idle[0].recv_text().await.unwrap().starts_with("40/flows,"));
    RawClient::open(&n.ws_url()).await.unwrap();
    assert!(latency(&mut by, 2).await < Duration::from_millis(500));
}

#[tokio::test]
async fn an_unauthenticated_connection_is_closed_at_the_connect_deadline() {
    let n = TestNode::start(&[("FLOWGATE_CONNECT_TIMEOUT_MS", "300")])
        .await
        .unwrap();
    let mut c = RawClient::open(&n.ws_url()).await.unwrap();
    let t = Instant::now();
    assert_eq!(
        c.closed(Duration::from_secs(3)).await.unwrap(),
        Closed::Code(1008)
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn pings_and_errors_do_not_amplify_what_a_client_sends() {
    let n = TestNode::start(&[]).await.unwrap();
    let mut c = RawClient::connect(&n.ws_url(), &token("amp", 600))
        .await
        .unwrap();
    // A client ping with a large payload is answered with a bare pong.
    c.send_text(&format!("2{}", "x".repeat(100_000)))
        .await
        .unwrap();
    assert_eq!(c.recv_text().await.unwrap(), "3");
    // An unknown event with a huge name: the error echoes a short prefix.
    let name = "e".repeat(50_000);
    c.send_text(&format!("42/flows,7[{:?},{{}}]", name))
        .await
        .unwrap();
    let mut total = 0;
    for _ in 0..2 {
        total += c.recv_text().await.unwrap().len();
    }
    assert!(
        total < 1_000,
        "{total} bytes answered to a 50 kB event name"
    );
}

/// Sends a request head with a large announced body (and no body), and
/// reads the status line the server answers with, within a second.
async fn status_before_body(n: &TestNode, auth: Option<&str>, length: usize) -> String {
    let mut s = TcpStream::connect(n.addr).await.unwrap();
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "POST /v1/flows/f/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {length}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
        .await
        .expect("answered before any body was sent")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_api_checks_the_token_before_reading_a_body_and_bounds_it() {
    let n = TestNode::start(&[]).await.unwrap();
    let line = status_before_body(&n, None, 50_000_000).await;
    assert!(line.contains(" 401 "), "{line}");
    let line = status_before_body(&n, Some("wrong"), 50_000_000).await;
    assert!(line.contains(" 403 "), "{line}");
    let line = status_before_body(&n, Some(flowgate_test_support::SERVICE_TOKEN), 50_000_000).await;
    assert!(line.contains(" 413 "), "{line}");
}
