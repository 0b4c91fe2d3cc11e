//! The durable side against real PostgreSQL 15 behind a real PgBouncer in
//! transaction mode (every database test goes through PgBouncer), with a
//! real Redis: migrations, memberships, the event log, partitions, faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_gateway::engine::{
    raw_json, Deliver, EventQueue, LocalSession, Offset, PushRefused, QueuedEvent, RoomMessage,
};
use flowgate_gateway::eventlog::{history, HistoryPage};
use flowgate_redis::{RedisEngine, RedisSettings};
use flowgate_store::{LoggedEvent, Store, StoreSettings};
use flowgate_test_support::procs::{PgStack, RedisServer};
use flowgate_test_support::{http, now_secs, token, token_with, RawClient, TestNode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Env {
    pg: PgStack,
    redis: RedisServer,
}

async fn env() -> Env {
    Env {
        pg: migrated_pg().await,
        redis: RedisServer::start().unwrap(),
    }
}

/// Postgres behind PgBouncer, schema migrated.
async fn migrated_pg() -> PgStack {
    let pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .expect("postgres + pgbouncer");
    flowgate_store::migrate(&pg.direct_url())
        .await
        .expect("migrations");
    pg
}

async fn node(e: &Env, id: &str, extra: &[(&str, &str)]) -> TestNode {
    let redis = e.redis.url();
    let db = e.pg.bouncer_url();
    let mut vars: Vec<(&str, &str)> = vec![
        ("REDIS_URL", &redis),
        ("DATABASE_URL", &db),
        ("FLOWGATE_NODE_ID", id),
        ("FLOWGATE_DB_CONNECT_TIMEOUT_MS", "2000"),
        ("FLOWGATE_DB_QUERY_TIMEOUT_MS", "3000"),
    ];
    vars.extend_from_slice(extra);
    TestNode::start(&vars).await.expect("node starts")
}

fn store(e: &Env, pool: usize) -> Store {
    Store::new(
        StoreSettings {
            url: e.pg.bouncer_url(),
            pool_size: pool,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            slow_query: Duration::from_secs(1),
        },
        &prometheus::Registry::new(),
    )
    .unwrap()
}

async fn api(n: &TestNode, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (s, b) = flowgate_test_support::api(n.addr, method, path, body)
        .await
        .unwrap();
    (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

async fn join(n: &TestNode, user: &str, flow: &str) -> (RawClient, Value) {
    let mut c = RawClient::connect(&n.ws_url(), &token(user, 600))
        .await
        .unwrap();
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": flow}))
        .await
        .unwrap();
    (c, ack)
}

#[tokio::test]
async fn migrations_are_idempotent_and_a_behind_schema_is_refused() {
    let pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .unwrap();
    let redis = RedisServer::start().unwrap();
    let (db, r) = (pg.bouncer_url(), redis.url());
    let err = TestNode::start(&[("REDIS_URL", &r), ("DATABASE_URL", &db)])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("flowgate migrate"), "{err:#}");
    // Three runs at once on the empty database take turns: one applies,
    // the others find the schema up to date; none fails.
    let url = pg.direct_url();
    let runs = futures_util::future::join_all((0..3).map(|_| flowgate_store::migrate(&url))).await;
    let mut applied: Vec<Vec<i32>> = runs.into_iter().map(|r| r.unwrap()).collect();
    applied.sort();
    assert_eq!(applied, vec![vec![], vec![], vec![1]]);
    assert!(flowgate_store::migrate(&pg.direct_url())
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        pg.psql("SELECT count(*) FROM refinery_schema_history", "flowgate")
            .unwrap(),
        "1"
    );
    TestNode::start(&[("REDIS_URL", &r), ("DATABASE_URL", &db)])
        .await
        .unwrap();
}

#[tokio::test]
async fn nodes_given_the_direct_url_migrate_an_empty_database_themselves() {
    let pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .unwrap();
    let redis = RedisServer::start().unwrap();
    let (db, direct, r) = (pg.bouncer_url(), pg.direct_url(), redis.url());
    let vars = [
        ("REDIS_URL", r.as_str()),
        ("DATABASE_URL", db.as_str()),
        ("DATABASE_DIRECT_URL", direct.as_str()),
    ];
    // Two nodes at once on the empty database: one applies, the other
    // waits its turn and finds the schema up to date; both serve.
    let (a, b) = tokio::join!(TestNode::start(&vars), TestNode::start(&vars));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        pg.psql("SELECT count(*) FROM refinery_schema_history", "flowgate")
            .unwrap(),
        "1"
    );
    for n in [&a, &b] {
        let (s, body) = api(n, "PUT", "/v1/flows/f/members/alice", Some("{}")).await;
        assert_eq!(s, 200, "{body}");
    }
}

#[tokio::test]
async fn memberships_decide_joins_and_revocation_kicks_on_every_node() {
    let e = env().await;
    let a = node(&e, "a", &[]).await;
    let b = node(&e, "b", &[]).await;

    let (mut mallory, ack) = join(&a, "mallory", "secret").await;
    assert_eq!(ack["code"], "FORBIDDEN");

    for user in ["alice", "mallory"] {
        let (s, body) = api(
            &a,
            "PUT",
            &format!("/v1/flows/secret/members/{user}"),
            Some(r#"{"role":"editor"}"#),
        )
        .await;
        assert_eq!(s, 200, "{body}");
    }
    // The grant cleared the cached refusal.
    assert_eq!(
        mallory
            .emit_ack(2, "flow:join", json!({"flowId": "secret"}))
            .await
            .unwrap(),
        json!({"ok": true})
    );
    let (mut alice, ack) = join(&a, "alice", "secret").await;
    assert_eq!(ack, json!({"ok": true}));
    // Mallory also connects on the other node.
    let (mut mallory_b, ack) = join(&b, "mallory", "secret").await;
    assert_eq!(ack, json!({"ok": true}));
    alice.pump(Duration::from_millis(200)).await.unwrap();

    let (s, body) = api(&b, "DELETE", "/v1/flows/secret/members/mallory", None).await;
    assert_eq!((s, body["removed"].clone()), (200, json!(true)));
    for m in [&mut mallory, &mut mallory_b] {
        let err = m.expect_event("error").await.unwrap();
        assert_eq!(err["code"], "FORBIDDEN");
        assert_eq!(err["message"], "Membership revoked");
        // Out of the room: relaying is refused.
        let ack = m
            .emit_ack(9, "pod:delete", json!({"podId": "p"}))
            .await
            .unwrap();
        assert_eq!(ack["code"], "NOT_IN_FLOW");
    }
    let mut left = vec![
        alice.expect_event("user:left").await.unwrap()["userId"].clone(),
        alice.expect_event("user:left").await.unwrap()["userId"].clone(),
    ];
    left.dedup();
    assert_eq!(left, vec![json!("mallory")]);
    let (_, users) = api(&a, "GET", "/v1/flows/secret/presence", None).await;
    assert_eq!(users.as_array().unwrap().len(), 1);
    // And a new join is refused again.
    let (_, ack) = join(&b, "mallory", "secret").await;
    assert_eq!(ack["code"], "FORBIDDEN");
}

#[tokio::test]
async fn access_decisions_are_cached_until_they_expire() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_CACHE_SECS", "1")]).await;
    let (mut c, ack) = join(&n, "bob", "cached").await;
    assert_eq!(ack["code"], "FORBIDDEN");
    // A grant written straight into the database (not through the API, so
    // the cache is not told): the cached refusal stands until it expires.
    e.pg.psql(
        "INSERT INTO flow_members (flow_id, user_id) VALUES ('cached', 'bob')",
        "flowgate",
    )
    .unwrap();
    assert_eq!(
        c.emit_ack(2, "flow:join", json!({"flowId": "cached"}))
            .await
            .unwrap()["code"],
        "FORBIDDEN"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        c.emit_ack(3, "flow:join", json!({"flowId": "cached"}))
            .await
            .unwrap(),
        json!({"ok": true})
    );
}

/// Emits `count` `pod:create` events (`{pod: pod(i)}`, ack ids 10 + i),
/// each acknowledged `{ok: true}`.
async fn create_pods(c: &mut RawClient, count: u64, pod: impl Fn(u64) -> Value) {
    for i in 0..count {
        let ack = c
            .emit_ack(10 + i, "pod:create", json!({ "pod": pod(i) }))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}), "pod:create {i}");
    }
}

