//! The relay table: which client events are relayed to the room, under what
//! name, with which fields, and how each is treated (rate limit, persistence,
//! volatility). CONTRACT.md's table is the built-in default; a JSON file
//! (`FLOWGATE_EVENTS_FILE`) replaces it, so adding an event is configuration.
//!
//! File format: `{"events": [ {"event": "pod:move", "emit": "pod:moved",
//! "fields": ["podId", "position"], "stamp": ["userId"], "rateLimited": true,
//! "persist": true, "volatile": false}, … ]}`.
//!
//! Pod locks are rules too: `"lock": "acquire" | "release" |
//! "releaseOnDelete"` with `"lockKey": "podId"` (the payload field that
//! names what is locked; one of `fields`). The default table locks with
//! `pod:lock`, unlocks with `pod:unlock` and releases on `pod:delete`. Both
//! keys are optional, so a file written before locks existed still loads,
//! and relays its lock events without server-owned locks, as it did.
//!
//! `"types": {"podId": "id", "position": "point"}` (optional) says what
//! shape a field must have (`events/types.rs`); the default table types
//! every field of CONTRACT.md's table.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod locks;
mod names;
mod types;

use locks::{check_lock, lock_events};
pub use locks::{LockAction, LockAnnouncement, LockEvents};
pub use names::{GATEWAY_EVENTS, RESERVED};
pub use types::FieldType;

/// Server-stamped fields; never taken from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stamp {
    /// The authenticated user id.
    #[serde(rename = "userId")]
    UserId,
    /// The sender's Socket.IO socket id.
    #[serde(rename = "socketId")]
    SocketId,
    /// The server's ISO-8601 time.
    #[serde(rename = "timestamp")]
    Timestamp,
}

impl Stamp {
    /// The field name in the outgoing payload.
    pub fn field(self) -> &'static str {
        match self {
            Stamp::UserId => "userId",
            Stamp::SocketId => "socketId",
            Stamp::Timestamp => "timestamp",
        }
    }
}

/// One row of the relay table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayRule {
    /// The event the client emits.
    pub event: String,
    /// The event the rest of the room receives.
    pub emit: String,
    /// Payload fields copied to the room; each must be present (else
    /// `INVALID_PAYLOAD`). Anything else the client sent is not relayed.
    pub fields: Vec<String>,
    /// Fields the server adds.
    #[serde(default)]
    pub stamp: Vec<Stamp>,
    /// Counts against the per-user rate limit.
    #[serde(default = "yes")]
    pub rate_limited: bool,
    /// Written to the durable event log (when one is configured).
    #[serde(default)]
    pub persist: bool,
    /// Dropped rather than queued for a slow client; not replayed.
    #[serde(default)]
    pub volatile: bool,
    /// What the event does to the lock named by `lock_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockAction>,
    /// The payload field naming the locked thing (with `lock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_key: Option<String>,
    /// The shape some of `fields` must have (else `INVALID_PAYLOAD`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub types: BTreeMap<String, FieldType>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    events: Vec<RelayRule>,
}

/// The relay table, looked up by client event name.
#[derive(Debug, Clone)]
pub struct RelayTable {
    rules: HashMap<String, Arc<RelayRule>>,
    locks: LockEvents,
}

fn rule(
    event: &str,
    emit: &str,
    fields: &[&str],
    stamp: &[Stamp],
    persist: bool,
    volatile: bool,
) -> RelayRule {
    RelayRule {
        event: event.into(),
        emit: emit.into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
        stamp: stamp.to_vec(),
        rate_limited: true,
        persist,
        volatile,
        lock: None,
        lock_key: None,
        types: BTreeMap::new(),
    }
}

/// `r` with its fields' types.
fn typed(types: &[(&str, FieldType)], r: RelayRule) -> RelayRule {
    RelayRule {
        types: types.iter().map(|(f, t)| (f.to_string(), *t)).collect(),
        ..r
    }
}

fn locking(action: LockAction, r: RelayRule) -> RelayRule {
    RelayRule {
        lock: Some(action),
        lock_key: Some("podId".into()),
        ..r
    }
}

