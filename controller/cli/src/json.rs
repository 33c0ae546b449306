//! `-o json`: the stable `cohort.v1` JSON schema (docs/src/cli.md, "JSON output").
//!
//! The wire types already serialize through pbjson (the proto3 JSON mapping),
//! which drops zero values, writes 64-bit integers as strings and enums as
//! `JOB_STATE_RUNNING`. Rather than a hand-written struct per verb, the value
//! pbjson gives is walked beside the message's descriptor (compiled into the
//! proto crate): each field the descriptor names is present (zero, empty, or
//! null for an unset optional or message), 64-bit integers become numbers,
//! enums the words the tables use, and `float` fields their shortest f32
//! spelling. A field added to a proto appears in the JSON with no change here.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Number, Value};

/// The schema every document names under `"schema"`; stable within it.
pub const SCHEMA: &str = "cohort.v1";

/// A wire type printed as JSON, with its full protobuf name.
pub trait Proto: serde::Serialize {
    const NAME: &'static str;
}

macro_rules! proto {
    ($($t:ident),*) => {
        $(impl Proto for cohort_proto::$t {
            const NAME: &'static str = concat!(".cohort.v1.", stringify!($t));
        })*
    };
}
proto!(
    Job,
    ListJobsResponse,
    ListNodesResponse,
    PlanJobResponse,
    PreflightTable,
    ListConversionCacheResponse,
    TrainingPoint,
    JobLogLine,
    ListQueuesResponse,
    QueueStatus,
    GetUsageResponse,
    DeleteJobResponse,
    ListNodeCachesResponse,
    NodeCache
);

/// One record in the schema, without the `"schema"` key (a JSON lines record).
pub fn record<T: Proto>(value: &T) -> anyhow::Result<Value> {
    Ok(descriptors().message(T::NAME, serde_json::to_value(value)?))
}

/// A whole document: the record with `"schema": "cohort.v1"` added.
pub fn document<T: Proto>(value: &T) -> anyhow::Result<Value> {
    let mut value = record(value)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("schema".into(), SCHEMA.into());
    }
    Ok(value)
}

/// A document of records under one key: `{"schema": "cohort.v1", "points": [...]}`.
pub fn list_document<T: Proto>(key: &str, values: &[T]) -> anyhow::Result<Value> {
    let records = values.iter().map(record).collect::<anyhow::Result<Vec<_>>>()?;
    let mut fields = Map::new();
    fields.insert("schema".into(), SCHEMA.into());
    fields.insert(key.into(), Value::Array(records));
    Ok(Value::Object(fields))
}

struct Descriptors {
    messages: HashMap<String, DescriptorProto>,
    enums: HashMap<String, EnumDescriptorProto>,
}

fn descriptors() -> &'static Descriptors {
    static DESCRIPTORS: OnceLock<Descriptors> = OnceLock::new();
    DESCRIPTORS.get_or_init(|| {
        // Compiled into the proto crate by its build script: it decodes.
        let set = FileDescriptorSet::decode(cohort_proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
        let mut all = Descriptors { messages: HashMap::new(), enums: HashMap::new() };
        for file in &set.file {
            let scope = format!(".{}", file.package());
            all.add(&scope, &file.message_type, &file.enum_type);
        }
        all
    })
}

impl Descriptors {
    fn add(&mut self, scope: &str, messages: &[DescriptorProto], enums: &[EnumDescriptorProto]) {
        for e in enums {
            self.enums.insert(format!("{scope}.{}", e.name()), e.clone());
        }
        for m in messages {
            let name = format!("{scope}.{}", m.name());
            self.add(&name, &m.nested_type, &m.enum_type);
            self.messages.insert(name, m.clone());
        }
    }

    fn message(&self, name: &str, value: Value) -> Value {
        let Some(descriptor) = self.messages.get(name) else {
            return value;
        };
        let Value::Object(mut given) = value else {
            return value;
        };
        let mut out = Map::new();
        for field in &descriptor.field {
            let value = given.remove(field.name());
            out.insert(field.name().to_owned(), self.field(field, value));
        }
        Value::Object(out)
    }

    fn field(&self, field: &FieldDescriptorProto, value: Option<Value>) -> Value {
        if field.label() == Label::Repeated {
            let entry =
                self.messages.get(field.type_name()).filter(|m| m.options.as_ref().is_some_and(|o| o.map_entry()));
            if let Some(value_field) = entry.and_then(|e| e.field.iter().find(|f| f.number() == 2)) {
                let Some(Value::Object(map)) = value else { return Value::Object(Map::new()) };
                return Value::Object(map.into_iter().map(|(k, v)| (k, self.single(value_field, v))).collect());
            }
            let Some(Value::Array(items)) = value else { return Value::Array(Vec::new()) };
            return Value::Array(items.into_iter().map(|v| self.single(field, v)).collect());
        }
        match value {
            Some(value) => self.single(field, value),
            // Unset: null where the wire tells unset from zero, else the zero value.
            None if field.proto3_optional() || field.r#type() == Type::Message || field.oneof_index.is_some() => {
                Value::Null
            }
            None => self.zero(field),
        }
    }

    fn zero(&self, field: &FieldDescriptorProto) -> Value {
        match field.r#type() {
            Type::Bool => false.into(),
            Type::String | Type::Bytes => "".into(),
            Type::Float | Type::Double => 0.0.into(),
            Type::Enum => self.single(field, Value::from(0)),
            Type::Message | Type::Group => Value::Null,
            _ => 0.into(),
        }
    }

    fn single(&self, field: &FieldDescriptorProto, value: Value) -> Value {
        match (field.r#type(), value) {
            (Type::Int64 | Type::Sint64 | Type::Sfixed64, Value::String(s)) => {
                s.parse::<i64>().map(Value::from).unwrap_or(Value::String(s))
            }
            (Type::Uint64 | Type::Fixed64, Value::String(s)) => {
                s.parse::<u64>().map(Value::from).unwrap_or(Value::String(s))
            }
            (Type::Float, Value::Number(n)) => Value::Number(shortest_f32(&n)),
            // The agents parse a rank's loss as f32 and widen it: a double that
            // is exactly an f32 is spelt as that f32 (0.2937, not 0.29369999999999996).
            (Type::Double, Value::Number(n)) if n.as_f64().is_some_and(|x| f64::from(x as f32) == x) => {
                Value::Number(shortest_f32(&n))
            }
            (Type::Enum, value) => match self.enums.get(field.type_name()) {
                Some(e) => Value::String(enum_word(e, &value)),
                None => value,
            },
            (Type::Message, value) => self.message(field.type_name(), value),
            (_, value) => value,
        }
    }
}

