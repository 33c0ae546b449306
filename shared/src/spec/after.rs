//! `after:`, the jobs a job waits for (Slurm's `--dependency=afterok:ID`):
//! `after: prep-3` or `after: [prep-3, "eval-4:any", "train-5:notok"]`. Each
//! entry is a job id or name and when it counts as done: `ok` (it
//! succeeded; the default), `any` (it ended, however) or `notok` (it failed
//! or was cancelled). The controller resolves the jobs at submit.

use serde_yaml_ng::{Mapping, Value};

use super::typed;
use crate::job_file::Problems;

/// The most entries one `after:` may list.
pub const MAX_DEPENDENCIES: usize = 64;

/// One entry of `after:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// A job id, or a job name (the newest job of that name at submit).
    pub job: String,
    pub condition: Condition,
}

/// When a dependency counts as met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The job succeeded (Slurm's afterok).
    Ok,
    /// The job ended in any state (afterany).
    Any,
    /// The job failed or was cancelled (afternotok).
    NotOk,
}

impl Condition {
    /// The word written after the job: `ok`, `any`, `notok`.
    pub fn word(self) -> &'static str {
        match self {
            Condition::Ok => "ok",
            Condition::Any => "any",
            Condition::NotOk => "notok",
        }
    }

    pub fn from_word(word: &str) -> Option<Condition> {
        [Condition::Ok, Condition::Any, Condition::NotOk].into_iter().find(|c| c.word() == word)
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.job, self.condition.word())
    }
}

/// Reads `JOB` or `JOB:ok|any|notok`; the error says what is wrong and the fix.
pub fn parse_dependency(text: &str) -> Result<Dependency, String> {
    let (job, condition) = match text.rsplit_once(':') {
        Some((job, word)) => {
            let condition = Condition::from_word(word.trim()).ok_or_else(|| {
                format!("{text:?}: {word:?} is not a condition; write JOB, JOB:ok, JOB:any or JOB:notok")
            })?;
            (job.trim(), condition)
        }
        None => (text.trim(), Condition::Ok),
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
    if job.is_empty() || job.len() > 128 || !job.chars().all(valid) {
        return Err(format!(
            "{text:?} does not name a job: give a job id such as `prep-3` (`cohort jobs` lists them), \
             optionally followed by :ok, :any or :notok"
        ));
    }
    Ok(Dependency { job: job.to_owned(), condition })
}

/// `after:`: one entry or a list of them.
pub(super) fn read_after(root: &Mapping, problems: &mut Problems) -> Vec<Dependency> {
    let entries: Vec<String> = match root.get("after") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Sequence(_)) => typed::<Vec<String>>(root, "after", problems).unwrap_or_default(),
        Some(_) => typed::<String>(root, "after", problems).into_iter().collect(),
    };
    if entries.len() > MAX_DEPENDENCIES {
        problems.at(&["after"], format!("lists {} jobs; at most {MAX_DEPENDENCIES}", entries.len()));
        return Vec::new();
    }
    let many = matches!(root.get("after"), Some(Value::Sequence(_)));
    let mut after = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match parse_dependency(entry) {
            Ok(dependency) if after.iter().any(|d: &Dependency| d.job == dependency.job) => {
                let field = if many { format!("after[{i}]") } else { "after".into() };
                problems.at_field(field, &["after"], format!("job {} is listed twice; keep one", dependency.job));
            }
            Ok(dependency) => after.push(dependency),
            Err(message) => {
                let field = if many { format!("after[{i}]") } else { "after".into() };
                problems.at_field(field, &["after"], message);
            }
        }
    }
    after
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_a_job_and_an_optional_condition() {
        let d = parse_dependency("prep-3").unwrap();
        assert_eq!((d.job.as_str(), d.condition), ("prep-3", Condition::Ok));
        assert_eq!(parse_dependency("p-1.train:notok").unwrap().condition, Condition::NotOk);
        assert_eq!(parse_dependency("prep-3:any").unwrap().to_string(), "prep-3:any");
        let err = parse_dependency("prep-3:afterok").unwrap_err();
        assert!(err.contains("\"afterok\" is not a condition") && err.contains("JOB:notok"), "{err}");
        let err = parse_dependency("a b:ok").unwrap_err();
        assert!(err.contains("does not name a job") && err.contains("cohort jobs"), "{err}");
        assert!(parse_dependency(":ok").is_err());
    }
}
