//! `array:`, a job array as Slurm's `--array`: `array: 0-7` makes eight
//! jobs of the one file, `0-15%4` runs at most four of them at once, `1,3,8-9`
//! names indices one by one. Each element is a job of its own, of the file's
//! name (as Slurm's), with the id `<array id>_<index>` and `COHORT_ARRAY_ID`
//! and `COHORT_ARRAY_INDEX` in its environment.

use indexmap::IndexMap;
use serde_yaml_ng::{Mapping, Value};

use super::typed;
use crate::job_file::Problems;
use crate::job_file::scalar::scalar_text;

/// The most elements one array may have (Slurm's default MaxArraySize is 1001).
pub const MAX_ARRAY_SIZE: usize = 1000;
/// The highest index an element may have.
pub const MAX_ARRAY_INDEX: u32 = 999_999;

/// A parsed `array:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArraySpec {
    /// The elements' indices, ascending, each once.
    pub indices: Vec<u32>,
    /// At most this many elements hold GPUs at once (`%N`); None: no limit.
    pub max_running: Option<u32>,
}

/// Reads `0-7`, `0-15%4`, `1,3,8-9`; the error says what is wrong and the form to write.
pub fn parse_array(text: &str) -> Result<ArraySpec, String> {
    let form = "write a range such as `0-7`, a list such as `1,3,5`, optionally with `%N` to run at most N at once";
    let (list, limit) = match text.split_once('%') {
        Some((list, limit)) => (list, Some(limit.trim())),
        None => (text, None),
    };
    let max_running = match limit {
        None => None,
        Some(limit) => match limit.parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(format!("{text:?}: the limit after % must be a whole number above 0; {form}")),
        },
    };
    let mut indices = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        let number = |s: &str| {
            s.trim().parse::<u32>().ok().filter(|n| *n <= MAX_ARRAY_INDEX).ok_or_else(|| {
                format!("{text:?}: {s:?} is not an index (a whole number up to {MAX_ARRAY_INDEX}); {form}")
            })
        };
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(part)?, number(part)?),
        };
        if first > last {
            return Err(format!("{text:?}: the range {part} runs backwards; write {last}-{first}"));
        }
        if (last - first) as usize >= MAX_ARRAY_SIZE || indices.len() + (last - first) as usize >= MAX_ARRAY_SIZE {
            return Err(format!("{text:?}: more than {MAX_ARRAY_SIZE} elements; split it into several arrays"));
        }
        indices.extend(first..=last);
    }
    indices.sort_unstable();
    indices.dedup();
    Ok(ArraySpec { indices, max_running })
}

/// `sweep:` as read: each variable with its values as text, in file order.
pub type Sweep = Vec<(String, Vec<String>)>;

/// `sweep: {LR: [1e-4, 3e-4], SEED: [1, 2]}`: an array of every combination
/// (the last variable varies fastest), each element given its values as env.
pub(super) fn read_sweep(root: &Mapping, env: &IndexMap<String, String>, problems: &mut Problems) -> Sweep {
    let Some(value) = root.get("sweep").filter(|v| !v.is_null()) else { return Vec::new() };
    let Value::Mapping(entries) = value else {
        problems.at(&["sweep"], "must be a mapping of NAME: [values], e.g. {LR: [1e-4, 3e-4]}");
        return Vec::new();
    };
    let mut sweep = Vec::new();
    let mut count: usize = 1;
    for (key, values) in entries {
        let Some(name) = key.as_str().filter(|k| super::is_env_name(k)) else {
            problems.at(&["sweep"], "each key is an environment variable name ([A-Za-z_][A-Za-z0-9_]*)");
            continue;
        };
        let at = ["sweep", name];
        if super::RESERVED_ENV.contains(&name) || name.starts_with(super::RESERVED_ENV_PREFIX) || env.contains_key(name)
        {
            problems.at(&at, format!("{name} is set by Cohort or by `env`; sweep another name"));
            continue;
        }
        let texts: Result<Vec<String>, String> = match values {
            Value::Sequence(items) if !items.is_empty() => items.iter().map(scalar_text).collect(),
            _ => Err("must be a non-empty list of values, e.g. [1e-4, 3e-4]".to_owned()),
        };
        match texts {
            Ok(texts) => {
                count = count.saturating_mul(texts.len());
                sweep.push((name.to_owned(), texts));
            }
            Err(message) => problems.at(&at, message),
        }
    }
    if count > MAX_ARRAY_SIZE {
        problems.at(&["sweep"], format!("makes {count} combinations; at most {MAX_ARRAY_SIZE}: sweep fewer values"));
        return Vec::new();
    }
    sweep
}

