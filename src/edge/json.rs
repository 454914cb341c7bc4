//! JSON to protobuf `Struct`: the claims of a validated token, as both
//! the Workload API and the Task API return them.

use prost_types::value::Kind;
use serde_json::Value;

/// JSON claims to a protobuf `Struct`.
pub fn to_struct(map: serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, value(v))).collect(),
    }
}

fn value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        // Protobuf numbers are doubles; JWT numeric dates fit exactly.
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}
