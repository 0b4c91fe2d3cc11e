//! A flow id: the text its room is named by, and whether the client gave
//! it as a JSON integer, so that `flowId` is shown back in the type the
//! front end used (`42`, not `"42"`), as the old gateway echoed it.

/// A flow id as text, and whether the client gave it as a JSON integer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlowId {
    /// The id as text: the room is `flow:<text>`.
    pub text: String,
    /// Given (and shown) as an integer.
    pub integer: bool,
}

impl FlowId {
    /// A flow id given as a string.
    pub fn text(s: impl Into<String>) -> Self {
        FlowId {
            text: s.into(),
            integer: false,
        }
    }
}

impl From<&str> for FlowId {
    fn from(s: &str) -> Self {
        FlowId::text(s)
    }
}

impl From<String> for FlowId {
    fn from(s: String) -> Self {
        FlowId::text(s)
    }
}

impl std::ops::Deref for FlowId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `flowId` as a JSON integer when it was given as one, else a string.
pub(crate) mod json {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::FlowId;

    pub(crate) fn serialize<S: Serializer>(id: &FlowId, s: S) -> Result<S::Ok, S::Error> {
        if id.integer {
            if let Ok(n) = id.text.parse::<i64>() {
                return s.serialize_i64(n);
            }
            if let Ok(n) = id.text.parse::<u64>() {
                return s.serialize_u64(n);
            }
        }
        s.serialize_str(&id.text)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FlowId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Int(i64),
            Uint(u64),
            Text(String),
        }
        Ok(match Either::deserialize(d)? {
            Either::Int(n) => FlowId {
                text: n.to_string(),
                integer: true,
            },
            Either::Uint(n) => FlowId {
                text: n.to_string(),
                integer: true,
            },
            Either::Text(t) => FlowId::text(t),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::SessionInfo;

    fn info(flow: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "userId": "u", "socketId": "s", "userName": "n", "userColor": "c", "joinedAt": "t"
        });
        v["flowId"] = flow;
        v
    }

    #[test]
    fn a_flow_id_keeps_its_json_type_through_a_round_trip() {
        for flow in [
            serde_json::json!(42),
            serde_json::json!("42"),
            serde_json::json!("f-1"),
        ] {
            let s: SessionInfo = serde_json::from_value(info(flow.clone())).unwrap();
            assert_eq!(s.flow_id.text, flow.to_string().trim_matches('"'));
            assert_eq!(serde_json::to_value(&s).unwrap()["flowId"], flow);
        }
        let big = serde_json::json!(u64::MAX);
        let s: SessionInfo = serde_json::from_value(info(big.clone())).unwrap();
        assert_eq!(serde_json::to_value(&s).unwrap()["flowId"], big);
    }
}
