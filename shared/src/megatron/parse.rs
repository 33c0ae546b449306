//! Reads the `megatron:` mapping of a job file into a [`MegatronSpec`],
//! reporting every bad key and value.

use serde_yaml_ng::{Mapping, Value};

use super::flags::{FlagContext, RESERVED_KEYS, check_extra_args, check_name};
use super::table::SwiftRelease;
use super::{FlagValue, MegatronSpec, SwiftVersion};
use crate::job_file::Problems;
use crate::job_file::scalar::{as_flow_list, describe, scalar_text};

const SECTION: &str = "megatron";

/// The section as far as it is valid: bad flags are reported and left out, so
/// that the layout checks can still run on the rest.
pub(crate) fn read_megatron(value: &Value, problems: &mut Problems) -> Option<MegatronSpec> {
    let Value::Mapping(section) = value else {
        problems.at(
            &[SECTION],
            format!("must be a mapping of ms-swift flags (e.g. `load: Qwen3-8B-mcore`), got {}", describe(value)),
        );
        return None;
    };
    let version = read_swift_version(section, problems);
    let mut spec = version
        .as_ref()
        .map_or_else(|| MegatronSpec::new(SwiftVersion::V3), |(release, _)| MegatronSpec::with_release(*release));
    // With an invalid swift_version the flags are read but not checked: the
    // table they would be checked against is unknown.
    let context = version.as_ref().map(|(release, written)| FlagContext::megatron_sft(*release, written));
    if let Some(program) = read_arg_list(section, "program", problems) {
        if program.is_empty() {
            problems.at(&[SECTION, "program"], r#"must not be empty; the default is ["megatron", "sft"]"#);
        } else {
            spec.program = program;
        }
    }
    spec.extra_args = read_arg_list(section, "extra_args", problems).unwrap_or_default();
    if let Some(context) = context {
        for (index, message) in check_extra_args(context, &spec.extra_args) {
            problems.at_field(format!("{SECTION}.extra_args[{index}]"), &[SECTION, "extra_args"], message);
        }
    }

    for (key, value) in section {
        let Value::String(key) = key else {
            problems.at(&[SECTION], format!("flag names must be text, got {}", describe(key)));
            continue;
        };
        if RESERVED_KEYS.contains(&key.as_str()) {
            continue;
        }
        if !flag_name_ok(key, problems) {
            continue;
        }
        let flag = match context.map(|context| check_name(context, key)) {
            Some(Err(message)) => {
                problems.at(&[SECTION, key], message);
                continue;
            }
            Some(Ok(flag)) => Some(flag),
            None => None,
        };
        let Some(value) = read_flag_value(key, value, problems) else {
            continue;
        };
        // A value of the wrong type is reported here once and left out, so that
        // the layout checks fall back to the default instead of repeating it.
        if let Some(Err(message)) = flag.map(|flag| flag.check_value(&value)) {
            problems.at(&[SECTION, key], message);
            continue;
        }
        spec.flags.insert(key.clone(), value);
    }
    Some(spec)
}

/// `swift_version`: `3` / `4` (the newest table of that major) or a quoted
/// `"major.minor"`; absent means 3. Also returns the text as written, for
/// messages. None (and a problem) when invalid.
fn read_swift_version(section: &Mapping, problems: &mut Problems) -> Option<(SwiftRelease, String)> {
    let path = [SECTION, "swift_version"];
    let written = match section.get("swift_version") {
        None => return Some((SwiftRelease::newest(SwiftVersion::V3), "3".to_owned())),
        Some(Value::Number(number)) if number.is_f64() => {
            // YAML reads 3.10 as the float 3.1: the minor is recovered from the line when it can be.
            let typed = problems
                .written(&path)
                .filter(|text| !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.'));
            let message = match typed {
                Some(typed) => format!(
                    "{typed} is read by YAML as the number {number}, which loses the minor version; quote it: `swift_version: \"{typed}\"`"
                ),
                None => format!(
                    "is read by YAML as the number {number}, which loses the minor version (3.10 reads as 3.1); quote it, e.g. `swift_version: \"3.10\"`"
                ),
            };
            problems.at(&path, message);
            return None;
        }
        Some(Value::Number(number)) => number.to_string(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => {
            problems.at(
                &path,
                format!("must be 3, 4 or a quoted \"major.minor\" such as \"3.10\", got {}", describe(other)),
            );
            return None;
        }
    };
    match SwiftRelease::resolve(&written) {
        Ok(release) => Some((release, written.trim().to_owned())),
        Err(err) => {
            problems.at(&path, err.to_string());
            None
        }
    }
}

/// `program:` / `extra_args:`: a list of scalars. A single string is refused
/// because splitting it would need shell rules that the user did not ask for.
fn read_arg_list(section: &Mapping, key: &str, problems: &mut Problems) -> Option<Vec<String>> {
    match section.get(key)? {
        Value::Null => None,
        Value::String(line) => {
            problems.at(
                &[SECTION, key],
                format!("must be a list of arguments, not one string; write `{key}: {}`", as_flow_list(line)),
            );
            None
        }
        Value::Sequence(items) => Some(scalar_items(&format!("{SECTION}.{key}"), &[SECTION, key], items, problems)),
        other => {
            problems.at(&[SECTION, key], format!("must be a list of arguments, got {}", describe(other)));
            None
        }
    }
}

/// The text of each list element; bad elements are reported as `field[i]` and skipped.
pub(crate) fn scalar_items(field: &str, path: &[&str], items: &[Value], problems: &mut Problems) -> Vec<String> {
    let mut texts = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        match scalar_text(item) {
            Ok(text) => texts.push(text),
            Err(message) => problems.at_field(format!("{field}[{index}]"), path, message),
        }
    }
    texts
}

/// Flag names are Python identifiers written without dashes, the way the
/// ms-swift docs spell them; the layout checks look them up by that spelling.
fn flag_name_ok(key: &str, problems: &mut Problems) -> bool {
    let bare = key.trim_start_matches('-');
    let fixed = bare.replace('-', "_");
    let valid = !fixed.is_empty() && fixed.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid && fixed == key {
        return true;
    }
    let message = if valid {
        format!("write the flag as `{fixed}` (no leading dashes, underscores between words)")
    } else {
        "is not an ms-swift flag name (letters, digits and underscores)".to_owned()
    };
    problems.at(&[SECTION, key], message);
    false
}

fn read_flag_value(key: &str, value: &Value, problems: &mut Problems) -> Option<FlagValue> {
    match value {
        Value::Sequence(items) if items.is_empty() => {
            problems.at(&[SECTION, key], "is an empty list; give at least one value or remove the flag");
            None
        }
        Value::Sequence(items) => {
            let texts = scalar_items(&format!("{SECTION}.{key}"), &[SECTION, key], items, problems);
            (texts.len() == items.len()).then_some(FlagValue::List(texts))
        }
        Value::Null => {
            problems.at(&[SECTION, key], "has no value; write e.g. `true`, or remove the flag");
            None
        }
        Value::Mapping(_) => {
            problems.at(
                &[SECTION, key],
                "is a nested mapping, which no ms-swift flag takes; for a JSON-valued flag write the JSON as a quoted string",
            );
            None
        }
        scalar => match scalar_text(scalar) {
            Ok(text) => Some(FlagValue::Scalar(text)),
            Err(message) => {
                problems.at(&[SECTION, key], message);
                None
            }
        },
    }
}
