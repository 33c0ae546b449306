//! A small reader for the flat Python dict repr that ms-swift 4.x prints
//! (`{'loss': 1.87, 'iteration': '1/500'}`); it also reads the JSON of
//! `logging.jsonl`. Nested values are skipped, never trusted.

/// A value of the dict, as far as metrics care.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyValue {
    Text(String),
    Number(f64),
    Bool(bool),
    None,
    /// A list, tuple or dict: skipped.
    Nested,
}

/// Deeper nesting than this is not a metrics line; the cap keeps recursion bounded.
const MAX_DEPTH: usize = 16;

/// The entries of a dict literal spanning the whole of `text` (surrounding
/// whitespace allowed); None for anything else.
pub(crate) fn parse_dict(text: &str) -> Option<Vec<(String, PyValue)>> {
    let mut reader = Reader { chars: text.trim().chars().collect(), pos: 0 };
    let entries = reader.dict(0)?;
    reader.skip_space();
    (reader.pos == reader.chars.len()).then_some(entries)
}

struct Reader {
    chars: Vec<char>,
    pos: usize,
}

impl Reader {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, wanted: char) -> Option<()> {
        self.skip_space();
        (self.bump()? == wanted).then_some(())
    }

    fn dict(&mut self, depth: usize) -> Option<Vec<(String, PyValue)>> {
        self.expect('{')?;
        let mut entries = Vec::new();
        loop {
            self.skip_space();
            if self.peek()? == '}' {
                self.pos += 1;
                return Some(entries);
            }
            let key = match self.value(depth + 1)? {
                PyValue::Text(key) => key,
                _ => return None,
            };
            self.expect(':')?;
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            self.skip_space();
            match self.bump()? {
                ',' => {}
                '}' => return Some(entries),
                _ => return None,
            }
        }
    }

    /// A list, tuple or dict, read only to skip it.
    fn nested(&mut self, depth: usize, close: char) -> Option<PyValue> {
        self.pos += 1;
        loop {
            self.skip_space();
            if self.peek()? == close {
                self.pos += 1;
                return Some(PyValue::Nested);
            }
            self.value(depth + 1)?;
            self.skip_space();
            if close == '}' {
                self.expect(':')?;
                self.value(depth + 1)?;
                self.skip_space();
            }
            match self.bump()? {
                ',' => {}
                c if c == close => return Some(PyValue::Nested),
                _ => return None,
            }
        }
    }

    fn value(&mut self, depth: usize) -> Option<PyValue> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_space();
        match self.peek()? {
            quote @ ('\'' | '"') => self.string(quote).map(PyValue::Text),
            '[' => self.nested(depth, ']'),
            '(' => self.nested(depth, ')'),
            '{' => self.nested(depth, '}'),
            _ => self.bare_word(),
        }
    }

    fn string(&mut self, quote: char) -> Option<String> {
        self.pos += 1;
        let mut text = String::new();
        loop {
            match self.bump()? {
                c if c == quote => return Some(text),
                '\\' => text.push(match self.bump()? {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    other => other,
                }),
                c => text.push(c),
            }
        }
    }

    /// A number or one of the Python/JSON constants.
    fn bare_word(&mut self) -> Option<PyValue> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_')) {
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        match word.as_str() {
            "" => None,
            "True" | "true" => Some(PyValue::Bool(true)),
            "False" | "false" => Some(PyValue::Bool(false)),
            "None" | "null" => Some(PyValue::None),
            _ => word.parse::<f64>().ok().map(PyValue::Number),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_python_and_json_dicts() {
        let entries = parse_dict(
            r#"{'a': 1.5, "b": 'x\'y', 'c': True, 'd': None, 'e': [1, (2, 3)], 'f': {'g': 1}, 'h': -2e-06}"#,
        )
        .unwrap();
        assert_eq!(
            entries,
            vec![
                ("a".into(), PyValue::Number(1.5)),
                ("b".into(), PyValue::Text("x'y".into())),
                ("c".into(), PyValue::Bool(true)),
                ("d".into(), PyValue::None),
                ("e".into(), PyValue::Nested),
                ("f".into(), PyValue::Nested),
                ("h".into(), PyValue::Number(-2e-6)),
            ]
        );
        assert_eq!(parse_dict("{}").unwrap(), vec![]);
    }

    #[test]
    fn rejects_non_dicts_and_trailing_text() {
        for text in ["", "{", "{'a' 1}", "{'a': 1} x", "[1]", "{'a': bad}", "{1: 2}", &"[".repeat(10_000)] {
            assert_eq!(parse_dict(text), None, "{text}");
        }
        let deep = format!("{{'a': {}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(parse_dict(&deep), None);
    }
}
