//! The properties the fuzz targets (`fuzz/`) and the stable corpus test
//! (`shared/tests/job_file_corpus.rs`) hold every input to. Each function
//! panics when one is broken, which is what a fuzzer looks for.

use super::JobSpec;

/// The source name used in messages.
pub const SOURCE: &str = "fuzz.yaml";

/// Reads `text` as a job file: a spec, or errors that each name a field or a
/// line within the text. Never panics otherwise.
pub fn check_job_file(text: &str) {
    match JobSpec::from_yaml(text, SOURCE) {
        Ok(spec) => {
            let _ = spec.warnings();
        }
        Err(errors) => {
            assert!(!errors.issues.is_empty(), "an error without issues for {text:?}");
            let lines = text.lines().count().max(1) + 1;
            for issue in &errors.issues {
                assert!(
                    !issue.field.is_empty() || issue.line.is_some(),
                    "an issue naming neither a field nor a line: {issue:?} for {text:?}"
                );
                if let Some(line) = issue.line {
                    assert!((1..=lines).contains(&line), "line {line} outside the text ({lines} lines): {issue:?}");
                }
            }
            assert!(errors.to_string().starts_with(&format!("job file {SOURCE}:")), "{errors}");
        }
    }
}
