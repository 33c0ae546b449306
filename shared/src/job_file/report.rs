//! How job-file problems are reported: each names its dotted field and, when it
//! can be found, its line; all of them are collected before giving up.

use std::fmt;

use super::locate::line_of;

/// One problem (or remark) about a job file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecIssue {
    /// Dotted path of the field, e.g. `megatron.global_batch_size`; `env.FOO`;
    /// `command[1]` for a list element; empty for the document as a whole.
    pub field: String,
    /// 1-based line in the YAML text, when it can be found.
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found in a job file. Display: a first line
/// `job file {source}: N problem(s)`, then `  {source}:{line}: {field}: {message}`
/// per issue (`:{line}` left out when unknown, `{field}: ` when empty).
// Display and Error are written by hand: thiserror would take the `source`
// field for the error's cause, and a String is not an Error.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecErrors {
    /// The file name used in messages.
    pub source: String,
    pub issues: Vec<SpecIssue>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.issues.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "job file {}: {count} {noun}", self.source)?;
        for issue in &self.issues {
            write!(f, "\n  {}", self.source)?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
            if !issue.field.is_empty() {
                write!(f, "{}: ", issue.field)?;
            }
            f.write_str(&issue.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Collects issues against one YAML text, looking up each field's line.
pub(crate) struct Problems<'a> {
    text: &'a str,
    issues: Vec<SpecIssue>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Problems { text, issues: Vec::new() }
    }

    /// Records a problem at the field whose keys are `path`.
    pub(crate) fn at(&mut self, path: &[&str], message: impl Into<String>) {
        self.at_field(path.join("."), path, message);
    }

    /// Records a problem whose field name differs from its key path, e.g. `command[1]`.
    pub(crate) fn at_field(&mut self, field: String, path: &[&str], message: impl Into<String>) {
        let line = if path.is_empty() { None } else { line_of(self.text, path) };
        self.at_line(field, line, message);
    }

    pub(crate) fn at_line(&mut self, field: String, line: Option<usize>, message: impl Into<String>) {
        self.issues.push(SpecIssue { field, line, message: message.into() });
    }

    /// The value as written on the line of the field at `path` (a comment cut
    /// off): what the user typed, before YAML turned `3.10` into the number 3.1.
    pub(crate) fn written(&self, path: &[&str]) -> Option<&'a str> {
        let line = self.text.lines().nth(line_of(self.text, path)?.checked_sub(1)?)?;
        let (_, value) = line.split_once(':')?;
        let value = value.split(" #").next().unwrap_or(value).trim();
        (!value.is_empty()).then_some(value)
    }

    /// The YAML text the problems are about.
    pub(crate) fn text(&self) -> &'a str {
        self.text
    }

    /// Whether a problem was already recorded at `field` (dotted).
    pub(crate) fn reported(&self, field: &str) -> bool {
        self.issues.iter().any(|issue| issue.field == field)
    }

    pub(crate) fn into_issues(self) -> Vec<SpecIssue> {
        self.issues
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.issues.is_empty()
    }
}

/// The candidate closest to a misspelt `word`, when one is close enough to be a typo.
pub(crate) fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|candidate| (candidate, strsim::jaro_winkler(&word, candidate)))
        .filter(|&(_, score)| score >= 0.85)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(candidate, _)| candidate)
}

/// `"; did you mean `x`?"` or nothing.
pub(crate) fn suggestion<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    did_you_mean(word, candidates).map(|candidate| format!("; did you mean `{candidate}`?")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_every_issue_with_file_and_line() {
        let errors = SpecErrors {
            source: "job.yaml".into(),
            issues: vec![
                SpecIssue { field: "nodes".into(), line: Some(3), message: "bad".into() },
                SpecIssue { field: "megatron.lr".into(), line: None, message: "worse".into() },
                SpecIssue { field: String::new(), line: Some(1), message: "not YAML".into() },
            ],
        };
        assert_eq!(
            errors.to_string(),
            "job file job.yaml: 3 problems\n  job.yaml:3: nodes: bad\n  job.yaml: megatron.lr: worse\n  job.yaml:1: not YAML"
        );
        let one = SpecErrors { source: "j".into(), issues: errors.issues[..1].to_vec() };
        assert!(one.to_string().starts_with("job file j: 1 problem\n"));
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        let keys = ["gpus_per_node", "nodes", "node_selector"];
        assert_eq!(did_you_mean("gpu_per_node", keys), Some("gpus_per_node"));
        assert_eq!(did_you_mean("Nodes", keys), Some("nodes"));
        assert_eq!(did_you_mean("restart_policy", keys), None);
    }
}
