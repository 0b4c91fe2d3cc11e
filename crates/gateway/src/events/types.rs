//! The shape a relayed field must have: a rule's `types` map names, for
//! some of its fields, what peers can rely on receiving (a pod id that is
//! an id, a position with numeric `x` and `y`, a list of selected ids); a
//! payload that breaks it is refused with `INVALID_PAYLOAD` and relayed to
//! no one. A field without a type is relayed as the client sent it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest id accepted (the same bound as a lock key).
const MAX_ID_CHARS: usize = 256;

/// What a typed field must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FieldType {
    /// A string of 1-256 characters, or an integer (ids of pods, edges).
    Id,
    /// An object whose `x` and `y` are numbers (other keys are kept).
    Point,
    /// Any JSON object.
    Object,
    /// Any JSON array.
    Array,
}

impl FieldType {
    /// Whether `v` has this shape.
    pub fn admits(self, v: &Value) -> bool {
        match self {
            FieldType::Id => match v {
                Value::String(s) => !s.is_empty() && s.chars().count() <= MAX_ID_CHARS,
                Value::Number(n) => n.is_i64() || n.is_u64(),
                _ => false,
            },
            FieldType::Point => v.as_object().is_some_and(|o| {
                ["x", "y"]
                    .iter()
                    .all(|k| o.get(*k).is_some_and(Value::is_number))
            }),
            FieldType::Object => v.is_object(),
            FieldType::Array => v.is_array(),
        }
    }

    /// The refusal's wording.
    pub fn describe(self) -> &'static str {
        match self {
            FieldType::Id => "a string of 1-256 characters or an integer",
            FieldType::Point => "an object with numeric x and y",
            FieldType::Object => "an object",
            FieldType::Array => "an array",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_type_admits_its_shape_only() {
        use FieldType::*;
        for (t, yes, no) in [
            (
                Id,
                vec![json!("p1"), json!(7)],
                vec![
                    json!(""),
                    json!("x".repeat(257)),
                    json!(1.5),
                    json!({}),
                    json!(["p"]),
                    json!(true),
                ],
            ),
            (
                Point,
                vec![json!({"x": 1, "y": 2.5}), json!({"x": -1, "y": 0, "z": 3})],
                vec![
                    json!({"x": "a", "y": 2}),
                    json!({"x": 1}),
                    json!([1, 2]),
                    json!("1,2"),
                ],
            ),
            (
                Object,
                vec![json!({}), json!({"a": 1})],
                vec![json!([]), json!("o"), json!(1)],
            ),
            (
                Array,
                vec![json!([]), json!(["a", "b"])],
                vec![json!("x"), json!({}), json!(1)],
            ),
        ] {
            for v in yes {
                assert!(t.admits(&v), "{t:?} refused {v}");
            }
            for v in no {
                assert!(!t.admits(&v), "{t:?} admitted {v}");
            }
        }
    }
}
