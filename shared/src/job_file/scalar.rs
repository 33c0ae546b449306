//! YAML scalars as command-line text: what a user typed as `lr: 1e-5` or
//! `finetune: true` must reach ms-swift's argparse (or an env var) with the
//! same meaning.

use serde_yaml_ng::Value;

/// The command-line text of a YAML scalar: strings as-is, integers as their
/// digits, floats in Rust's shortest round-trip form (`1e-5`, `0.01`, `3.0`),
/// bools as `true`/`false`. Anything else is an error message about the value.
pub(crate) fn scalar_text(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Bool(flag) => Ok(flag.to_string()),
        Value::Number(number) => Ok(if let Some(unsigned) = number.as_u64() {
            unsigned.to_string()
        } else if let Some(signed) = number.as_i64() {
            signed.to_string()
        } else {
            float_text(number.as_f64().unwrap_or(f64::NAN))
        }),
        Value::Null => Err(r#"has no value; give one, or write "" for an empty string"#.to_owned()),
        Value::Sequence(_) => Err("is a list; expected a single string, number or boolean".to_owned()),
        Value::Mapping(_) => Err("is a mapping; expected a string, number or boolean".to_owned()),
        Value::Tagged(tagged) => Err(format!("has a YAML tag {}; tags are not supported", tagged.tag)),
    }
}

/// Python's `float()` reads Rust's `{:?}` form of every finite f64 back exactly.
fn float_text(value: f64) -> String {
    if value.is_nan() {
        "nan".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// A short description of a YAML value for messages, e.g. `the string "x y"`.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("the string {text:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Null => "nothing (null)".to_owned(),
        other => scalar_text(other).unwrap_or_else(|_| "a tagged value".to_owned()),
    }
}

/// The YAML flow list that splits `line` on whitespace, offered as the fix when a
/// list of arguments was written as one string: `["python3", "x.py"]`.
pub(crate) fn as_flow_list(line: &str) -> String {
    let items: Vec<String> = line.split_whitespace().map(|word| format!("{word:?}")).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn text_of(yaml: &str) -> String {
        scalar_text(&serde_yaml_ng::from_str::<Value>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn scalars_keep_their_command_line_meaning() {
        assert_eq!(text_of("1e-5"), "1e-5");
        assert_eq!(text_of("1e-6"), "1e-6");
        assert_eq!(text_of("0.01"), "0.01");
        assert_eq!(text_of("0.05"), "0.05");
        assert_eq!(text_of("3.0"), "3.0");
        assert_eq!(text_of("2048"), "2048");
        assert_eq!(text_of("-7"), "-7");
        assert_eq!(text_of("true"), "true");
        assert_eq!(text_of("false"), "false");
        assert_eq!(text_of("expandable_segments:True"), "expandable_segments:True");
        assert_eq!(text_of("'007'"), "007");
        assert_eq!(text_of("007"), "007");
        assert_eq!(text_of(".inf"), "inf");
    }

    #[test]
    fn non_scalars_are_errors() {
        for yaml in ["~", "[1, 2]", "{a: 1}", "!tag x"] {
            let value: Value = serde_yaml_ng::from_str(yaml).unwrap();
            assert!(scalar_text(&value).is_err(), "{yaml}");
        }
    }

    #[test]
    fn flow_list_fix_quotes_each_word() {
        assert_eq!(as_flow_list("python3  x.py --a=1"), r#"["python3", "x.py", "--a=1"]"#);
    }
}