impl RelayTable {
    /// CONTRACT.md's table.
    pub fn contract_default() -> Self {
        use FieldType::*;
        use Stamp::*;
        let rows = vec![
            rule(
                "pod:create",
                "pod:created",
                &["pod"],
                &[UserId, Timestamp],
                true,
                false,
            ),
            rule(
                "pod:update",
                "pod:updated",
                &["podId", "updates"],
                &[UserId, Timestamp],
                true,
                false,
            ),
            locking(
                LockAction::ReleaseOnDelete,
                rule(
                    "pod:delete",
                    "pod:deleted",
                    &["podId"],
                    &[UserId, Timestamp],
                    true,
                    false,
                ),
            ),
            rule(
                "pod:move",
                "pod:moved",
                &["podId", "position"],
                &[UserId],
                true,
                false,
            ),
            locking(
                LockAction::Acquire,
                rule(
                    "pod:lock",
                    "pod:locked",
                    &["podId"],
                    &[UserId, Timestamp],
                    true,
                    false,
                ),
            ),
            locking(
                LockAction::Release,
                rule(
                    "pod:unlock",
                    "pod:unlocked",
                    &["podId"],
                    &[UserId, Timestamp],
                    true,
                    false,
                ),
            ),
            rule(
                "edge:create",
                "edge:created",
                &["edge"],
                &[UserId, Timestamp],
                true,
                false,
            ),
            rule(
                "edge:delete",
                "edge:deleted",
                &["edgeId"],
                &[UserId, Timestamp],
                true,
                false,
            ),
            rule(
                "cursor:move",
                "cursor:updated",
                &["position"],
                &[UserId, SocketId],
                false,
                true,
            ),
            rule(
                "selection:change",
                "selection:changed",
                &["selectedPodIds"],
                &[UserId, SocketId],
                false,
                true,
            ),
        ];
        // What CONTRACT.md's payloads are: ids, positions, objects, lists.
        let rows = rows
            .into_iter()
            .map(|r| {
                let t: &[(&str, FieldType)] = match r.event.as_str() {
                    "pod:create" => &[("pod", Object)],
                    "pod:update" => &[("podId", Id), ("updates", Object)],
                    "pod:move" => &[("podId", Id), ("position", Point)],
                    "pod:delete" | "pod:lock" | "pod:unlock" => &[("podId", Id)],
                    "edge:create" => &[("edge", Object)],
                    "edge:delete" => &[("edgeId", Id)],
                    "cursor:move" => &[("position", Point)],
                    "selection:change" => &[("selectedPodIds", Array)],
                    _ => &[],
                };
                typed(t, r)
            })
            .collect();
        Self::from_rules(rows).expect("the built-in table is valid")
    }

    /// Reads a table file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let file: TableFile = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        Self::from_rules(file.events)
    }

    fn from_rules(rows: Vec<RelayRule>) -> Result<Self, String> {
        let mut rules = HashMap::new();
        for r in rows {
            if RESERVED.contains(&r.event.as_str()) {
                return Err(format!(
                    "{:?} is handled by the gateway and cannot be relayed",
                    r.event
                ));
            }
            if r.persist && r.volatile {
                // A volatile event has no offset, and the log is keyed by it.
                return Err(format!(
                    "{:?}: a volatile event cannot be persisted",
                    r.event
                ));
            }
            if r.event.is_empty() || r.emit.is_empty() {
                return Err("event and emit must not be empty".into());
            }
            if let Some(f) = r
                .fields
                .iter()
                .find(|f| r.stamp.iter().any(|s| s.field() == f.as_str()))
            {
                return Err(format!(
                    "{:?}: field {f:?} is stamped by the server",
                    r.event
                ));
            }
            if let Some(f) = r.types.keys().find(|f| !r.fields.contains(f)) {
                return Err(format!(
                    "{:?}: the type of {f:?} is given, but it is not one of its fields",
                    r.event
                ));
            }
            check_lock(&r)?;
            if rules.insert(r.event.clone(), Arc::new(r)).is_some() {
                return Err("an event appears twice".into());
            }
        }
        let locks = lock_events(&rules)?;
        Ok(RelayTable { rules, locks })
    }

    /// How lock changes nobody relayed are announced.
    pub fn lock_events(&self) -> &LockEvents {
        &self.locks
    }

    /// The rule of a client event.
    pub fn get(&self, event: &str) -> Option<&Arc<RelayRule>> {
        self.rules.get(event)
    }

    /// Every rule.
    pub fn rules(&self) -> impl Iterator<Item = &RelayRule> {
        self.rules.values().map(|r| &**r)
    }
}

