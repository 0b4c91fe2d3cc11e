//! Frames RFC 6455 forbids: each closes only its own connection, with
//! 1002 (1007 for a text frame that is not UTF-8), counted in
//! `flowgate_protocol_errors_total` under its reason — never taken for the
//! client leaving (no code, nothing counted), and the node goes on.

use std::time::Duration;

use flowgate_test_support::{token, Closed, RawClient, TestNode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One client frame: the first byte as given (FIN, RSV bits, opcode), a
/// mask when `masked`, the payload.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, if masked { 0x80 } else { 0 } | payload.len() as u8];
    let mask = [7u8, 1, 9, 3];
    if masked {
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

#[tokio::test]
async fn forbidden_frames_close_with_1002_or_1007_and_are_counted() {
    let n = TestNode::start(&[]).await.expect("node starts");
    let mut bystander = RawClient::connect(&n.ws_url(), &token("b", 600))
        .await
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", frame(0x81, b"3", false), 1002),
        ("reserved opcode", frame(0x83, b"x", true), 1002),
        ("RSV1 without an extension", frame(0xC1, b"3", true), 1002),
        ("fragmented ping", frame(0x09, b"x", true), 1002),
        ("continuation with no start", frame(0x80, b"x", true), 1002),
        (
            "a new message inside a fragmented one",
            [frame(0x01, b"4", true), frame(0x81, b"2", true)].concat(),
            1002,
        ),
        (
            "text that is not UTF-8",
            frame(0x81, &[b'4', 0xff, 0xfe], true),
            1007,
        ),
    ];
    let mut bad_frames = 0.0;
    for (name, wire, code) in cases {
        let mut c = RawClient::connect(&n.ws_url(), &token("v", 600))
            .await
            .unwrap();
        c.send_wire(&wire).await.unwrap();
        assert_eq!(
            c.closed(Duration::from_secs(5)).await.unwrap(),
            Closed::Code(code),
            "{name}"
        );
        if code == 1002 {
            bad_frames += 1.0;
        }
    }
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="bad websocket frame"}"#),
        bad_frames
    );
    assert_eq!(
        n.metric(r#"flowgate_protocol_errors_total{reason="invalid utf-8"}"#),
        1.0
    );
    // The node goes on serving the others.
    let ack = bystander
        .emit_ack(1, "flow:join", json!({"flowId": "f"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
}

/// A raw WebSocket on `addr` with its upgrade answered and the Engine.IO
/// open packet read: the stream, to write and read at the same time.
async fn raw_socket(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// The code of the first close frame read from `r` (frames before it are
/// skipped), or `None` if the stream ends or breaks without one.
async fn close_code(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<u16> {
    let mut buf = Vec::new();
    loop {
        // Whole frames in `buf`: server frames are unmasked.
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[at], buf[at + 1]]));
            }
            buf.drain(..at + len);
        }
        let mut chunk = [0u8; 4096];
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn a_frame_far_over_the_max_payload_still_gets_its_1009() {
    // The client is still sending when the node refuses the frame: the
    // node must take (and drop) what keeps coming until the client has
    // read the close frame, or the kernel answers with a reset and the
    // close frame is lost (seen with 8 MB sent in one write).
    let n = TestNode::start(&[]).await.expect("node starts");
    for _ in 0..3 {
        let (mut r, mut w) = raw_socket(n.addr).await.into_split();
        let len: u64 = 8_000_000;
        let mut wire = vec![0x81, 0x80 | 127];
        wire.extend_from_slice(&len.to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        wire.resize(wire.len() + len as usize, b'x');
        // Written while the answer is read, as a browser would.
        let writer = tokio::spawn(async move { w.write_all(&wire).await });
        let code = tokio::time::timeout(Duration::from_secs(10), close_code(&mut r))
            .await
            .expect("the node answers");
        assert_eq!(code, Some(1009));
        // No reset: a client library that sees its write fail (Node's, a
        // browser's) drops the connection before it reads the close frame.
        let written = writer.await.unwrap();
        assert!(written.is_ok(), "the write was cut: {written:?}");
    }
}
