//! Smoke test of the load generator: every scenario, with tiny sizes and a
//! second or two each, against in-process flowgate nodes; checks that real
//! numbers come back (deliveries, no losses at a low rate, the limit
//! scenario near the configured per-user budget).

use std::time::Duration;

use flowgate_gateway::engine::memory::MemoryHub;
use flowgate_loadtest::idle::{self, IdleConfig};
use flowgate_loadtest::limit::{self, LimitConfig};
use flowgate_loadtest::relay::{self, RelayConfig};
use flowgate_loadtest::Common;
use flowgate_test_support::{TestNode, SECRET};

const FAST: &[(&str, &str)] = &[
    ("FLOWGATE_RATE_LIMIT_PER_SEC", "100000"),
    ("FLOWGATE_RATE_LIMIT_BURST", "100000"),
];

fn common(node: &TestNode, run_id: &str) -> Common {
    let mut c = Common::new(vec![node.addr], SECRET);
    c.run_id = run_id.into();
    c.connect_timeout = Duration::from_secs(10);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_returns_real_numbers() {
    let node = TestNode::start(FAST).await.unwrap();

    // idle: the node runs in this process, so its RSS is ours.
    let r = idle::run(&IdleConfig {
        common: common(&node, "idle"),
        connections: 60,
        room_size: 6,
        settle: Duration::from_millis(200),
        hold: Duration::from_millis(300),
        pids: vec![std::process::id()],
        extra_pids: Vec::new(),
        workers: 1,
        worker_exe: None,
        activity_bytes: 20_000,
    })
    .await
    .unwrap();
    assert_eq!(r.connected, 60, "{r:?}");
    assert!(r.target_rss_per_conn_after_activity_kib.is_some());
    assert_eq!(r.failed, 0);
    assert_eq!(r.alive_at_end, 60);
    assert!(r.connects_per_sec > 0.0);
    assert!(r.target_rss_per_conn_kib.is_some());
    assert!(r.targets[0].after_kib > 0);

    // rooms: 5 rooms of 4, 5 events/s each, 1.5 s.
    let mut cfg = RelayConfig::rooms(
        common(&node, "rooms"),
        5,
        4,
        5.0,
        Duration::from_millis(1500),
    );
    cfg.drain = Duration::from_millis(700);
    let r = relay::run(&cfg).await.unwrap();
    let st = &r.steps[0];
    assert_eq!(r.connected, 20, "{r:?}");
    assert!(st.sent > 50, "{st:?}");
    assert_eq!(st.expected, st.sent * 3);
    assert!(st.received > 0);
    assert_eq!(st.lost, 0, "{st:?}");
    assert_eq!(st.errors, 0);
    assert!(st.deliveries_per_sec > 100.0, "{st:?}");
    assert!(st.latency.p99_ms > 0.0 && st.latency.p99_ms < 1000.0);
    assert!(st.sustained);

    // broadcast: one room of 20, one sender at 20/s.
    let mut cfg = RelayConfig::broadcast(
        common(&node, "bcast"),
        20,
        20.0,
        Duration::from_millis(1500),
    );
    cfg.drain = Duration::from_millis(700);
    let r = relay::run(&cfg).await.unwrap();
    let st = &r.steps[0];
    assert!(st.sent >= 25, "{st:?}");
    assert_eq!(st.lost, 0, "{st:?}");
    assert_eq!(st.received, st.sent * 19);

    // ramp: three short steps.
    let mut cfg = RelayConfig::ramp(
        common(&node, "ramp"),
        4,
        3,
        2.0,
        2.0,
        3,
        Duration::from_millis(800),
    );
    cfg.drain = Duration::from_millis(500);
    let r = relay::run(&cfg).await.unwrap();
    assert!(!r.steps.is_empty());
    assert!(
        r.max_sustained_deliveries_per_sec.unwrap_or(0.0) > 0.0,
        "{r:?}"
    );
    assert!(r
        .steps
        .windows(2)
        .all(|w| w[1].rate_per_sender > w[0].rate_per_sender));

    // limit: one user on two nodes sharing one engine, the contract's
    // default budget (20/s, burst 20) left in place.
    let hub = MemoryHub::new();
    let a = TestNode::start_on(&[], Some(hub.clone())).await.unwrap();
    let b = TestNode::start_on(&[], Some(hub)).await.unwrap();
    let mut c = common(&a, "limit");
    c.targets.push(b.addr);
    let r = limit::run(&LimitConfig {
        common: c,
        connections: 4,
        window: 8,
        duration: Duration::from_millis(2500),
        warmup: Duration::from_millis(1100),
    })
    .await
    .unwrap();
    assert_eq!(r.connected, 4, "{r:?}");
    assert!(r.refused > r.accepted, "{r:?}");
    assert!(
        (10.0..=35.0).contains(&r.steady_accepted_per_sec),
        "steady accepted rate {} is not near 20/s: {r:?}",
        r.steady_accepted_per_sec
    );
    assert!(r.accepted_per_target.iter().all(|n| *n > 0), "{r:?}");
}
