//! Graceful shutdown of the real `flowgate` binary: SIGTERM turns `/health`
//! to 503, refuses new upgrades, closes every socket cleanly (close 1001,
//! so clients reconnect elsewhere) spread over the drain window, and the
//! process exits within its deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use flowgate_test_support::procs::NodeProcess;
use flowgate_test_support::{http, token, Closed, RawClient, SECRET};
use serde_json::json;

fn start(envs: &[(&str, &str)]) -> NodeProcess {
    NodeProcess::start(std::path::Path::new(env!("CARGO_BIN_EXE_flowgate")), envs)
        .expect("flowgate starts")
}

#[tokio::test]
async fn sigterm_drains_every_socket_and_exits_within_the_deadline() {
    let mut node = start(&[
        ("FLOWGATE_DRAIN_NOTICE_MS", "400"),
        ("FLOWGATE_DRAIN_WINDOW_MS", "400"),
        ("FLOWGATE_SHUTDOWN_DEADLINE_MS", "3000"),
    ]);
    let addr = node.addr;
    let url = node.ws_url();
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = RawClient::connect(&url, &token(&format!("u{i}"), 600))
            .await
            .unwrap();
        assert_eq!(
            c.emit_ack(1, "flow:join", json!({"flowId": "drain"}))
                .await
                .unwrap(),
            json!({"ok": true})
        );
        clients.push(c);
    }
    let (s, _) = http(addr, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(s, 200);

    let signalled = Instant::now();
    node.signal("TERM").unwrap();

    // During the notice period the load balancer sees 503 and no new
    // WebSocket is accepted, while existing sockets stay open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, body) = http(addr, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("\"draining\""), "{body}");
    let refused = RawClient::open(&url).await.unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");

    let mut first_close = None;
    for c in &mut clients {
        assert_eq!(
            c.closed(Duration::from_secs(4)).await.unwrap(),
            Closed::Code(1001)
        );
        first_close.get_or_insert(signalled.elapsed());
    }
    assert!(
        first_close.unwrap() >= Duration::from_millis(350),
        "sockets closed only after the notice period"
    );

    let deadline = signalled + Duration::from_millis(3000 + 1000);
    loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process still running after its deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bad_configuration_exits_with_a_message_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("check-config")
        .env_clear()
        .env("JWT_ACCESS_TOKEN_SECRET", SECRET)
        .env("PORT", "eighty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PORT"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("check-config")
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_ACCESS_TOKEN_SECRET"));

    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("check-config")
        .env_clear()
        .env("JWT_ACCESS_TOKEN_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
