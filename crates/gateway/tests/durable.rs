//! The durable side against real PostgreSQL 15 behind a real PgBouncer in
//! transaction mode (every database test goes through PgBouncer), with a
//! real Redis: migrations, memberships, the event log, partitions, faults.

use std::time::{Duration, Instant};

use flowgate_store::{LoggedEvent, Store, StoreSettings};
use flowgate_test_support::procs::{PgStack, RedisServer};
use flowgate_test_support::{http, token, RawClient, TestNode, SERVICE_TOKEN};
use serde_json::{json, Value};

struct Env {
    pg: PgStack,
    redis: RedisServer,
}

async fn env() -> Env {
    let pg = tokio::task::spawn_blocking(PgStack::start)
        .await
        .unwrap()
        .expect("postgres + pgbouncer");
    flowgate_store::migrate(&pg.direct_url())
        .await
        .expect("migrations");
    Env {
        pg,
        redis: RedisServer::start().unwrap(),
    }
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
    let auth = format!("Bearer {SERVICE_TOKEN}");
    let (s, b) = http(n.addr, method, path, &[("Authorization", &auth)], body)
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
    assert_eq!(
        flowgate_store::migrate(&pg.direct_url()).await.unwrap(),
        vec![1]
    );
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
        .events("p", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.offset)
        .collect();
    assert_eq!(left, vec![format!("{feb}-0")]);
    s.ensure_partitions_ahead().await.unwrap();
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
    e.redis
        .cli(&["XADD", "flowgate:eventlog", "*", "e", &bad])
        .unwrap();
    for i in 0..3 {
        let ack = c
            .emit_ack(10 + i, "pod:create", json!({"pod": {"i": i}}))
            .await
            .unwrap();
        assert_eq!(ack, json!({"ok": true}));
    }
    let log = wait_for_log(&n, "poison", 3).await;
    assert_eq!(log.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("flowgate_eventlog_dead_letters_total") < 1.0 {
        assert!(Instant::now() < deadline, "the bad entry was not set aside");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.redis.cli(&["XLEN", "flowgate:eventlog"]).unwrap(), "0");
}