async fn wait_for_log(n: &TestNode, flow: &str, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let (s, page) = api(
                n,
                "GET",
                &format!("/v1/flows/{flow}/events?limit=50&after={after}"),
                None,
            )
            .await;
            if s != 200 {
                break;
            }
            all.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => after = next.to_owned(),
                None => break,
            }
        }
        if all.len() >= count {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "log has {} of {count} events",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn acked_events_reach_the_log_in_order_and_paginate() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_POLICY", "open")]).await;
    let (mut c, _) = join(&n, "writer", "logged").await;
    for i in 0..5 {
        let ack = c
            .emit_ack(10 + i, "pod:create", json!({"pod": {"id": i}}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
        // Volatile events are not logged.
        c.emit_ack(
            100 + i,
            "cursor:move",
            json!({"position": {"x": 1, "y": 1}}),
        )
        .await
        .unwrap();
    }
    let (s, _) = api(
        &n,
        "POST",
        "/v1/flows/logged/events",
        Some(r#"{"event":"execution:completed","data":{"ok":1}}"#),
    )
    .await;
    assert_eq!(s, 202);
    let log = wait_for_log(&n, "logged", 6).await;
    assert_eq!(log.len(), 6);
    // An idle queue is not an error (an empty read is a nil reply).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(n.metric("flowgate_eventlog_queue_errors_total"), 0.0);
    let ids: Vec<Value> = log[..5]
        .iter()
        .map(|e| e["data"]["pod"]["id"].clone())
        .collect();
    assert_eq!(ids, (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(log[0]["event"], "pod:created");
    assert_eq!(log[0]["userId"], "writer");
    assert_eq!(log[5]["event"], "execution:completed");

    let (s, page) = api(&n, "GET", "/v1/flows/logged/events?limit=2", None).await;
    assert_eq!(s, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, page2) = api(
        &n,
        "GET",
        &format!("/v1/flows/logged/events?limit=2&after={next}"),
        None,
    )
    .await;
    assert_eq!(page2["events"][0]["data"]["pod"]["id"], 2);
    // Bad queries are 400s with a JSON error.
    let (s, body) = api(&n, "GET", "/v1/flows/logged/events?after=nonsense", None).await;
    assert_eq!(
        (s, body["error"]["code"].clone()),
        (400, json!("INVALID_OFFSET"))
    );
    let (s, _) = api(&n, "GET", "/v1/flows/logged/events?limit=0", None).await;
    assert_eq!(s, 400);
    // A user token works only with membership (open policy here: yes).
    let user = format!("Bearer {}", token("writer", 60));
    let (s, _) = http(
        n.addr,
        "GET",
        "/v1/flows/logged/events",
        &[("Authorization", &user)],
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let (s, _) = http(
        n.addr,
        "GET",
        "/v1/flows/logged/events",
        &[("Authorization", "Bearer junk")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 401);
}

/// One node with a database and no Redis (the embedded engine): the
/// membership policy decides joins, and acknowledged events reach the log
/// through the node's in-memory queue, in order.
#[tokio::test]
async fn one_node_without_redis_logs_events_and_checks_memberships() {
    let pg = migrated_pg().await;
    let db = pg.bouncer_url();
    let n = TestNode::start(&[("DATABASE_URL", &db), ("FLOWGATE_NODE_ID", "solo")])
        .await
        .expect("a node with a database and no Redis starts");

    let (_, ack) = join(&n, "writer", "solo-flow").await;
    assert_eq!(
        ack["code"], "FORBIDDEN",
        "the members policy is the default"
    );
    let (s, body) = api(
        &n,
        "PUT",
        "/v1/flows/solo-flow/members/writer",
        Some(r#"{"role":"editor"}"#),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (mut c, ack) = join(&n, "writer", "solo-flow").await;
    assert_eq!(ack, json!({"ok": true}));
    create_pods(&mut c, 5, |i| json!({"id": i})).await;
    let log = wait_for_log(&n, "solo-flow", 5).await;
    let ids: Vec<Value> = log.iter().map(|e| e["data"]["pod"]["id"].clone()).collect();
    assert_eq!(ids, (0..5).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(log[0]["userId"], "writer");
    assert_eq!(n.metric("flowgate_eventlog_queue_errors_total"), 0.0);
    // Revoking the membership removes the writer from the room.
    let (s, _) = api(&n, "DELETE", "/v1/flows/solo-flow/members/writer", None).await;
    assert_eq!(s, 200);
    let err = c.expect_event("error").await.unwrap();
    assert_eq!(err["message"], "Membership revoked");
}

/// The embedded engine's queue refuses at its cap like the Redis one, and
/// its refusals are counted the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_queue_refuses_at_its_cap_and_counts_it() {
    let mut pg = migrated_pg().await;
    let db = pg.bouncer_url();
    let n = TestNode::start(&[
        ("DATABASE_URL", &db),
        ("FLOWGATE_NODE_ID", "solo-cap"),
        ("FLOWGATE_ACCESS_POLICY", "open"),
        ("FLOWGATE_EVENTLOG_QUEUE_MAX", "3"),
        ("FLOWGATE_EVENTLOG_SHARDS", "1"),
        ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
        ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
    ])
    .await
    .expect("a node with a database and no Redis starts");
    let (mut c, _) = join(&n, "w", "solo-capped").await;
    pg.stop_postgres();
    let mut refused = 0;
    for id in 1..=6u64 {
        let ack = c
            .emit_ack(id, "pod:create", json!({"pod": {"n": id}}))
            .await
            .unwrap();
        if ack["ok"] != true {
            assert_eq!(ack["code"], "UNAVAILABLE", "{ack}");
            refused += 1;
        }
    }
    assert_eq!(refused, 3, "three queued, then refused");
    assert_eq!(
        n.metric("flowgate_eventlog_refused_total{reason=\"full\"}"),
        3.0
    );
    tokio::task::block_in_place(|| pg.start_postgres().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_pgbouncer_then_postgres_loses_no_acked_event() {
    let mut e = env().await;
    let n = node(
        &e,
        "a",
        &[
            ("FLOWGATE_ACCESS_POLICY", "open"),
            ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
            ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
        ],
    )
    .await;
    let (mut c, _) = join(&n, "w", "outage").await;
    let mut acked = Vec::new();
    let mut id = 0u64;
    for phase in 0..3 {
        match phase {
            1 => e.pg.stop_bouncer(),
            2 => e.pg.stop_postgres(),
            _ => {}
        }
        for _ in 0..10 {
            id += 1;
            let ack = c
                .emit_ack(id, "pod:create", json!({"pod": {"n": id}}))
                .await
                .unwrap();
            if ack["ok"] == true {
                acked.push(id);
            }
        }
    }
    // Rooms keep working through the outage: everything was acked.
    assert_eq!(acked.len(), 30);
    let (s, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
    assert_eq!(
        s, 200,
        "a database outage does not take the node out: {body}"
    );
    assert!(body.contains("\"down\""), "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("flowgate_eventlog_write_failures_total") == 0.0 {
        assert!(Instant::now() < deadline, "the writer saw no failure");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::task::block_in_place(|| {
        e.pg.start_postgres().unwrap();
        e.pg.start_bouncer().unwrap();
    });
    let log = wait_for_log(&n, "outage", 30).await;
    let got: Vec<u64> = log
        .iter()
        .map(|e| e["data"]["pod"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, acked, "every acked event once, in room order");
    let offsets: Vec<&str> = log.iter().map(|e| e["offset"].as_str().unwrap()).collect();
    let mut sorted = offsets.clone();
    sorted.sort_by_key(|o| flowgate_store::parse_offset(o).unwrap());
    assert_eq!(offsets, sorted);
}

fn ev(flow: &str, ms: i64, seq: i64) -> LoggedEvent {
    LoggedEvent {
        flow_id: flow.into(),
        offset: format!("{ms}-{seq}"),
        event: "pod:created".into(),
        data: json!({"ms": ms}),
        user_id: Some("u".into()),
    }
}

#[tokio::test]
async fn events_land_in_month_partitions_and_retention_drops_old_ones() {
    let e = env().await;
    let s = store(&e, 2);
    // 2024-01-15 and 2024-02-15 (UTC).
    let jan = 1_705_312_800_000;
    let feb = 1_707_991_200_000;
    let batch = vec![ev("p", jan, 0), ev("p", jan, 1), ev("p", feb, 0)];
    assert_eq!(s.write_events(&batch).await.unwrap(), 3);
    // Exactly once: the same batch again writes nothing.
    assert_eq!(s.write_events(&batch).await.unwrap(), 0);
    let parts =
        e.pg.psql(
            "SELECT t || ':' || n FROM (SELECT tableoid::regclass::text AS t, count(*) AS n \
             FROM room_events GROUP BY 1) x ORDER BY 1",
            "flowgate",
        )
        .unwrap();
    assert_eq!(parts, "room_events_y2024m01:2\nroom_events_y2024m02:1");
    let dropped = s.drop_partitions_before(2024, 2).await.unwrap();
    assert_eq!(dropped, vec!["room_events_y2024m01"]);
    let left: Vec<String> = s
        .events("p", None, i64::MAX, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.offset)
        .collect();
    assert_eq!(left, vec![format!("{feb}-0")]);
    s.ensure_partitions_ahead().await.unwrap();
    // Nodes starting together create the same partitions at once: they
    // take turns, none fails ("already exists" with IF NOT EXISTS alone).
    let stores: Vec<Store> = (0..12).map(|_| store(&e, 1)).collect();
    for s in &stores {
        // Each store's pooled connection is open before the race.
        s.ensure_partition(2031, 1).await.unwrap();
    }
    for month in 2..=6 {
        let all = stores.iter().map(|s| s.ensure_partition(2031, month));
        for r in futures_util::future::join_all(all).await {
            r.unwrap();
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let current = format!("room_events_y{:04}m{:02}", now.year(), now.month() as u8);
    assert!(e
        .pg
        .psql(
            "SELECT relname FROM pg_class WHERE relname LIKE 'room_events_y%'",
            "flowgate"
        )
        .unwrap()
        .contains(&current));
}

#[tokio::test]
async fn history_and_membership_queries_use_indexes() {
    let e = env().await;
    let s = store(&e, 1);
    s.ensure_partitions_ahead().await.unwrap();
    let plan = |sql: &str| {
        e.pg.psql(
            &format!("SET enable_seqscan = off; EXPLAIN {sql}"),
            "flowgate",
        )
        .unwrap()
    };
    let history = plan(
        "SELECT offset_ms, offset_seq FROM room_events WHERE flow_id = 'f' \
         AND (offset_ms, offset_seq) > (0, -1) AND created_at >= to_timestamp(0) \
         ORDER BY offset_ms, offset_seq LIMIT 100",
    );
    assert!(history.contains("Index"), "{history}");
    let member = plan("SELECT 1 FROM flow_members WHERE flow_id = 'f' AND user_id = 'u'");
    assert!(member.contains("flow_members_pkey"), "{member}");
    let by_user = plan("SELECT flow_id FROM flow_members WHERE user_id = 'u'");
    assert!(by_user.contains("flow_members_by_user"), "{by_user}");
}

#[tokio::test]
async fn many_more_joins_than_pool_connections_queue_without_errors() {
    let e = env().await;
    let n = node(
        &e,
        "a",
        &[
            ("FLOWGATE_DB_POOL_SIZE", "2"),
            ("FLOWGATE_DB_CONNECT_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    let values: Vec<String> = (0..60).map(|i| format!("('f{i}', 'u{i}')")).collect();
    e.pg.psql(
        &format!(
            "INSERT INTO flow_members (flow_id, user_id) VALUES {}",
            values.join(",")
        ),
        "flowgate",
    )
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = n.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(&url, &token(&format!("u{i}"), 600))
                .await
                .unwrap();
            c.emit_ack(1, "flow:join", json!({"flowId": format!("f{i}")}))
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), json!({"ok": true}));
    }
    assert_eq!(n.metric("flowgate_db_errors_total"), 0.0);
    assert!(n.metric("flowgate_db_pool_size") <= 2.0);
}

#[tokio::test]
async fn a_poisoned_queue_entry_does_not_stall_the_log() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_POLICY", "open")]).await;
    let (mut c, _) = join(&n, "w", "poison").await;
    // NUL cannot be stored in jsonb: refused at the door, never acked.
    let ack = c
        .emit_ack(2, "pod:create", json!({"pod": "a\u{0}b"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "INVALID_PAYLOAD");
    let (s, _) = api(
        &n,
        "POST",
        "/v1/flows/poison/events",
        Some(r#"{"event":"execution:token","data":"x\u0000"}"#),
    )
    .await;
    assert_eq!(s, 400);
    // An entry Postgres refuses (however it got into the queue) is set
    // aside; the events around it are written.
    let bad = json!({"flowId": "poison", "offset": "1-1", "event": "pod:created", "data": {"v": "\u{0}"}}).to_string();
    let shard = shard_stream("poison", 16);
    e.redis.cli(&["XADD", &shard, "*", "e", &bad]).unwrap();
    create_pods(&mut c, 3, |i| json!({"i": i})).await;
    let log = wait_for_log(&n, "poison", 3).await;
    assert_eq!(log.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("flowgate_eventlog_dead_letters_total") < 1.0 {
        assert!(Instant::now() < deadline, "the bad entry was not set aside");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.redis.cli(&["XLEN", &shard]).unwrap(), "0");
    // Kept aside with the database's reason, in the shard's dead letters,
    // not silently dropped.
    let dead = e
        .redis
        .cli(&["XRANGE", &format!("{shard}:dead"), "-", "+"])
        .unwrap();
    assert!(dead.contains("rows refused"), "{dead}");
    assert!(dead.contains("\"offset\":\"1-1\""), "{dead}");
}

/// The queue stream of a flow's shard among `count`: FNV-1a of the flow id,
/// written out here so that a change of the engine's hash (which would
/// move queued flows) fails a test.
fn shard_stream(flow: &str, count: u64) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flow.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{{flowgate:eventlog:{}}}", h % count)
}

/// A node's rooms, for an engine started by a test: it holds none.
struct NoRooms;

impl Deliver for NoRooms {
    fn deliver(&self, _: &str, _: Option<Offset>, _: &RoomMessage) {}
    fn local_rooms(&self) -> Vec<String> {
        Vec::new()
    }
    fn positions(&self) -> Vec<(String, Offset)> {
        Vec::new()
    }
    fn local_sessions(&self) -> Vec<LocalSession> {
        Vec::new()
    }
    fn is_member(&self, _: &str, _: &str) -> bool {
        false
    }
    fn resync(&self, _: &str) {}
}

/// The durable queue of a Redis engine started by the test itself, with no
/// node (and so no writer) competing for its entries: the test plays the
/// writers.
async fn test_queue(e: &Env, grace_ms: u64, max_bytes: u64, shards: u32) -> Arc<dyn EventQueue> {
    let engine = RedisEngine::start(
        RedisSettings {
            url: e.redis.url(),
            tls: Default::default(),
            node_id: format!("writers-{grace_ms}-{max_bytes}-{shards}"),
            rate_per_sec: 100,
            burst: 100,
            lease: 1,
            lease_for: Duration::from_secs(1),
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            presence_refresh: Duration::from_secs(5),
            presence_verify: Duration::from_secs(300),
            command_timeout: Duration::from_secs(2),
            log_len: 1000,
            log_ttl: Duration::from_secs(3600),
            bus_json: false,
            publish_linger: Duration::from_millis(1),
            queue_shards: shards,
            queue_max_len: 1000,
            queue_max_bytes: max_bytes,
            enqueue_grace: Duration::from_millis(grace_ms),
        },
        Arc::new(NoRooms),
        &prometheus::Registry::new(),
        &TaskTracker::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    engine.queue.unwrap()
}

fn queued(flow: &str, offset: &str, n: u64) -> QueuedEvent {
    QueuedEvent {
        flow_id: flow.into(),
        offset: offset.into(),
        event: "pod:created".into(),
        data: raw_json(&json!({"n": n})),
        user_id: None,
    }
}

fn logged(q: &QueuedEvent) -> LoggedEvent {
    LoggedEvent {
        flow_id: q.flow_id.clone(),
        offset: q.offset.clone(),
        event: q.event.clone(),
        data: serde_json::from_str(q.data.get()).unwrap(),
        user_id: None,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn offsets(page: &HistoryPage) -> Vec<String> {
    page.events.iter().map(|e| e.offset.clone()).collect()
}

#[tokio::test]
async fn history_paging_never_skips_an_event_that_commits_later() {
    let e = env().await;
    let s = store(&e, 2);
    let grace = 300;
    let q = test_queue(&e, grace, 1 << 20, 16).await;
    // Two events of one flow, a before b, each taken by another writer.
    let t = now_ms();
    let (a, b) = (
        queued("ooo", &format!("{t}-0"), 1),
        queued("ooo", &format!("{t}-1"), 2),
    );
    q.push(&a).await.unwrap();
    q.push(&b).await.unwrap();
    let taken_a = q.take("writer-a", 1).await.unwrap();
    let taken_b = q.take("writer-b", 1).await.unwrap();
    assert_eq!(taken_a[0].event.as_ref().unwrap().offset, a.offset);
    assert_eq!(taken_b[0].event.as_ref().unwrap().offset, b.offset);

    // Writer B commits first.
    assert_eq!(s.write_events(&[logged(&b)]).await.unwrap(), 1);
    q.ack(&[&taken_b[0]]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(grace + 100)).await;
    // Without a watermark a page would end at b, and `after=b` would skip a
    // for good once writer A commits.
    let unbounded = s.events("ooo", None, i64::MAX, 10).await.unwrap();
    assert_eq!(unbounded.len(), 1);
    let page = history(&*q, &s, "ooo", None, 10).await.unwrap();
    assert!(
        page.events.is_empty(),
        "served past a pending event: {page:?}"
    );
    assert!(page.watermark.parse::<Offset>().unwrap() <= a.offset.parse().unwrap());

    // Writer A commits: both are served, in order, and page by page.
    assert_eq!(s.write_events(&[logged(&a)]).await.unwrap(), 1);
    q.ack(&[&taken_a[0]]).await.unwrap();
    let page = history(&*q, &s, "ooo", None, 10).await.unwrap();
    assert_eq!(offsets(&page), vec![a.offset.clone(), b.offset.clone()]);
    let first = history(&*q, &s, "ooo", None, 1).await.unwrap();
    assert_eq!(first.next.as_deref(), Some(a.offset.as_str()));
    let after = first.next.unwrap().parse().ok();
    let second = history(&*q, &s, "ooo", after, 1).await.unwrap();
    assert_eq!(offsets(&second), vec![b.offset.clone()]);

    // An event not yet queued is covered by the grace: one committed at
    // once is held back until the grace has passed...
    let c = queued("ooo", &format!("{}-0", now_ms()), 3);
    q.push(&c).await.unwrap();
    let taken_c = q.take("writer-a", 10).await.unwrap();
    s.write_events(&[logged(&c)]).await.unwrap();
    q.ack(&[&taken_c[0]]).await.unwrap();
    let page = history(&*q, &s, "ooo", None, 10).await.unwrap();
    assert_eq!(page.events.len(), 2, "served within the grace: {page:?}");
    tokio::time::sleep(Duration::from_millis(grace + 100)).await;
    let page = history(&*q, &s, "ooo", None, 10).await.unwrap();
    assert_eq!(page.events.len(), 3);
    // ...and one queued later than the grace is refused, never logged.
    let late = queued("ooo", &format!("{}-0", now_ms() - 2 * grace), 4);
    assert!(matches!(q.push(&late).await, Err(PushRefused::Stale)));
    assert_eq!(q.backlog().await.unwrap(), 0);
    // Other flows are not held back by this one's pending events.
    let d = queued("other", &format!("{}-0", now_ms()), 5);
    q.push(&d).await.unwrap();
    let w_other = q.watermark("other").await.unwrap();
    let w_ooo = q.watermark("ooo").await.unwrap();
    assert!(w_other.ms <= d.offset.parse::<Offset>().unwrap().ms);
    assert!(w_ooo.ms + grace + 1000 >= now_ms());
}

#[tokio::test]
async fn the_queue_byte_cap_refuses_and_frees_on_ack() {
    let e = env().await;
    // 12 000 bytes over four shards: 3 000 for the flow's shard.
    let q = test_queue(&e, 5_000, 12_000, 4).await;
    let big = |n: u64| QueuedEvent {
        data: raw_json(&json!({"pad": "x".repeat(2_000)})),
        ..queued("cap", &format!("{}-{n}", now_ms()), n)
    };
    q.push(&big(0)).await.unwrap();
    assert!(matches!(q.push(&big(1)).await, Err(PushRefused::Full)));
    let taken = q.take("w", 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    q.ack(&[&taken[0]]).await.unwrap();
    q.push(&big(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_during_a_postgres_outage_and_drains_after() {
    let mut e = env().await;
    let n = node(
        &e,
        "a",
        &[
            ("FLOWGATE_ACCESS_POLICY", "open"),
            // 25 over five shards: the flow's shard holds 5.
            ("FLOWGATE_EVENTLOG_QUEUE_MAX", "25"),
            ("FLOWGATE_EVENTLOG_SHARDS", "5"),
            ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
            ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
        ],
    )
    .await;
    let (mut c, _) = join(&n, "w", "capped").await;
    let (mut peer, _) = join(&n, "peer", "capped").await;
    e.pg.stop_postgres();
    let mut acked = Vec::new();
    for id in 1..=8u64 {
        let ack = c
            .emit_ack(id, "pod:create", json!({"pod": {"n": id}}))
            .await
            .unwrap();
        if ack["ok"] == true {
            acked.push(id);
        } else {
            assert_eq!(ack["code"], "UNAVAILABLE", "{ack}");
        }
    }
    assert_eq!(
        acked,
        vec![1, 2, 3, 4, 5],
        "accepted up to the shard's share of the cap, then refused"
    );
    assert_eq!(
        n.metric("flowgate_eventlog_refused_total{reason=\"full\"}"),
        3.0
    );
    let shard = shard_stream("capped", 5);
    assert_eq!(e.redis.cli(&["XLEN", &shard]).unwrap(), "5");
    // A refused event reached nobody: the refusal comes before the publish.
    let (status, body) = api(
        &n,
        "POST",
        "/v1/flows/capped/events",
        Some(r#"{"event":"execution:started","data":{"run":1}}"#),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let mut relayed = Vec::new();
    while let Ok(Ok((name, data))) =
        tokio::time::timeout(Duration::from_millis(500), peer.recv_event()).await
    {
        match name.as_str() {
            "pod:created" => relayed.push(data["pod"]["n"].as_u64().unwrap()),
            "execution:started" => panic!("a refused API event was relayed"),
            _ => {}
        }
    }
    assert_eq!(relayed, acked, "only acknowledged events were relayed");

    tokio::task::block_in_place(|| e.pg.start_postgres().unwrap());
    let log = wait_for_log(&n, "capped", 5).await;
    let got: Vec<u64> = log
        .iter()
        .map(|e| e["data"]["pod"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, acked, "every acked event, no refused one");
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.redis.cli(&["XLEN", &shard]).unwrap() != "0" {
        assert!(Instant::now() < deadline, "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Drained: persisted events are accepted again.
    let ack = c
        .emit_ack(9, "pod:create", json!({"pod": {"n": 9}}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let log = wait_for_log(&n, "capped", 6).await;
    assert_eq!(log[5]["data"]["pod"]["n"], 9);
    // The refused events were not relayed late either: the log has no gap
    // to fill, and the refusals stayed refusals.
    assert_eq!(log.len(), 6);
}

#[tokio::test]
async fn unreadable_queue_entries_are_dead_lettered_and_acked() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_POLICY", "open")]).await;
    // In the legacy stream of the releases before the queue was sharded
    // (the new writer drains it, and sets its bad entries aside there).
    e.redis
        .cli(&[
            "XADD",
            "flowgate:eventlog",
            "*",
            "e",
            "{not json",
            "f",
            "dl",
        ])
        .unwrap();
    e.redis
        .cli(&["XADD", "flowgate:eventlog", "*", "x", "y"])
        .unwrap();
    let (mut c, _) = join(&n, "w", "dl").await;
    let ack = c
        .emit_ack(1, "pod:create", json!({"pod": {"i": 1}}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let log = wait_for_log(&n, "dl", 1).await;
    assert_eq!(log.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("flowgate_eventlog_dead_letters_total") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "unreadable entries not set aside"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Acknowledged and gone from the queue, nothing left pending...
    legacy_stream_drained(
        &e.redis,
        Duration::from_secs(5),
        "unreadable entries left queued",
    )
    .await;
    // ...and kept aside with the reason.
    assert_eq!(
        e.redis.cli(&["XLEN", "{flowgate:eventlog}:dead"]).unwrap(),
        "2"
    );
    let dead = e
        .redis
        .cli(&["XRANGE", "{flowgate:eventlog}:dead", "-", "+"])
        .unwrap();
    assert!(dead.contains("undecodable event"), "{dead}");
    assert!(dead.contains("no event field"), "{dead}");
    assert!(dead.contains("{not json"), "{dead}");
}

#[tokio::test]
async fn retention_drops_only_its_own_month_partitions() {
    let e = env().await;
    let s = store(&e, 2);
    let jan = 1_705_312_800_000; // 2024-01-15
    let feb = 1_707_991_200_000; // 2024-02-15
    s.write_events(&[ev("r", jan, 0), ev("r", feb, 0)])
        .await
        .unwrap();
    // What an operator may add besides ours: a default partition (with a
    // row in it), an archive, partitions whose names only look like ours
    // (all covering months before the cutoff), and tables named exactly
    // like ours that are not partitions of the log: a foreign table and an
    // ordinary one. (Postgres refuses a foreign table as a partition of
    // a table with a primary key.)
    e.pg.psql(
        "CREATE TABLE room_events_default PARTITION OF room_events DEFAULT; \
         INSERT INTO room_events VALUES ('r', 1686787200000, 0, '2023-06-15', 'x', '{}', NULL); \
         CREATE TABLE room_events_archive PARTITION OF room_events \
           FOR VALUES FROM ('2000-01-01') TO ('2001-01-01'); \
         CREATE TABLE room_events_y2023m13 PARTITION OF room_events \
           FOR VALUES FROM ('1999-01-01') TO ('1999-02-01'); \
         CREATE TABLE room_events_y2022m01_old PARTITION OF room_events \
           FOR VALUES FROM ('1998-01-01') TO ('1998-02-01'); \
         CREATE EXTENSION IF NOT EXISTS postgres_fdw; \
         CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw; \
         CREATE FOREIGN TABLE room_events_y2021m01 (id int) SERVER elsewhere; \
         CREATE TABLE room_events_y2020m01 (id int)",
        "flowgate",
    )
    .unwrap();
    let dropped = s.drop_partitions_before(2024, 2).await.unwrap();
    assert_eq!(dropped, vec!["room_events_y2024m01"]);
    let left =
        e.pg.psql(
            "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class \
             WHERE relname LIKE 'room\\_events\\_%' AND relkind IN ('r', 'f')",
            "flowgate",
        )
        .unwrap();
    assert_eq!(
        left,
        "room_events_archive,room_events_default,room_events_y2020m01,\
         room_events_y2021m01,room_events_y2022m01_old,room_events_y2023m13,room_events_y2024m02"
    );
    // The default partition's row is still served.
    let rows = s.events("r", None, i64::MAX, 10).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.offset.as_str()).collect::<Vec<_>>(),
        vec!["1686787200000-0".to_owned(), format!("{feb}-0")]
    );
    // Retention far in the future keeps everything that is not ours too.
    let dropped = s.drop_partitions_before(9999, 12).await.unwrap();
    assert_eq!(dropped, vec!["room_events_y2024m02"]);
    assert_eq!(
        e.pg.psql(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'room_events'::regclass",
            "flowgate"
        )
        .unwrap(),
        "4"
    );
}

#[tokio::test]
async fn malformed_api_parameters_are_400s_naming_the_parameter() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_POLICY", "open")]).await;
    for (query, code, param) in [
        ("limit=abc", "INVALID_LIMIT", "`limit`"),
        ("limit=1001", "INVALID_LIMIT", "`limit`"),
        ("limit=-1", "INVALID_LIMIT", "`limit`"),
        ("after=x", "INVALID_OFFSET", "`after`"),
        ("after=1-", "INVALID_OFFSET", "`after`"),
        ("after=-1-0", "INVALID_OFFSET", "`after`"),
        // Parses as a number, but no timestamp can hold it.
        ("after=9223372036854775807-0", "INVALID_OFFSET", "`after`"),
        ("after=1-99999999999999999999", "INVALID_OFFSET", "`after`"),
    ] {
        let (s, body) = api(&n, "GET", &format!("/v1/flows/f/events?{query}"), None).await;
        assert_eq!(s, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(param), "{query}: {message}");
    }
    // The largest offset Postgres can date is a valid one.
    let (s, body) = api(
        &n,
        "GET",
        &format!(
            "/v1/flows/f/events?after={}-0",
            flowgate_store::MAX_OFFSET_MS
        ),
        None,
    )
    .await;
    assert_eq!((s, body["events"].clone()), (200, json!([])), "{body}");
    for path in [
        "/v1/flows/f/members/a%00b",
        "/v1/flows/f/members/a%0Ab",
        "/v1/flows/f/members/%FF",
    ] {
        for method in ["PUT", "DELETE"] {
            let (s, body) = api(&n, method, path, None).await;
            assert_eq!(s, 400, "{method} {path}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("userId"), "{method} {path}: {message}");
        }
    }
    assert_eq!(n.metric("flowgate_db_errors_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_a_revocation_never_stays_in_the_room() {
    let e = env().await;
    let budget = [
        ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
        ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
    ];
    let a = node(&e, "a", &budget).await;
    let b = node(&e, "b", &budget).await;
    let rounds = 40;
    let mut joined_first = 0;
    for round in 0..rounds {
        let flow = format!("race{round}");
        let (s, _) = api(&a, "PUT", &format!("/v1/flows/{flow}/members/r"), None).await;
        assert_eq!(s, 200);
        let mut c = RawClient::connect(&a.ws_url(), &token("r", 600))
            .await
            .unwrap();
        // The join a little before, with or a little after the revocation.
        let jitter = rand::random::<u64>() % 6_000;
        let (join_delay, revoke_delay) = if jitter < 3_000 {
            (Duration::from_micros(jitter), Duration::ZERO)
        } else {
            (Duration::ZERO, Duration::from_micros(jitter - 3_000))
        };
        let join = async {
            tokio::time::sleep(join_delay).await;
            c.emit_ack(1, "flow:join", json!({"flowId": flow}))
                .await
                .unwrap()
        };
        let path = format!("/v1/flows/{flow}/members/r");
        let revoke = async {
            tokio::time::sleep(revoke_delay).await;
            api(&b, "DELETE", &path, None).await
        };
        let (ack, (s, body)) = tokio::join!(join, revoke);
        assert_eq!(s, 200, "{body}");
        if ack["ok"] == true {
            joined_first += 1;
        } else {
            assert_eq!(ack["code"], "FORBIDDEN", "{ack}");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (_, users) = api(&a, "GET", &format!("/v1/flows/{flow}/presence"), None).await;
            if users.as_array().is_some_and(|u| u.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: still in the room after the revocation: {users}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Out of the room for relaying too.
        let ack = c
            .emit_ack(2, "pod:delete", json!({"podId": "p"}))
            .await
            .unwrap();
        assert_eq!(ack["code"], "NOT_IN_FLOW", "round {round}: {ack}");
    }
    // Both orders happened (else the race was not exercised).
    assert!(
        0 < joined_first && joined_first < rounds,
        "joins first in {joined_first} of {rounds} rounds"
    );
}

#[tokio::test]
async fn a_refreshed_token_that_no_longer_allows_the_flow_leaves_it() {
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let n = TestNode::start(&[("REDIS_URL", &url), ("FLOWGATE_ACCESS_POLICY", "claims")])
        .await
        .unwrap();
    let claims =
        |flows: Value| token_with(json!({"userId": "u", "exp": now_secs() + 600, "flows": flows}));
    let mut c = RawClient::connect(&n.ws_url(), &claims(json!(["f1", "f2"])))
        .await
        .unwrap();
    let ack = c
        .emit_ack(1, "flow:join", json!({"flowId": "f1"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    // Still allowed: nothing changes.
    let ack = c
        .emit_ack(2, "auth:refresh", json!({"token": claims(json!(["f1"]))}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let ack = c
        .emit_ack(3, "pod:delete", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    // No longer allowed: the token is taken, the flow is left.
    c.emit("auth:refresh", json!({"token": claims(json!(["f2"]))}))
        .await
        .unwrap();
    let err = c.expect_event("error").await.unwrap();
    assert_eq!(err["code"], "FORBIDDEN");
    let ack = c
        .emit_ack(5, "pod:delete", json!({"podId": "p"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "NOT_IN_FLOW");
    let (_, users) = api(&n, "GET", "/v1/flows/f1/presence", None).await;
    assert_eq!(users, json!([]));
    // The new claims decide joins too.
    let ack = c
        .emit_ack(6, "flow:join", json!({"flowId": "f1"}))
        .await
        .unwrap();
    assert_eq!(ack["code"], "FORBIDDEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_many_flows_spread_over_shards_and_reach_the_log_once_in_order() {
    let e = env().await;
    let s = store(&e, 2);
    // Queued with no writer running, so the shards can be looked at.
    let q = test_queue(&e, 60_000, 1 << 24, 16).await;
    let flows: Vec<String> = (0..40).map(|i| format!("many{i}")).collect();
    let t = now_ms();
    for seq in 0..10 {
        for flow in &flows {
            q.push(&queued(flow, &format!("{t}-{seq}"), seq))
                .await
                .unwrap();
        }
    }
    // Each flow sits whole in exactly one shard, and the flows use many.
    let mut used = std::collections::BTreeSet::new();
    for flow in &flows {
        let mut holding = Vec::new();
        for k in 0..16 {
            let pending = format!("{{flowgate:eventlog:{k}}}:pending:{flow}");
            let n = e.redis.cli(&["ZCARD", &pending]).unwrap();
            if n != "0" {
                holding.push((k, n));
            }
        }
        assert_eq!(holding.len(), 1, "{flow} in one shard: {holding:?}");
        assert_eq!(holding[0].1, "10", "{flow}");
        assert_eq!(
            format!("{{flowgate:eventlog:{}}}", holding[0].0),
            shard_stream(flow, 16)
        );
        used.insert(holding[0].0);
    }
    assert!(used.len() >= 10, "40 flows in only {} shards", used.len());
    let queued_total: u64 = (0..16)
        .map(|k| {
            let stream = format!("{{flowgate:eventlog:{k}}}");
            e.redis
                .cli(&["XLEN", &stream])
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(queued_total, 400);
    assert!(e.redis.cli(&["EXISTS", "flowgate:eventlog"]).unwrap() == "0");
    assert_eq!(q.backlog().await.unwrap(), 400);

    // Two nodes' writers drain every shard between them.
    let a = node(&e, "a", &[]).await;
    let _b = node(&e, "b", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for flow in &flows {
        loop {
            let rows = s.events(flow, None, i64::MAX, 100).await.unwrap();
            if rows.len() >= 10 {
                let ns: Vec<u64> = rows.iter().map(|r| r.data["n"].as_u64().unwrap()).collect();
                assert_eq!(ns, (0..10).collect::<Vec<_>>(), "{flow}: once, in order");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{flow}: {} of 10 in the log",
                rows.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        e.pg.psql("SELECT count(*) FROM room_events", "flowgate")
            .unwrap(),
        "400",
        "nothing twice"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.backlog().await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "the shards did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.metric("flowgate_eventlog_queue_errors_total"), 0.0);
}

/// What a release before the sharded queue did to queue an event: one
/// stream, its byte counter and the flow's pending index.
fn push_legacy(e: &Env, flow: &str, offset: &str, n: u64) -> String {
    let json = serde_json::to_string(&queued(flow, offset, n)).unwrap();
    let id = e
        .redis
        .cli(&[
            "XADD",
            "flowgate:eventlog",
            "*",
            "e",
            &json,
            "f",
            flow,
            "o",
            offset,
        ])
        .unwrap();
    let ms = offset.split('-').next().unwrap();
    let pending = format!("{{flowgate:eventlog}}:pending:{flow}");
    e.redis.cli(&["ZADD", &pending, ms, &id]).unwrap();
    e.redis
        .cli(&[
            "INCRBY",
            "{flowgate:eventlog}:bytes",
            &json.len().to_string(),
        ])
        .unwrap();
    id
}

#[tokio::test]
async fn a_rolling_upgrade_drains_the_legacy_queue_stream() {
    let e = env().await;
    // An older node queued three events in the single stream; it took the
    // first and died before writing it (pending to it, long idle).
    let t = now_ms() - 10_000;
    let first = push_legacy(&e, "upgraded", &format!("{t}-0"), 0);
    e.redis
        .cli(&["XGROUP", "CREATE", "flowgate:eventlog", "writers", "0"])
        .unwrap();
    e.redis
        .cli(&[
            "XREADGROUP",
            "GROUP",
            "writers",
            "old-node",
            "COUNT",
            "1",
            "STREAMS",
            "flowgate:eventlog",
            ">",
        ])
        .unwrap();
    e.redis
        .cli(&[
            "XCLAIM",
            "flowgate:eventlog",
            "writers",
            "old-node",
            "0",
            &first,
            "IDLE",
            "3600000",
        ])
        .unwrap();
    push_legacy(&e, "upgraded", &format!("{t}-1"), 1);
    push_legacy(&e, "upgraded", &format!("{t}-2"), 2);

    // The new code's watermark holds the flow back at its oldest entry in
    // the legacy stream, and its backlog counts them.
    let q = test_queue(&e, 2_000, 1 << 20, 16).await;
    assert_eq!(q.watermark("upgraded").await.unwrap().ms, t);
    assert_eq!(q.backlog().await.unwrap(), 3);

    // A new node's writer drains it, the abandoned entry included, and
    // queues nothing there itself.
    let n = node(&e, "new", &[("FLOWGATE_ACCESS_POLICY", "open")]).await;
    let (mut c, _) = join(&n, "w", "upgraded").await;
    let ack = c
        .emit_ack(1, "pod:create", json!({"pod": {"n": 3}}))
        .await
        .unwrap();
    assert_eq!(ack, json!({"ok": true}));
    let log = wait_for_log(&n, "upgraded", 4).await;
    let ns: Vec<u64> = log
        .iter()
        .map(|e| {
            e["data"]["n"]
                .as_u64()
                .or_else(|| e["data"]["pod"]["n"].as_u64())
                .unwrap()
        })
        .collect();
    assert_eq!(ns, vec![0, 1, 2, 3], "each once, in order");
    legacy_stream_drained(
        &e.redis,
        Duration::from_secs(10),
        "the legacy stream did not drain",
    )
    .await;
    for key in [
        "{flowgate:eventlog}:bytes",
        "{flowgate:eventlog}:pending:upgraded",
    ] {
        assert_eq!(e.redis.cli(&["EXISTS", key]).unwrap(), "0", "{key}");
    }
    assert_eq!(n.metric("flowgate_eventlog_dead_letters_total"), 0.0);
}

/// Waits until the single (legacy) queue stream `flowgate:eventlog` is
/// empty, then checks that its writers' group has nothing pending.
async fn legacy_stream_drained(redis: &RedisServer, wait: Duration, what: &str) {
    let deadline = Instant::now() + wait;
    while redis.cli(&["XLEN", "flowgate:eventlog"]).unwrap() != "0" {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pending = redis
        .cli(&["XPENDING", "flowgate:eventlog", "writers"])
        .unwrap();
    assert!(pending.starts_with('0'), "{pending}");
}

/// A revocation needs Redis for the eviction: while Redis is unreachable
/// it is refused with 503 before the row is deleted, so the 503 means
/// nothing changed (the member still joins once Redis is back).
#[tokio::test]
async fn a_revocation_refused_while_redis_is_down_changes_nothing() {
    let mut e = env().await;
    let n = node(&e, "a", &[]).await;
    let (s, body) = api(&n, "PUT", "/v1/flows/kept/members/ada", None).await;
    assert_eq!(s, 200, "{body}");

    e.redis.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(n.addr, "GET", "/health", &[], None).await.unwrap().0 != 503 {
        assert!(Instant::now() < deadline, "health did not turn 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, body) = api(&n, "DELETE", "/v1/flows/kept/members/ada", None).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");

    e.redis.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(n.addr, "GET", "/health", &[], None).await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "health did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ack) = join(&n, "ada", "kept").await;
    assert_eq!(ack, json!({"ok": true}), "the membership is still there");
}

/// A stalled database (PgBouncer frozen: connections open, nothing
/// answers) does not hold a join for the query timeout: the membership
/// read gives up after `FLOWGATE_ACCESS_CHECK_TIMEOUT_MS` and the join is
/// refused with `UNAVAILABLE`.
#[tokio::test]
async fn a_join_during_a_database_stall_is_refused_within_the_access_check_timeout() {
    let e = env().await;
    let n = node(&e, "a", &[("FLOWGATE_ACCESS_CHECK_TIMEOUT_MS", "1000")]).await;
    // A warm pool: its connections are open when the stall begins.
    let (s, body) = api(&n, "PUT", "/v1/flows/stalled/members/ada", None).await;
    assert_eq!(s, 200, "{body}");
    e.pg.freeze_bouncer(true);
    let started = Instant::now();
    let (_, ack) = join(&n, "ada", "stalled").await;
    let took = started.elapsed();
    e.pg.freeze_bouncer(false);
    assert_eq!(ack["code"], "UNAVAILABLE", "{ack}");
    assert!(took < Duration::from_secs(4), "the join took {took:?}");
    // Thawed: the same join goes through.
    let (_, ack) = join(&n, "ada", "stalled").await;
    assert_eq!(ack, json!({"ok": true}));
}
