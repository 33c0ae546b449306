//! Limits checked on a job file's text before the YAML parser sees it, in one
//! linear pass. The parser's own recursion limit stops deep nesting only after
//! its scanner has spent time quadratic in the depth (100,000 nested `[` cost
//! about a minute of CPU), and aliases can expand a small file into a huge
//! tree: a submitter with any token must not be able to buy that.

use super::SpecIssue;

/// Deeper flow (`[`, `{`) or block nesting than this is refused; real job files
/// nest 4-5 levels.
pub const MAX_NESTING: usize = 64;
/// More alias uses (`*name`) than this are refused; job files rarely use any.
pub const MAX_ALIASES: usize = 256;

/// Checks nesting depth and alias count; the first limit passed names its line.
pub fn check(text: &str) -> Result<(), SpecIssue> {
    let issue = |line: usize, message: String| SpecIssue { field: String::new(), line: Some(line), message };
    let mut flow_depth = 0usize;
    let mut aliases = 0usize;
    for (index, raw) in yaml_lines(text).enumerate() {
        let line = index + 1;
        let block_depth = block_depth(raw);
        if block_depth > MAX_NESTING {
            return Err(issue(
                line,
                format!("nests {block_depth} levels deep; job files may nest at most {MAX_NESTING} levels"),
            ));
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut previous = ' ';
        for c in raw.chars() {
            match quote {
                Some('"') if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if previous.is_whitespace() => break,
                    '"' | '\'' if is_token_start(previous) => quote = Some(c),
                    '[' | '{' => {
                        flow_depth += 1;
                        if flow_depth > MAX_NESTING {
                            return Err(issue(
                                line,
                                format!(
                                    "nests more than {MAX_NESTING} levels of `[` or `{{`; job files may nest at most {MAX_NESTING} levels"
                                ),
                            ));
                        }
                    }
                    ']' | '}' => flow_depth = flow_depth.saturating_sub(1),
                    '*' if is_token_start(previous) => {
                        aliases += 1;
                        if aliases > MAX_ALIASES {
                            return Err(issue(
                                line,
                                format!("uses more than {MAX_ALIASES} YAML aliases (`*name`); write the values out"),
                            ));
                        }
                    }
                    _ => {}
                },
            }
            previous = c;
        }
    }
    Ok(())
}

/// The lines as YAML counts them: CR LF, a lone CR, LF, NEL, LS and PS each end one.
fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((at, c)) =
            rest.char_indices().find(|&(_, c)| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        else {
            return Some(std::mem::take(&mut rest));
        };
        let line = &rest[..at];
        let mut next = at + c.len_utf8();
        if c == '\r' && rest[next..].starts_with('\n') {
            next += 1;
        }
        rest = &rest[next..];
        Some(line)
    })
}

/// Where a quote or an alias may begin: at the start of a value, after an indicator.
fn is_token_start(previous: char) -> bool {
    previous.is_whitespace() || matches!(previous, '[' | '{' | ',' | ':' | '-' | '?')
}

/// A line's block nesting: its indentation plus the compact `- ` / `? ` entries
/// that open a collection each (`- - - x` is three sequences deep).
fn block_depth(line: &str) -> usize {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let mut rest = &line[indent..];
    let mut compact = 0;
    while let Some(after) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
        compact += 1;
        rest = after.trim_start_matches(' ');
    }
    // Two columns an indentation level is what people write; one is allowed but counts double.
    indent / 2 + compact
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_job_files_pass() {
        let text = "name: a\nkind: command\nnodes: 1\ncommand: [python3, '-c', \"print([1, {2: 3}])\"]\nenv: {A: '[[[['}\n# [[[[[[\nstages:\n  - name: x\n    megatron: {dataset: [a, b]}\n";
        assert_eq!(check(text), Ok(()));
        let anchors = "base: &b {a: 1}\nx: *b\ny: *b\n";
        assert_eq!(check(anchors), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_with_its_line() {
        let text = format!("name: a\nx: {}\n", "[".repeat(100_000));
        let issue = check(&text).unwrap_err();
        assert_eq!(issue.line, Some(2));
        assert!(issue.message.contains("at most 64 levels"), "{}", issue.message);
        let just = format!("x: {}{}\n", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert_eq!(check(&just), Ok(()));
    }

    #[test]
    fn lines_are_counted_as_yaml_counts_them() {
        let text = format!("a: 1\rb: 2\r\nc: {}\n", "{".repeat(100));
        assert_eq!(check(&text).unwrap_err().line, Some(3));
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let text = format!("x:\n{}\n", "- ".repeat(1000));
        assert_eq!(check(&text).unwrap_err().line, Some(2));
        let text = format!("x:\n{}y: 1\n", " ".repeat(400));
        assert_eq!(check(&text).unwrap_err().line, Some(2));
    }

    #[test]
    fn many_aliases_are_refused() {
        let mut text = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for i in 0..300 {
            text.push_str(&format!("k{i}: [*a, *a]\n"));
        }
        let issue = check(&text).unwrap_err();
        assert!(issue.message.contains("aliases"), "{}", issue.message);
    }
}
