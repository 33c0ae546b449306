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
            // The parser's lines: past the last line break at most.
            let lines = yaml_lines(text) + 1;
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

/// Lines as YAML (libyaml) counts them: CR LF, a lone CR, LF, NEL, LS and PS
/// each end one (`str::lines` splits only at LF, so a lone CR, found by the
/// fuzzer, made a correct line number look out of range).
fn yaml_lines(text: &str) -> usize {
    let mut lines = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines += 1,
            _ => {}
        }
    }
    lines
}