/// An f32 widened to f64 (0.29369999999999996) spelt as the f32 it was (0.2937).
fn shortest_f32(n: &Number) -> Number {
    n.as_f64()
        .and_then(|wide| (wide as f32).to_string().parse::<f64>().ok())
        .and_then(Number::from_f64)
        .unwrap_or_else(|| n.clone())
}

/// `JOB_STATE_RUNNING` (or 4) of enum `JobState` as the tables spell it:
/// `Running`; `..._UNSPECIFIED` and values this build does not know are `Unknown`.
fn enum_word(e: &EnumDescriptorProto, value: &Value) -> String {
    let name = match value {
        Value::String(name) => Some(name.as_str()),
        Value::Number(n) => e.value.iter().find(|v| Some(i64::from(v.number())) == n.as_i64()).map(|v| v.name()),
        _ => None,
    };
    let prefix = format!("{}_", screaming_snake(e.name()));
    match name.map(|n| n.strip_prefix(&prefix).unwrap_or(n)) {
        None | Some("UNSPECIFIED") => "Unknown".into(),
        Some(rest) => rest
            .split('_')
            .map(|word| {
                let lower = word.to_ascii_lowercase();
                let mut chars = lower.chars();
                chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
            })
            .collect(),
    }
}

/// `GpuHealthState` -> `GPU_HEALTH_STATE`.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::names::{stage_state_name, state_name};
    use cohort_proto::{Job, JobState, TrainingPoint};

    #[test]
    fn enum_words_are_the_tables_words() {
        let job_state = &descriptors().enums[".cohort.v1.JobState"];
        for v in &job_state.value {
            assert_eq!(enum_word(job_state, &Value::from(v.name())), state_name(v.number()), "{}", v.name());
        }
        let stage_state = &descriptors().enums[".cohort.v1.StageState"];
        for v in &stage_state.value {
            assert_eq!(enum_word(stage_state, &Value::from(v.name())), stage_state_name(v.number()), "{}", v.name());
        }
        assert_eq!(enum_word(job_state, &Value::from(99)), "Unknown");
    }

    #[test]
    fn zero_values_are_present_64_bit_integers_are_numbers_floats_their_f32_spelling() {
        let job = Job { state: JobState::Succeeded as i32, submitted_unix_ms: 1_700_000_000_000, ..Default::default() };
        let doc = document(&job).unwrap();
        assert_eq!(doc["schema"], "cohort.v1");
        assert_eq!(doc["state"], "Succeeded");
        assert_eq!(doc["submitted_unix_ms"], 1_700_000_000_000_i64);
        assert_eq!(doc["output_dropped_bytes"], 0);
        assert_eq!(doc["reason"], "");
        assert_eq!(doc["nodes"], 0);
        assert!(doc["processes"].as_array().is_some_and(|p| p.is_empty()), "{doc}");
        assert_eq!(doc["plan"], Value::Null);
        let widened = f64::from(0.2937_f32);
        let point =
            TrainingPoint { iteration: 0, loss: Some(widened), learning_rate: Some(3e-4), ..Default::default() };
        let rec = record(&point).unwrap();
        assert_eq!(rec["iteration"], 0);
        assert_eq!(rec["loss"].to_string(), "0.2937");
        assert_eq!(rec["learning_rate"].to_string(), "0.0003");
        assert_eq!(rec["grad_norm"], Value::Null);
        assert!(rec.get("schema").is_none());
    }

    #[test]
    fn maps_repeated_messages_and_nested_zero_values_follow_the_same_rules() {
        use cohort_proto::{GpuInfo, ListNodesResponse, Node, NodeInfo, NodeState};
        let info = NodeInfo {
            name: "node0".into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            gpus: vec![GpuInfo { index: 0, memory_total_bytes: 80 << 30, ..Default::default() }],
            ..Default::default()
        };
        let nodes = ListNodesResponse {
            nodes: vec![
                Node { info: Some(info), state: NodeState::Ready as i32, ..Default::default() },
                Node::default(),
            ],
        };
        let doc = document(&nodes).unwrap();
        let node = &doc["nodes"][0];
        assert_eq!(node["state"], "Ready");
        assert_eq!(node["info"]["labels"], serde_json::json!({"zone": "a"}));
        assert_eq!(node["info"]["gpus"][0]["index"], 0);
        assert_eq!(node["info"]["gpus"][0]["memory_total_bytes"], 80_u64 << 30);
        assert_eq!(node["cordoned"], false);
        let empty = &doc["nodes"][1];
        assert_eq!((empty["state"].as_str(), empty["info"].is_null()), (Some("Unknown"), true), "{empty}");
        assert_eq!(empty["allocated_gpus"], serde_json::json!([]));
    }
}
