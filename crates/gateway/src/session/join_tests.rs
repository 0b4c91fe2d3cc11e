//! `flow:join` driven without a socket, on the in-memory engine: what a
//! join of the flow a socket is already in does, and the type a `flowId`
//! is shown back in.

use serde_json::{json, Value};

use super::tests::{acks, app, events, joined_with};

#[tokio::test]
async fn a_re_join_of_the_same_flow_takes_a_new_name_and_only_then_tells_the_others() {
    let app = app(&[]).await;
    let join = json!({"flowId": "f", "userName": "Ada", "userColor": "#111111"});
    let mut a = joined_with(&app, "ada", join).await;
    let mut b = joined_with(&app, "bob", json!({"flowId": "f"})).await;
    a.read();
    b.read();

    // The same join again, and one that names nobody: answered, nobody told.
    a.send(r#"2/flows,1["flow:join",{"flowId":"f","userName":"Ada"}]"#)
        .await
        .unwrap();
    a.send(r#"2/flows,2["flow:join",{"flowId":"f"}]"#)
        .await
        .unwrap();
    let fa = a.read();
    assert_eq!(acks(&fa), [json!({"ok": true}), json!({"ok": true})]);
    assert_eq!(events(&fa, "flow:users").len(), 2);
    assert!(events(&b.read(), "user:joined").is_empty());

    // A new name: taken, shown to the joiner and told to the others, with
    // the color kept and the same socket listed once.
    a.send(r#"2/flows,3["flow:join",{"flowId":"f","userName":"Ada L."}]"#)
        .await
        .unwrap();
    let fa = a.read();
    assert_eq!(acks(&fa), [json!({"ok": true})]);
    let users = events(&fa, "flow:users")[0][0].as_array().unwrap().clone();
    let ada: Vec<&Value> = users.iter().filter(|u| u["userId"] == "ada").collect();
    assert_eq!(ada.len(), 1, "{users:?}");
    assert_eq!(ada[0]["userName"], "Ada L.");
    assert_eq!(ada[0]["userColor"], "#111111");
    let told = events(&b.read(), "user:joined");
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0][0]["userName"], "Ada L.");
    assert_eq!(told[0][0]["socketId"], ada[0]["socketId"]);
    let listed = app.engine.presence.members("flow:f").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|s| s.user_name == "Ada L."), "{listed:?}");

    // Leaving says the name the others know now.
    a.send(r#"2/flows,["flow:leave"]"#).await.unwrap();
    let left = events(&b.read(), "user:left");
    assert_eq!(left[0][0]["userName"], "Ada L.");
}

/// `flowId` comes back in the JSON type the joiner gave it; `42` and
/// `"42"` are one flow.
#[tokio::test]
async fn a_flow_id_given_as_a_number_is_shown_as_one() {
    let app = app(&[]).await;
    let mut a = joined_with(&app, "ada", json!({"flowId": 42})).await;
    let users = events(&a.read(), "flow:users");
    assert_eq!(users[0][0][0]["flowId"], json!(42));
    let mut b = joined_with(&app, "bob", json!({"flowId": "42"})).await;
    let users = events(&b.read(), "flow:users")[0][0].clone();
    assert_eq!(users.as_array().unwrap().len(), 2, "one flow: {users}");
    let ada = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["userId"] == "ada")
        .unwrap();
    assert_eq!(ada["flowId"], json!(42));
    let joined = events(&a.read(), "user:joined");
    assert_eq!(joined[0][0]["flowId"], json!("42"), "bob gave a string");
}
