//! Finds the line of a dotted field in block-style YAML, so that problems found
//! after parsing (divisibility, reserved names) still point at a line.
//!
//! The YAML parser keeps no positions in its `Value`s; a small scan of the
//! indentation is enough for job files. Keys inside flow mappings
//! (`megatron: {load: x}`) are not found; the nearest block-style ancestor is.

/// The 1-based line of the deepest key of `path` that can be found, falling back
/// to its nearest ancestor; None when not even the first key is found.
pub(crate) fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = None;
    let mut start = 0;
    let mut parent_indent: Option<usize> = None;
    for key in path {
        let Some((index, indent)) = find_child_key(&lines, start, parent_indent, key) else {
            break;
        };
        found = Some(index + 1);
        start = index + 1;
        parent_indent = Some(indent);
    }
    found
}

/// The first line at or after `start` holding `key` as a direct child of a block
/// indented `parent_indent`; returns the line index and its indentation.
fn find_child_key(lines: &[&str], start: usize, parent_indent: Option<usize>, key: &str) -> Option<(usize, usize)> {
    let mut child_indent = None;
    for (index, line) in lines.iter().enumerate().skip(start) {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') || content.starts_with("---") {
            continue;
        }
        let indent = line.len() - content.len();
        if parent_indent.is_some_and(|parent| indent <= parent) {
            return None;
        }
        // The first line of the block fixes its indentation; deeper lines are grandchildren.
        if indent != *child_indent.get_or_insert(indent) {
            continue;
        }
        if key_of(content) == Some(key) {
            return Some((index, indent));
        }
    }
    None
}

/// The mapping key a line starts with (plain, 'single' or "double" quoted).
fn key_of(content: &str) -> Option<&str> {
    for quote in ['"', '\''] {
        if let Some(rest) = content.strip_prefix(quote) {
            let end = rest.find(quote)?;
            let after = rest[end + 1..].trim_start();
            return after.starts_with(':').then_some(&rest[..end]);
        }
    }
    // A plain key ends at the first ':' followed by a space or the end of the line.
    let colon = content
        .char_indices()
        .find(|&(i, c)| c == ':' && content[i + 1..].chars().next().is_none_or(char::is_whitespace))
        .map(|(i, _)| i)?;
    Some(content[..colon].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
name: x
# comment
env:
  FOO: bar
  \"QUOTED\": 1
megatron:
  system: |
    load: not a key
  load: Qwen3-8B
  dataset:
    - a
    - b
  nested: {inner: 1}
nodes: 2
";

    #[test]
    fn finds_top_level_and_nested_keys() {
        assert_eq!(line_of(TEXT, &["name"]), Some(1));
        assert_eq!(line_of(TEXT, &["env", "FOO"]), Some(4));
        assert_eq!(line_of(TEXT, &["env", "QUOTED"]), Some(5));
        assert_eq!(line_of(TEXT, &["megatron", "load"]), Some(9));
        assert_eq!(line_of(TEXT, &["megatron", "dataset"]), Some(10));
        assert_eq!(line_of(TEXT, &["nodes"]), Some(14));
    }

    #[test]
    fn falls_back_to_the_nearest_ancestor() {
        assert_eq!(line_of(TEXT, &["megatron", "nested", "inner"]), Some(13));
        assert_eq!(line_of(TEXT, &["megatron", "missing"]), Some(6));
        assert_eq!(line_of(TEXT, &["env", "nodes"]), Some(3));
        assert_eq!(line_of(TEXT, &["missing"]), None);
    }

    #[test]
    fn colons_inside_values_are_not_keys() {
        assert_eq!(key_of("PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True"), Some("PYTORCH_CUDA_ALLOC_CONF"));
        assert_eq!(key_of("url:http://x"), None);
        assert_eq!(key_of("- item"), None);
        assert_eq!(key_of("key:"), Some("key"));
    }
}
