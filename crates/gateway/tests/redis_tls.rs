//! `rediss://` against a real TLS-only `redis-server` (`--port 0
//! --tls-port …`: it has no plaintext listener, so a node that works at
//! all has encrypted) with certificates the test generates: relay across
//! two nodes, one of them with a client certificate the server requires;
//! and no silent downgrade: a plaintext server, or a server whose
//! certificate the configured CA did not sign, is a start-up error.

use flowgate_test_support::procs::RedisServer;
use flowgate_test_support::tls::{redis_tls, TestCerts};
use flowgate_test_support::{http, token, RawClient, TestNode};
use serde_json::json;

async fn node(vars: &[(&str, &str)]) -> anyhow::Result<TestNode> {
    TestNode::start(vars).await
}

async fn joined(n: &TestNode, user: &str, flow: &str) -> RawClient {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    c.emit("flow:join", json!({"flowId": flow})).await.unwrap();
    c.expect_event("flow:users").await.unwrap();
    c
}

#[tokio::test]
async fn rediss_relays_across_nodes_with_a_ca_file_and_a_client_certificate() {
    let certs = TestCerts::generate().unwrap();
    // The server requires a client certificate signed by the test CA.
    let redis = redis_tls(&certs, true).unwrap();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let (ca, cert, key) = (
        certs.ca().display().to_string(),
        certs.client_cert().display().to_string(),
        certs.client_key().display().to_string(),
    );
    let tls = [
        ("REDIS_URL", url.as_str()),
        ("FLOWGATE_REDIS_CA_FILE", ca.as_str()),
        ("FLOWGATE_REDIS_CLIENT_CERT", cert.as_str()),
        ("FLOWGATE_REDIS_CLIENT_KEY", key.as_str()),
    ];
    let a = node(&[&tls[..], &[("FLOWGATE_NODE_ID", "tls-a")]].concat())
        .await
        .unwrap();
    let b = node(&[&tls[..], &[("FLOWGATE_NODE_ID", "tls-b")]].concat())
        .await
        .unwrap();
    for n in [&a, &b] {
        let (s, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
        assert_eq!(s, 200, "{body}");
    }
    let mut rx = joined(&a, "rx", "secure").await;
    let mut tx = joined(&b, "tx", "secure").await;
    rx.expect_event("user:joined").await.unwrap();
    let ack = tx
        .emit_ack(
            1,
            "pod:move",
            json!({"podId": "p", "position": {"x": 1, "y": 2}}),
        )
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(rx.expect_event("pod:moved").await.unwrap()["podId"], "p");
    // Both nodes' connections are TLS ones: the server has no other kind.
    let clients = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert", &ca, "--cert", &cert, "--key", &key])
        .args(["-p", &redis.port.to_string(), "client", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&clients.stdout).lines().count() >= 4);
}

#[tokio::test]
async fn a_rediss_url_to_a_plaintext_server_refuses_to_start() {
    let plain = RedisServer::start().unwrap();
    let url = format!("rediss://127.0.0.1:{}", plain.port);
    let certs = TestCerts::generate().unwrap();
    let ca = certs.ca().display().to_string();
    let e = node(&[("REDIS_URL", &url), ("FLOWGATE_REDIS_CA_FILE", &ca)])
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("TLS handshake"), "{text}");
    // Nothing was sent in plaintext: the server saw no command at all.
    let stats = plain.cli(&["info", "stats"]).unwrap();
    let processed: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // (`info` counts itself only once it has answered.)
    assert_eq!(processed, 0, "{stats}");
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_refuses_to_start() {
    let certs = TestCerts::generate().unwrap();
    let other = TestCerts::generate().unwrap();
    let redis = redis_tls(&certs, false).unwrap();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let wrong_ca = other.ca().display().to_string();
    let e = node(&[("REDIS_URL", &url), ("FLOWGATE_REDIS_CA_FILE", &wrong_ca)])
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("TLS handshake") && text.contains("certificate"),
        "{text}"
    );
    // With the right CA and no client certificate (not required here).
    let ca = certs.ca().display().to_string();
    let n = node(&[("REDIS_URL", &url), ("FLOWGATE_REDIS_CA_FILE", &ca)])
        .await
        .unwrap();
    let (s, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(s, 200, "{body}");
}