/// Why a payload cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError(pub String);

impl RelayRule {
    /// Builds the outgoing payload: the rule's fields from the client's
    /// object, then the stamps (overwriting anything the client sent).
    pub fn build(
        &self,
        payload: Option<&Value>,
        user_id: &str,
        socket_id: &str,
        timestamp: &str,
    ) -> Result<Map<String, Value>, PayloadError> {
        let obj = payload
            .and_then(Value::as_object)
            .ok_or_else(|| PayloadError(format!("{} expects an object payload", self.event)))?;
        let mut out = Map::with_capacity(self.fields.len() + self.stamp.len());
        for f in &self.fields {
            match obj.get(f) {
                Some(v) if !v.is_null() => {
                    if let Some(t) = self.types.get(f).filter(|t| !t.admits(v)) {
                        return Err(PayloadError(format!(
                            "{}: {f} must be {}",
                            self.event,
                            t.describe()
                        )));
                    }
                    out.insert(f.clone(), v.clone());
                }
                _ => return Err(PayloadError(format!("{} requires {f}", self.event))),
            }
        }
        for s in &self.stamp {
            let v = match s {
                Stamp::UserId => user_id,
                Stamp::SocketId => socket_id,
                Stamp::Timestamp => timestamp,
            };
            out.insert(s.field().to_owned(), Value::String(v.to_owned()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_table_matches_contract() {
        let t = RelayTable::contract_default();
        assert_eq!(t.rules().count(), 10);
        let m = t.get("pod:move").unwrap();
        let out = m
            .build(
                Some(&json!({"podId": "p", "position": {"x": 1, "y": 2}, "userId": "forged", "extra": 1})),
                "u1",
                "s1",
                "t",
            )
            .unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"podId": "p", "position": {"x": 1, "y": 2}, "userId": "u1"})
        );
        assert!(t.get("cursor:move").unwrap().volatile);
        assert!(!t.get("cursor:move").unwrap().persist);
        assert!(t.get("pod:create").unwrap().persist);
    }

    #[test]
    fn missing_fields_are_refused() {
        let t = RelayTable::contract_default();
        let e = t
            .get("pod:update")
            .unwrap()
            .build(Some(&json!({"podId": "p"})), "u", "s", "t");
        assert_eq!(e.unwrap_err().0, "pod:update requires updates");
        assert!(t
            .get("pod:update")
            .unwrap()
            .build(Some(&json!([1])), "u", "s", "t")
            .is_err());
        assert!(t
            .get("pod:update")
            .unwrap()
            .build(None, "u", "s", "t")
            .is_err());
    }

    #[test]
    fn the_contracts_payload_shapes_are_checked() {
        let t = RelayTable::contract_default();
        let build = |event: &str, p: Value| t.get(event).unwrap().build(Some(&p), "u", "s", "t");
        for (event, bad) in [
            (
                "pod:move",
                json!({"podId": "p", "position": {"x": "a", "y": 2}}),
            ),
            (
                "pod:move",
                json!({"podId": {"a": 1}, "position": {"x": 1, "y": 2}}),
            ),
            ("pod:update", json!({"podId": "p", "updates": "all"})),
            (
                "pod:update",
                json!({"podId": "x".repeat(257), "updates": {}}),
            ),
            ("pod:create", json!({"pod": [1]})),
            ("edge:delete", json!({"edgeId": 1.5})),
            ("cursor:move", json!({"position": [1, 2]})),
            ("selection:change", json!({"selectedPodIds": "p1"})),
        ] {
            let e = build(event, bad.clone()).unwrap_err().0;
            assert!(e.contains(" must be "), "{event} {bad}: {e}");
        }
        for (event, good) in [
            (
                "pod:move",
                json!({"podId": 7, "position": {"x": 1.5, "y": -2}}),
            ),
            ("pod:update", json!({"podId": "p", "updates": {}})),
            (
                "cursor:move",
                json!({"position": {"x": 0, "y": 0, "zoom": 2}}),
            ),
            ("selection:change", json!({"selectedPodIds": []})),
        ] {
            assert!(build(event, good.clone()).is_ok(), "{event} {good}");
        }
        // A table file may type its own fields, only its own.
        let rule: RelayRule = serde_json::from_str(
            r#"{"event":"note:add","emit":"note:added","fields":["id","at"],"types":{"id":"id","at":"point"}}"#,
        )
        .unwrap();
        assert!(rule
            .build(Some(&json!({"id": "n", "at": {"x": 1}})), "u", "s", "t")
            .is_err());
        assert!(RelayTable::from_rules(vec![RelayRule {
            types: [("other".to_owned(), FieldType::Id)].into(),
            ..rule
        }])
        .unwrap_err()
        .contains("not one of its fields"));
        // An unknown type is a configuration error, not a field left unchecked.
        assert!(serde_json::from_str::<RelayRule>(
            r#"{"event":"a","emit":"b","fields":["id"],"types":{"id":"uuid"}}"#
        )
        .is_err());
    }

    #[test]
    fn lock_rules_are_configuration() {
        let t = RelayTable::contract_default();
        let lock = |e: &str| t.get(e).unwrap().lock;
        assert_eq!(lock("pod:lock"), Some(LockAction::Acquire));
        assert_eq!(lock("pod:unlock"), Some(LockAction::Release));
        assert_eq!(lock("pod:delete"), Some(LockAction::ReleaseOnDelete));
        assert_eq!(lock("pod:move"), None);
        assert_eq!(t.lock_events().released.emit, "pod:unlocked");
        assert_eq!(t.lock_events().acquired.as_ref().unwrap().key, "podId");

        let parse = |json: &str| {
            let file: TableFile = serde_json::from_str(json).map_err(|e| e.to_string())?;
            RelayTable::from_rules(file.events)
        };
        // A file from before locks: lock events are only relayed.
        let old =
            parse(r#"{"events":[{"event":"pod:lock","emit":"pod:locked","fields":["podId"]}]}"#)
                .unwrap();
        assert_eq!(old.get("pod:lock").unwrap().lock, None);
        let custom = parse(
            r#"{"events":[
              {"event":"node:grab","emit":"node:grabbed","fields":["nodeId"],"lock":"acquire","lockKey":"nodeId"},
              {"event":"node:drop","emit":"node:dropped","fields":["nodeId"],"lock":"release","lockKey":"nodeId"}]}"#,
        )
        .unwrap();
        assert_eq!(custom.lock_events().released.emit, "node:dropped");
        assert_eq!(custom.lock_events().released.key, "nodeId");
        for bad in [
            r#"{"events":[{"event":"a","emit":"b","fields":["x"],"lock":"acquire"}]}"#,
            r#"{"events":[{"event":"a","emit":"b","fields":["x"],"lock":"acquire","lockKey":"y"}]}"#,
            r#"{"events":[{"event":"a","emit":"b","fields":["x"],"lock":"acquire","lockKey":"x","volatile":true}]}"#,
            r#"{"events":[{"event":"a","emit":"b","fields":["x"],"lock":"grab","lockKey":"x"}]}"#,
            r#"{"events":[{"event":"a","emit":"b","fields":["x"],"lock":"release","lockKey":"x"},
                          {"event":"c","emit":"d","fields":["x"],"lock":"release","lockKey":"x"}]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_are_checked() {
        let dir = std::env::temp_dir().join(format!("flowgate-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"events":[{"event":"note:add","emit":"note:added","fields":["text"],"stamp":["userId","timestamp"]}]}"#,
        )
        .unwrap();
        let t = RelayTable::load(&good).unwrap();
        assert!(t.get("note:add").unwrap().rate_limited);
        assert!(t.get("pod:move").is_none());
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"events":[{"event":"flow:join","emit":"x","fields":[]}]}"#,
        )
        .unwrap();
        assert!(RelayTable::load(&bad)
            .unwrap_err()
            .contains("handled by the gateway"));
        std::fs::write(
            &bad,
            r#"{"events":[{"event":"a","emit":"b","fields":["userId"],"stamp":["userId"]}]}"#,
        )
        .unwrap();
        assert!(RelayTable::load(&bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
