//! Frames RFC 6455 forbids: each closes only its own connection, with
//! 1002 (1007 for a text frame that is not UTF-8), counted in
//! `flowgate_protocol_errors_total` under its reason — never taken for the
//! client leaving (no code, nothing counted), and the node goes on.

use std::time::Duration;

use flowgate_test_support::{token, Closed, RawClient, TestNode};
use serde_json::json;

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
