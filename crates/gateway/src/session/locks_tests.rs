//! Pod locks driven without a socket, on the in-memory engine: the
//! contract's rules, and when a holder's locks are released or kept.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::tests::{acks, app, events, token, token_with, Client};
use crate::engineio::End;

async fn joined(app: &std::sync::Arc<crate::App>, user: &str, flow: &str) -> (Client, Value) {
    let mut c = Client::new(app);
    let reply = c.connect(json!({"token": token(user, 600)})).await;
    c.send(&format!(r#"2/flows,["flow:join",{{"flowId":"{flow}"}}]"#))
        .await
        .unwrap();
    c.read();
    (c, reply)
}

/// Sends `event {podId}` with an ack; returns the ack and what else the
/// sender read.
async fn lock_event(c: &mut Client, event: &str, pod: &str) -> (Value, Vec<String>) {
    c.send(&format!(r#"2/flows,9["{event}",{{"podId":"{pod}"}}]"#))
        .await
        .unwrap();
    let f = c.read();
    (acks(&f)[0].clone(), f)
}

/// Waits (for background sweeps) until `c` reads `event`; returns its args.
async fn wait_for(c: &mut Client, event: &str, within: Duration) -> Vec<Vec<Value>> {
    let until = Instant::now() + within;
    loop {
        let got = events(&c.read(), event);
        if !got.is_empty() || Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn one_holder_per_pod_and_the_refusals() {
    let app = app(&[]).await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    let (mut b, _) = joined(&app, "bob", "f").await;
    a.read();

    let (ack, _) = lock_event(&mut a, "pod:lock", "p").await;
    assert_eq!(ack, json!({"ok": true}));
    let locked = events(&b.read(), "pod:locked");
    assert_eq!(locked.len(), 1);
    assert_eq!(locked[0][0]["podId"], "p");
    assert_eq!(locked[0][0]["userId"], "ada");

    let (ack, f) = lock_event(&mut b, "pod:lock", "p").await;
    assert_eq!(ack["ok"], false);
    assert_eq!(ack["code"], "LOCKED");
    assert_eq!(events(&f, "error")[0][0]["code"], "LOCKED");
    assert!(a.read().is_empty(), "a refused lock is not relayed");

    let (ack, _) = lock_event(&mut a, "pod:lock", "p").await;
    assert_eq!(ack, json!({"ok": true}), "re-locking is fine");
    assert!(b.read().is_empty(), "and relays nothing");

    let (ack, f) = lock_event(&mut b, "pod:unlock", "p").await;
    assert_eq!(ack["code"], "NOT_LOCK_OWNER");
    assert_eq!(events(&f, "error")[0][0]["code"], "NOT_LOCK_OWNER");
    assert!(a.read().is_empty());

    let (ack, _) = lock_event(&mut a, "pod:unlock", "p").await;
    assert_eq!(ack, json!({"ok": true}));
    let unlocked = events(&b.read(), "pod:unlocked");
    assert_eq!(unlocked.len(), 1);
    assert_eq!(unlocked[0][0]["userId"], "ada");
    assert!(unlocked[0][0].get("reason").is_none(), "{unlocked:?}");

    let (ack, _) = lock_event(&mut a, "pod:unlock", "p").await;
    assert_eq!(ack, json!({"ok": true}), "unlocking a free pod is fine");
    assert!(b.read().is_empty(), "and relays nothing");

    // Now b may take it.
    assert_eq!(
        lock_event(&mut b, "pod:lock", "p").await.0,
        json!({"ok": true})
    );
}

#[tokio::test]
async fn one_socket_holds_a_bounded_number_of_locks() {
    let app = app(&[
        ("FLOWGATE_RATE_LIMIT_PER_SEC", "1000"),
        ("FLOWGATE_RATE_LIMIT_BURST", "1000"),
    ])
    .await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    for i in 0..super::locks::MAX_HELD {
        let (ack, _) = lock_event(&mut a, "pod:lock", &format!("p{i}")).await;
        assert_eq!(ack, json!({"ok": true}), "lock {i}");
    }
    let (ack, _) = lock_event(&mut a, "pod:lock", "one-more").await;
    assert_eq!(ack["code"], "LOCKED");
    let (ack, _) = lock_event(&mut a, "pod:lock", "p0").await;
    assert_eq!(ack, json!({"ok": true}), "re-locking a held pod is fine");
    lock_event(&mut a, "pod:unlock", "p0").await;
    let (ack, _) = lock_event(&mut a, "pod:lock", "one-more").await;
    assert_eq!(ack, json!({"ok": true}));
}

#[tokio::test]
async fn delete_releases_without_an_unlock_and_payloads_are_checked() {
    let app = app(&[]).await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    let (mut b, _) = joined(&app, "bob", "f").await;
    a.read();
    lock_event(&mut a, "pod:lock", "q").await;
    b.read();
    let (ack, _) = lock_event(&mut b, "pod:delete", "q").await;
    assert_eq!(ack, json!({"ok": true}));
    let fa = a.read();
    assert_eq!(events(&fa, "pod:deleted").len(), 1);
    assert!(events(&fa, "pod:unlocked").is_empty(), "{fa:?}");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());

    b.send(r#"2/flows,3["pod:lock",{"podId":{"x":1}}]"#)
        .await
        .unwrap();
    assert_eq!(acks(&b.read())[0]["code"], "INVALID_PAYLOAD");
    let mut c = Client::new(&app);
    c.connect(json!({"token": token("cid", 600)})).await;
    c.send(r#"2/flows,3["pod:lock",{"podId":"q"}]"#)
        .await
        .unwrap();
    assert_eq!(acks(&c.read())[0]["code"], "NOT_IN_FLOW");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_joiner_gets_flow_locks_right_after_flow_users() {
    let app = app(&[]).await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    lock_event(&mut a, "pod:lock", "p1").await;
    lock_event(&mut a, "pod:lock", "p2").await;
    let mut b = Client::new(&app);
    b.connect(json!({"token": token("bob", 600)})).await;
    b.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    let f = b.read();
    let names: Vec<String> = f
        .iter()
        .filter_map(|t| t.strip_prefix("42/flows,"))
        .filter_map(|j| serde_json::from_str::<Vec<Value>>(j).ok())
        .map(|a| a[0].as_str().unwrap().to_owned())
        .collect();
    let users = names.iter().position(|n| n == "flow:users").unwrap();
    assert_eq!(names.get(users + 1).map(String::as_str), Some("flow:locks"));
    let locks = events(&f, "flow:locks")[0][0].as_array().unwrap().clone();
    let pods: Vec<&str> = locks.iter().map(|l| l["podId"].as_str().unwrap()).collect();
    assert_eq!(pods, ["p1", "p2"]);
    for l in &locks {
        assert_eq!(l["userId"], "ada");
        assert!(l["lockedAt"].as_str().unwrap().ends_with('Z'), "{l}");
        assert_eq!(l.as_object().unwrap().len(), 3);
    }
}

#[tokio::test]
async fn leaving_or_an_unrecoverable_end_releases_with_a_reason() {
    let app = app(&[]).await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    let (mut b, _) = joined(&app, "bob", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    lock_event(&mut a, "pod:lock", "pa").await;
    lock_event(&mut b, "pod:lock", "pb").await;
    w.read();

    a.send(r#"2/flows,["flow:leave",{}]"#).await.unwrap();
    let fw = w.read();
    let unlocked = events(&fw, "pod:unlocked");
    assert_eq!(unlocked.len(), 1, "{fw:?}");
    let u = &unlocked[0][0];
    assert_eq!(
        (u["podId"].clone(), u["userId"].clone(), u["reason"].clone()),
        (json!("pa"), json!("ada"), json!("released"))
    );
    assert!(u["timestamp"].as_str().unwrap().ends_with('Z'));
    // The release comes before the user:left.
    let order: Vec<&String> = fw
        .iter()
        .filter(|f| f.contains("pod:unlocked") || f.contains("user:left"))
        .collect();
    assert!(order[0].contains("pod:unlocked"), "{order:?}");

    b.session.close(&End::Protocol("test", String::new())).await;
    let unlocked = events(&w.read(), "pod:unlocked");
    assert_eq!(unlocked[0][0]["podId"], "pb");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_revoked_member_loses_its_locks() {
    let app = app(&[]).await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    lock_event(&mut a, "pod:lock", "p").await;
    w.read();
    // What the connection does when the room's eviction reaches it.
    a.session.on_evicted("flow:f").await;
    assert_eq!(events(&a.read(), "error")[0][0]["code"], "FORBIDDEN");
    let unlocked = events(&w.read(), "pod:unlocked");
    assert_eq!(unlocked[0][0]["reason"], "released");

    // A user who is away when revoked: the API releases its locks.
    let (mut b, _) = joined(&app, "bob", "f").await;
    lock_event(&mut b, "pod:lock", "q").await;
    b.session.close(&End::ClientClosed).await;
    w.read();
    crate::lock_keeper::release_user_locks(&app, "flow:f", "bob").await;
    assert_eq!(events(&w.read(), "pod:unlocked")[0][0]["podId"], "q");
}

#[tokio::test]
async fn a_lost_connection_keeps_its_locks_for_the_window_only() {
    let app = app(&[
        ("FLOWGATE_RECOVERY_WINDOW_MS", "150"),
        ("FLOWGATE_NODE_HEARTBEAT_MS", "20"),
    ])
    .await;
    let (mut a, _) = joined(&app, "ada", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    lock_event(&mut a, "pod:lock", "p").await;
    a.session.close(&End::ClientClosed).await;
    let left_at = Instant::now();
    let fw = w.read();
    assert_eq!(events(&fw, "user:left").len(), 1);
    assert!(
        events(&fw, "pod:unlocked").is_empty(),
        "kept for the window"
    );
    assert_eq!(app.engine.locks.list("flow:f").await.unwrap().len(), 1);

    let unlocked = wait_for(&mut w, "pod:unlocked", Duration::from_secs(2)).await;
    assert!(left_at.elapsed() >= Duration::from_millis(150));
    assert_eq!(unlocked[0][0]["reason"], "released");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_recovered_session_keeps_its_locks() {
    let app = app(&[
        ("FLOWGATE_RECOVERY_WINDOW_MS", "300"),
        ("FLOWGATE_NODE_HEARTBEAT_MS", "20"),
    ])
    .await;
    let (mut a, first) = joined(&app, "ada", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    lock_event(&mut a, "pod:lock", "p").await;
    a.session.close(&End::ClientClosed).await;
    w.read();

    let mut a2 = Client::new(&app);
    let reply = a2
        .connect(json!({"token": token("ada", 600), "pid": first["pid"]}))
        .await;
    assert_eq!(reply, first, "recovered");
    // Well past the window: the lock lives on with its recovered holder.
    let unlocked = wait_for(&mut w, "pod:unlocked", Duration::from_millis(600)).await;
    assert!(unlocked.is_empty(), "{unlocked:?}");
    assert_eq!(app.engine.locks.list("flow:f").await.unwrap().len(), 1);
    // The replaced connection's late end releases nothing.
    a.session.close(&End::Protocol("late", String::new())).await;
    assert_eq!(app.engine.locks.list("flow:f").await.unwrap().len(), 1);
    // And the recovered session still holds it.
    let (ack, _) = lock_event(&mut a2, "pod:unlock", "p").await;
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(events(&w.read(), "pod:unlocked").len(), 1);
}

/// A session recovered after its membership was revoked comes back
/// without its flow: its locks there are released at once (announced as
/// `released`), not kept until the window ends.
#[tokio::test]
async fn a_session_recovered_without_its_flow_releases_its_locks_at_once() {
    let app = app(&[
        ("FLOWGATE_ACCESS_POLICY", "claims"),
        ("FLOWGATE_RECOVERY_WINDOW_MS", "60000"),
    ])
    .await;
    let member =
        |user: &str, flows: Value| token_with(json!({"userId": user, "flows": flows}), 600);
    let mut a = Client::new(&app);
    let first = a
        .connect(json!({"token": member("ada", json!(["f"]))}))
        .await;
    a.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    let mut w = Client::new(&app);
    w.connect(json!({"token": member("wat", json!(["f"]))}))
        .await;
    w.send(r#"2/flows,["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    lock_event(&mut a, "pod:lock", "p").await;
    a.session.close(&End::ClientClosed).await;
    w.read();

    let mut a2 = Client::new(&app);
    let (reply, f) = a2
        .connect_reading(json!({"token": member("ada", json!([])), "pid": first["pid"]}))
        .await;
    assert_eq!(reply, first, "recovered, without the flow");
    assert_eq!(events(&f, "error")[0][0]["code"], "FORBIDDEN");
    let unlocked = wait_for(&mut w, "pod:unlocked", Duration::from_millis(500)).await;
    assert_eq!(unlocked.len(), 1, "released at once");
    assert_eq!(unlocked[0][0]["podId"], "p");
    assert_eq!(unlocked[0][0]["reason"], "released");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());
}

/// A recovery that becomes a new session (here: the room log lost the
/// gap) ends the old session for good: its locks go at once too.
#[tokio::test]
async fn a_recovery_that_becomes_a_new_session_releases_the_old_sessions_locks() {
    let app = app(&[
        ("FLOWGATE_ROOM_LOG_LEN", "2"),
        ("FLOWGATE_RECOVERY_WINDOW_MS", "60000"),
    ])
    .await;
    let (mut a, first) = joined(&app, "ada", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    lock_event(&mut a, "pod:lock", "p").await;
    a.session.close(&End::ClientClosed).await;
    for i in 0..5 {
        w.send(&format!(
            r#"2/flows,["pod:move",{{"podId":"m{i}","position":{{"x":0,"y":0}}}}]"#
        ))
        .await
        .unwrap();
    }
    w.read();

    let mut a2 = Client::new(&app);
    let reply = a2
        .connect(json!({"token": token("ada", 600), "pid": first["pid"]}))
        .await;
    assert_ne!(reply["pid"], first["pid"], "a new session");
    let unlocked = wait_for(&mut w, "pod:unlocked", Duration::from_millis(500)).await;
    assert_eq!(unlocked.len(), 1, "released at once");
    assert_eq!(unlocked[0][0]["reason"], "released");
    assert!(app.engine.locks.list("flow:f").await.unwrap().is_empty());
}

#[tokio::test]
async fn two_tabs_of_one_user_share_the_lock_until_both_are_gone() {
    let app = app(&[("FLOWGATE_PRESENCE_REFRESH_MS", "20")]).await;
    let (mut t1, _) = joined(&app, "ada", "f").await;
    let (mut t2, _) = joined(&app, "ada", "f").await;
    let (mut w, _) = joined(&app, "wat", "f").await;
    t1.read();
    lock_event(&mut t1, "pod:lock", "p").await;
    let (ack, _) = lock_event(&mut t2, "pod:lock", "p").await;
    assert_eq!(ack, json!({"ok": true}), "already held by the same user");
    assert_eq!(events(&w.read(), "pod:locked").len(), 1);

    t1.send(r#"2/flows,["flow:leave",{}]"#).await.unwrap();
    assert!(events(&w.read(), "pod:unlocked").is_empty(), "t2 holds it");
    assert_eq!(app.engine.locks.list("flow:f").await.unwrap().len(), 1);
    t2.send(r#"2/flows,["flow:leave",{}]"#).await.unwrap();
    assert_eq!(
        events(&w.read(), "pod:unlocked")[0][0]["reason"],
        "released"
    );

    // One tab unlocks what both held: the other forgets it at its refresh.
    let (mut t3, _) = joined(&app, "ada", "g").await;
    let (mut t4, _) = joined(&app, "ada", "g").await;
    lock_event(&mut t3, "pod:lock", "r").await;
    lock_event(&mut t4, "pod:lock", "r").await;
    lock_event(&mut t4, "pod:unlock", "r").await;
    let held = |c: &Client| {
        c.session
            .socket
            .as_ref()
            .unwrap()
            .flow
            .as_ref()
            .unwrap()
            .locks
            .holds("r")
    };
    assert!(held(&t3));
    let at = t3.session.deadline().unwrap();
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
    t3.session.on_timer(Instant::now()).await.unwrap();
    assert!(!held(&t3), "dropped what the other tab released");
    assert!(t3.session.locks_deadline().is_none());
    assert!(app.engine.locks.list("flow:g").await.unwrap().is_empty());
}
