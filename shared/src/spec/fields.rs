//! Readers for the job file's structured fields: the name, `env`,
//! `node_selector` and `command`; each reports its own problems.

use indexmap::IndexMap;
use serde_yaml_ng::{Mapping, Value};
use std::collections::{BTreeMap, BTreeSet};

use super::{CommandSpec, LaunchMode, MAX_NAME_LEN, RESERVED_ENV, RESERVED_ENV_PREFIX, typed};
use crate::job_file::Problems;
use crate::job_file::scalar::{as_flow_list, describe, scalar_text};
use crate::megatron::parse::scalar_items;

pub(super) fn check_name(name: &str, problems: &mut Problems) {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid = name.len() <= MAX_NAME_LEN
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    if valid {
        return;
    }
    let mut message = format!(
        "{name:?} is not a valid job name: use lowercase letters, digits and '-', starting and ending with a letter or digit, at most {MAX_NAME_LEN} characters"
    );
    let fixed = sanitize_name(name);
    if !fixed.is_empty() {
        message.push_str(&format!(", e.g. {fixed:?}"));
    }
    problems.at(&["name"], message);
}

/// The nearest valid name: lowercase, runs of other characters become one '-'.
fn sanitize_name(name: &str) -> String {
    let mut fixed = String::new();
    for c in name.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            fixed.push(c);
        } else if !fixed.ends_with('-') {
            fixed.push('-');
        }
    }
    fixed.truncate(MAX_NAME_LEN);
    fixed.trim_matches('-').to_owned()
}

/// Which processes get a reserved variable, for the refusal's words.
fn reserved_env_scope(key: &str) -> &'static str {
    match key {
        "RANK" | "LOCAL_RANK" | "LOCAL_WORLD_SIZE" | "GROUP_RANK" => "for each process of a per-rank launch",
        _ => "for every process, like NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT",
    }
}

/// The job's `env`, and the names of the values marked secret
/// (`NAME: {value: ..., secret: true}`).
pub(super) fn read_env(root: &Mapping, problems: &mut Problems) -> (IndexMap<String, String>, BTreeSet<String>) {
    let mut env = IndexMap::new();
    let mut secrets = BTreeSet::new();
    let Some(entries) = string_keyed_mapping(root, "env", "a mapping of NAME: value", problems) else {
        return (env, secrets);
    };
    for (key, value) in entries {
        if !super::is_env_name(key) {
            problems.at(&["env", key], format!("{key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"));
        } else if RESERVED_ENV.contains(&key) || key.starts_with(RESERVED_ENV_PREFIX) {
            problems
                .at(&["env", key], format!("{key} is set by Cohort ({}); remove it from env", reserved_env_scope(key)));
        }
        let value = match value {
            Value::Mapping(entry) => match secret_entry(entry) {
                Ok((value, secret)) => {
                    if secret {
                        secrets.insert(key.to_owned());
                    }
                    value
                }
                Err(message) => {
                    problems.at(&["env", key], message);
                    continue;
                }
            },
            other => other,
        };
        match scalar_text(value) {
            Ok(text) => {
                env.insert(key.to_owned(), text);
            }
            Err(message) => problems.at(&["env", key], message),
        }
    }
    (env, secrets)
}

/// `{value: ..., secret: true}`: the value, and whether it is secret.
fn secret_entry(entry: &Mapping) -> Result<(&Value, bool), String> {
    let mut value = None;
    let mut secret = false;
    for (k, v) in entry {
        match (k.as_str(), v) {
            (Some("value"), v) => value = Some(v),
            (Some("secret"), Value::Bool(b)) => secret = *b,
            (Some("secret"), _) => return Err("`secret` must be true or false".to_owned()),
            _ => {
                return Err(
                    "a mapping here takes only `value` and `secret`, e.g. {value: hf_xxx, secret: true}".to_owned()
                );
            }
        }
    }
    value.map(|v| (v, secret)).ok_or_else(|| "has no `value`; write {value: ..., secret: true}".to_owned())
}

pub(super) fn read_node_selector(root: &Mapping, problems: &mut Problems) -> BTreeMap<String, String> {
    let mut selector = BTreeMap::new();
    let Some(entries) = string_keyed_mapping(root, "node_selector", "a mapping of label: value", problems) else {
        return selector;
    };
    for (key, value) in entries {
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            problems.at(&["node_selector"], format!("label {key:?} must be non-empty and without spaces"));
            continue;
        }
        match scalar_text(value) {
            Ok(text) => {
                selector.insert(key.to_owned(), text);
            }
            Err(message) => problems.at(&["node_selector", key], message),
        }
    }
    selector
}

/// The entries of a mapping-valued field whose keys are text; others are reported.
fn string_keyed_mapping<'m>(
    root: &'m Mapping,
    field: &str,
    expected: &str,
    problems: &mut Problems,
) -> Option<Vec<(&'m str, &'m Value)>> {
    match root.get(field)? {
        Value::Null => None,
        Value::Mapping(entries) => Some(
            entries
                .iter()
                .filter_map(|(key, value)| match key.as_str() {
                    Some(key) => Some((key, value)),
                    None => {
                        problems.at(&[field], format!("keys must be text, got {}", describe(key)));
                        None
                    }
                })
                .collect(),
        ),
        other => {
            problems.at(&[field], format!("must be {expected}, got {}", describe(other)));
            None
        }
    }
}

pub(super) fn read_command(root: &Mapping, problems: &mut Problems) -> Option<CommandSpec> {
    let launch = typed::<LaunchMode>(root, "launch", problems).unwrap_or(LaunchMode::PerNode);
    let argv = match root.get("command") {
        None | Some(Value::Null) => {
            problems.at(&["command"], "is required for kind command: a list such as [python3, train.py]");
            return None;
        }
        Some(Value::String(line)) => {
            problems.at(
                &["command"],
                format!(
                    "must be a list of arguments, not one string (Cohort runs no shell to split it); write `command: {}`",
                    as_flow_list(line)
                ),
            );
            return None;
        }
        Some(Value::Sequence(items)) if items.is_empty() => {
            problems.at(&["command"], "is empty; give the program and its arguments");
            return None;
        }
        Some(Value::Sequence(items)) => {
            let argv = scalar_items("command", &["command"], items, problems);
            (argv.len() == items.len()).then_some(argv)?
        }
        Some(other) => {
            problems.at(&["command"], format!("must be a list of arguments, got {}", describe(other)));
            return None;
        }
    };
    let checkpoints = typed::<String>(root, "checkpoints", problems);
    if let Some(dir) = checkpoints.as_deref().filter(|d| !d.starts_with('/')) {
        problems.at(
            &["checkpoints"],
            format!("{dir:?} must be an absolute path (a directory every node sees), e.g. /shared/ckpt/run1"),
        );
    }
    Some(CommandSpec { argv, launch, checkpoints })
}
