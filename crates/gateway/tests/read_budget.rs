//! What clients can make a node hold with messages they have not finished
//! sending: a socket that has not connected may hold little, a connected
//! one a max payload, and all of them together no more than the node's
//! read budget — over WebSocket and over polling POSTs. Each refusal
//! closes only the connection that went past, and the bytes come back.

use std::net::SocketAddr;
use std::time::Duration;

use flowgate_test_support::polling::PollClient;
use flowgate_test_support::{token, Closed, RawClient, TestNode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn node(vars: &[(&str, &str)]) -> TestNode {
    TestNode::start(vars).await.expect("node starts")
}

/// The header of a masked client text frame of `len` bytes (64-bit length,
/// mask of zeros: the payload goes as it is).
fn text_header(len: usize) -> Vec<u8> {
    let mut h = vec![0x81, 0x80 | 127];
    h.extend_from_slice(&(len as u64).to_be_bytes());
    h.extend_from_slice(&[0; 4]);
    h
}

/// A `pod:update` event of `total` bytes with ack `id`, as an Engine.IO
/// message.
fn update_of(total: usize, id: u64) -> String {
    let head = format!(r#"42/flows,{id}["pod:update",{{"podId":"p","updates":{{"t":""#);
    let tail = r#""}}]"#;
    format!(
        "{head}{}{tail}",
        "x".repeat(total - head.len() - tail.len())
    )
}

/// The arguments of the ack `id`, skipping other frames.
async fn ack_of(c: &mut RawClient, id: u64) -> String {
    let prefix = format!("43/flows,{id}");
    loop {
        let t = c.recv_text().await.unwrap();
        if let Some(rest) = t.strip_prefix(&prefix) {
            return rest.to_owned();
        }
    }
}

/// `user`, connected and joined to flow `f` (ack 1).
async fn member_of_f(n: &TestNode, user: &str) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    c.send_text(r#"42/flows,1["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    assert_eq!(ack_of(&mut c, 1).await, r#"[{"ok":true}]"#);
    c
}

/// Waits until the node holds no client bytes (a closed connection gives
/// its bytes back as its task ends, a moment after the client saw the
/// close).
async fn nothing_held(n: &TestNode) {
    for _ in 0..100 {
        if n.metric("flowgate_read_held_bytes") == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still held: {}", n.metric("flowgate_read_held_bytes"));
}

/// Waits until the metric `sample` is at least `want`.
async fn metric_reaches(n: &TestNode, sample: &str, want: f64) {
    for _ in 0..100 {
        if n.metric(sample) >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sample} stayed at {}, below {want}", n.metric(sample));
}

#[tokio::test]
async fn a_socket_that_has_not_connected_may_send_only_small_frames() {
    let n = node(&[]).await;
    // 100 KB before CONNECT: over the 64 KiB an unconnected socket holds.
    let mut stranger = RawClient::open(&n.ws_url()).await.unwrap();
    stranger
        .send_text(&format!("4{}", "x".repeat(100_000)))
        .await
        .unwrap();
    // A CONNECT_ERROR first, so that a stock client whose CONNECT carried
    // a huge token reports `connect_error` instead of reconnecting.
    let mut texts = Vec::new();
    let code = loop {
        match stranger.recv_raw(Duration::from_secs(5)).await.unwrap() {
            Message::Close(c) => break c.map(|c| u16::from(c.code)),
            Message::Text(t) => texts.push(t.to_string()),
            _ => {}
        }
    };
    assert_eq!(code, Some(1009));
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("44/flows,") && t.contains(r#""code":"INVALID_TOKEN""#)),
        "{texts:?}"
    );
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="oversize frame"}"#),
        1.0
    );
    // A CONNECT with a large auth payload (20 KB) is still taken, and the
    // connected socket then sends a frame of 300 KB.
    let mut c = RawClient::open(&n.ws_url()).await.unwrap();
    let auth = json!({"token": token("u", 600), "pad": "y".repeat(20_000)});
    c.send_text(&format!("40/flows,{auth}")).await.unwrap();
    assert!(c.recv_text().await.unwrap().starts_with("40/flows,"));
    c.send_text(r#"42/flows,1["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    c.send_text(&update_of(300_000, 2)).await.unwrap();
    assert_eq!(ack_of(&mut c, 2).await, r#"[{"ok":true}]"#);
    nothing_held(&n).await;

    // A client that does not wait for the CONNECT reply: CONNECT, join
    // and a 300 KB event in one write. The event is read after the
    // CONNECT was taken, so it has the connected socket's limit.
    let mut eager = RawClient::open(&n.ws_url()).await.unwrap();
    let connect = format!("40/flows,{}", json!({"token": token("e", 600)}));
    let join = r#"42/flows,1["flow:join",{"flowId":"f"}]"#;
    let mut wire = Vec::new();
    for msg in [connect.as_str(), join, update_of(300_000, 2).as_str()] {
        wire.extend_from_slice(&text_header(msg.len()));
        wire.extend_from_slice(msg.as_bytes());
    }
    eager.send_wire(&wire).await.unwrap();
    assert_eq!(ack_of(&mut eager, 2).await, r#"[{"ok":true}]"#);
}

#[tokio::test]
async fn unfinished_frames_together_stay_within_the_read_budget() {
    let n = node(&[("FLOWGATE_READ_BUDGET_BYTES", "1048576")]).await;
    let mut a = member_of_f(&n, "a").await;
    let mut b = member_of_f(&n, "b").await;

    // a sends 700 KB of a 900 KB frame and waits: the node holds them.
    let frame = update_of(900_000, 2);
    let mut wire = text_header(frame.len());
    wire.extend_from_slice(&frame.as_bytes()[..700_000]);
    a.send_wire(&wire).await.unwrap();
    metric_reaches(&n, "flowgate_read_held_bytes", 700_000.0).await;

    // b's 400 KB more would take the node past 1 MiB: b is closed with
    // 1013 ("try again later"), a is not.
    let mut wire = text_header(frame.len());
    wire.extend_from_slice(&frame.as_bytes()[..400_000]);
    let _ = b.send_wire(&wire).await;
    assert_eq!(
        b.closed(Duration::from_secs(5)).await.unwrap(),
        Closed::Code(1013)
    );
    assert_eq!(n.metric("flowgate_read_budget_refused_total"), 1.0);

    // a finishes its frame: the event is taken and nothing stays held.
    a.send_wire(&frame.as_bytes()[700_000..]).await.unwrap();
    assert_eq!(ack_of(&mut a, 2).await, r#"[{"ok":true}]"#);
    nothing_held(&n).await;
}

/// Starts a POST of `declared` bytes to `path` and sends `sent` of them;
/// the stream stays open.
async fn partial_post(addr: SocketAddr, path: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {declared}\r\n\r\n4"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; sent - 1]).await.unwrap();
    s
}

/// The status of the response on `s`.
async fn status_of(mut s: TcpStream) -> u16 {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn polling_posts_are_held_to_the_same_limits() {
    let n = node(&[("FLOWGATE_READ_BUDGET_BYTES", "1048576")]).await;
    // Before CONNECT: a POST over 64 KiB is read and dropped, not kept;
    // its answer is "ok" and the session ends with a CONNECT_ERROR, which
    // a stock client reports as connect_error and stops (a 413 would make
    // it reconnect and post the same CONNECT again).
    let mut stranger = PollClient::open(n.addr).await.unwrap();
    let r = stranger
        .post(&format!("40/flows,{}", "x".repeat(100_000)))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let refusal = stranger.next_packet().await.unwrap();
    assert!(
        refusal.starts_with("44/flows,") && refusal.contains("INVALID_TOKEN"),
        "{refusal}"
    );
    nothing_held(&n).await;
    // Over the max payload it is not read at all: 413.
    let stranger = PollClient::open(n.addr).await.unwrap();
    let r = stranger
        .post(&format!("4{}", "x".repeat(1_100_000)))
        .await
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.body);

    // A connected session posts 300 KB.
    let mut c = PollClient::connect(n.addr, &token("p", 600)).await.unwrap();
    c.post_ok(r#"42/flows,1["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    c.post_ok(&update_of(300_000, 2)).await.unwrap();
    loop {
        let p = c.next_packet().await.unwrap();
        if p.starts_with("43/flows,2") {
            assert_eq!(p, r#"43/flows,2[{"ok":true}]"#);
            break;
        }
    }

    // Two slow POSTs of connected sessions: the one that would take the
    // node past its budget gets 503, the other one is still read.
    let other = PollClient::connect(n.addr, &token("q", 600)).await.unwrap();
    let first = partial_post(n.addr, &c.path(), 900_000, 700_000).await;
    metric_reaches(&n, "flowgate_read_held_bytes", 700_000.0).await;
    let second = partial_post(n.addr, &other.path(), 900_000, 400_000).await;
    assert_eq!(status_of(second).await, 503);
    assert_eq!(n.metric("flowgate_read_budget_refused_total"), 1.0);
    let mut first = first;
    first.write_all(&vec![b'x'; 200_000]).await.unwrap();
    // The body is not a valid packet (no payload framing past "4x…"), but
    // it was read whole: the answer is the session's, not the budget's.
    assert_ne!(status_of(first).await, 503);
    nothing_held(&n).await;
}

#[tokio::test]
async fn attachments_still_due_count_against_the_same_budget() {
    let n = node(&[("FLOWGATE_READ_BUDGET_BYTES", "1048576")]).await;
    let mut a = member_of_f(&n, "a").await;
    let mut b = member_of_f(&n, "b").await;
    let binary = r#"452-/flows,2["pod:update",{"podId":"p","updates":{"a":{"_placeholder":true,"num":0},"b":{"_placeholder":true,"num":1}}}]"#;
    // a's first attachment of two (600 KB) is held until the second comes.
    a.send_text(binary).await.unwrap();
    a.send_binary(vec![1; 600_000]).await.unwrap();
    metric_reaches(&n, "flowgate_read_held_bytes", 600_000.0).await;
    // b's 500 KB attachment would take the node past 1 MiB.
    b.send_text(binary).await.unwrap();
    let _ = b.send_binary(vec![2; 500_000]).await;
    assert_eq!(
        b.closed(Duration::from_secs(5)).await.unwrap(),
        Closed::Code(1013)
    );
    // a's packet completes: relayed, acked, and nothing is held.
    a.send_binary(vec![3; 10]).await.unwrap();
    assert_eq!(ack_of(&mut a, 2).await, r#"[{"ok":true}]"#);
    nothing_held(&n).await;
}

#[tokio::test]
async fn a_polling_post_that_never_finishes_is_answered_408_and_let_go() {
    let n = node(&[("FLOWGATE_HTTP_BODY_TIMEOUT_MS", "500")]).await;
    let c = PollClient::connect(n.addr, &token("p", 600)).await.unwrap();
    let stalled = partial_post(n.addr, &c.path(), 900_000, 300_000).await;
    metric_reaches(&n, "flowgate_read_held_bytes", 300_000.0).await;
    assert_eq!(status_of(stalled).await, 408);
    nothing_held(&n).await;
    // The session goes on.
    c.post_ok("3").await.unwrap();
}
