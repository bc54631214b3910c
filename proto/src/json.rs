//! `google.protobuf.Struct`/`Value` <-> `serde_json` conversion.
//!
//! Protobuf numbers are doubles: integers beyond 2^53 lose precision on the way in, exactly as
//! they would in any JSON-over-protobuf API. Non-finite doubles have no JSON form and become null.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// A protobuf `Struct` as a JSON object.
pub fn struct_to_json(s: &Struct) -> Json {
    Json::Object(struct_to_map(s))
}

/// A protobuf `Struct` as a JSON map.
pub fn struct_to_map(s: &Struct) -> Map<String, Json> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_to_json(v)))
        .collect()
}

/// A protobuf `Value` as JSON.
pub fn value_to_json(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Integral doubles that fit in i64 become JSON integers so schemas typed `integer` accept them.
fn number_to_json(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        #[allow(clippy::cast_possible_truncation)]
        return Json::Number(Number::from(n as i64));
    }
    Number::from_f64(n).map_or(Json::Null, Json::Number)
}

/// JSON as a protobuf `Value`.
pub fn json_to_value(j: &Json) -> Value {
    let kind = match j {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(map_to_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// A JSON map as a protobuf `Struct`.
pub fn map_to_struct(m: &Map<String, Json>) -> Struct {
    Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

/// A JSON value as a protobuf `Struct`: objects map field by field; anything else is refused.
pub fn json_to_struct(j: &Json) -> Option<Struct> {
    match j {
        Json::Object(o) => Some(map_to_struct(o)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_nested_json() {
        let j = json!({"a": 1, "b": [true, null, "x", 2.5], "c": {"d": -3}});
        let s = json_to_struct(&j).expect("object");
        assert_eq!(struct_to_json(&s), j);
    }

    #[test]
    fn refuses_non_objects_as_struct() {
        assert!(json_to_struct(&json!([1, 2])).is_none());
    }
}