/// The values of element `index` of a sweep (the last variable varies fastest).
pub fn sweep_values(sweep: &[(String, Vec<String>)], index: u32) -> Vec<(String, String)> {
    let mut rest = index as usize;
    let mut values: Vec<(String, String)> = sweep
        .iter()
        .rev()
        .map(|(name, texts)| {
            let value = texts[rest % texts.len()].clone();
            rest /= texts.len();
            (name.clone(), value)
        })
        .collect();
    values.reverse();
    values
}

/// `array:`: a string (`0-7%2`) or a whole number (`8`: 0-7). With a
/// `sweep:` it is only the limit (`%2`): the sweep makes the indices.
pub(super) fn read_array(root: &Mapping, sweep: &Sweep, problems: &mut Problems) -> Option<ArraySpec> {
    let combinations = sweep.iter().map(|(_, v)| v.len()).product::<usize>();
    let swept = (!sweep.is_empty()).then(|| (0..combinations as u32).collect::<Vec<u32>>());
    let Some(value) = root.get("array").filter(|v| !v.is_null()) else {
        return swept.map(|indices| ArraySpec { indices, max_running: None });
    };
    if let Some(indices) = swept {
        let limit = value.as_str().and_then(|t| t.strip_prefix('%')).and_then(|n| n.trim().parse::<u32>().ok());
        return match limit {
            Some(n) if n > 0 => Some(ArraySpec { indices, max_running: Some(n) }),
            _ => {
                problems.at(&["array"], "with `sweep:` it sets only the limit, e.g. `%4`; the sweep makes the indices");
                None
            }
        };
    }
    let text = match value.as_u64() {
        Some(0) => {
            problems.at(&["array"], "must have at least one element, e.g. `0-7`");
            return None;
        }
        Some(n) => format!("0-{}", n - 1),
        None => typed::<String>(root, "array", problems)?,
    };
    parse_array(&text).map_err(|message| problems.at(&["array"], message)).ok()
}

/// An element's job file: the array's YAML without `array:` and `sweep:`,
/// with `values` (its sweep values) added to `env`.
pub fn element_yaml(yaml: &str, values: &[(String, String)]) -> Result<String, serde_yaml_ng::Error> {
    let mut map: Mapping = serde_yaml_ng::from_str(yaml)?;
    map.remove("array");
    map.remove("sweep");
    if !values.is_empty() {
        let env = map.entry("env".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
        if let Value::Mapping(env) = env {
            for (name, value) in values {
                env.insert(name.as_str().into(), value.as_str().into());
            }
        }
    }
    serde_yaml_ng::to_string(&map)
}

/// The array id and index of an element's job id (`train-4_7`: `train-4`, 7);
/// None for a job outside an array (job names have no `_`).
pub fn element_of(job_id: &str) -> Option<(&str, u32)> {
    let (array, index) = job_id.rsplit_once('_')?;
    Some((array, index.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_limits_as_slurm_writes_them() {
        assert_eq!(parse_array("0-3").unwrap(), ArraySpec { indices: vec![0, 1, 2, 3], max_running: None });
        assert_eq!(parse_array("0-15%4").unwrap().max_running, Some(4));
        assert_eq!(parse_array("8-9, 1,3,3").unwrap().indices, [1, 3, 8, 9]);
        assert!(parse_array("3-1").unwrap_err().contains("runs backwards; write 1-3"));
        assert!(parse_array("0-7%0").unwrap_err().contains("limit after % must be a whole number above 0"));
        assert!(parse_array("a-b").unwrap_err().contains("\"a\" is not an index"));
        assert!(parse_array("0-5000").unwrap_err().contains("more than 1000 elements"));
        assert!(parse_array("0-999").is_ok());
        assert_eq!(element_of("train-4_7"), Some(("train-4", 7)));
        let sweep = vec![
            ("LR".to_owned(), vec!["1e-4".to_owned(), "3e-4".to_owned()]),
            ("SEED".to_owned(), vec!["1".to_owned(), "2".to_owned(), "3".to_owned()]),
        ];
        let pairs = |i| sweep_values(&sweep, i).into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        assert_eq!(pairs(0), ["1e-4", "1"]);
        assert_eq!(pairs(2), ["1e-4", "3"]);
        assert_eq!(pairs(3), ["3e-4", "1"]);
        assert_eq!(pairs(5), ["3e-4", "3"]);
        assert_eq!(element_of("train-4"), None);
        assert_eq!(element_of("p-1.stage"), None);
    }
}
