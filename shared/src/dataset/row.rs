//! One dataset row: which schema it is written in, and the conversation ms-swift
//! would build from it, or why ms-swift would drop it.

use serde_json::{Map, Value};

use super::DatasetFormat;

/// The roles ms-swift's `_check_messages` accepts, in its order.
const ROLES: &str = "system, user, assistant, tool_call, tool_response, tool";
/// ShareGPT `from` values and the role each maps to.
const SHAREGPT_FROM: [(&str, Role); 10] = [
    ("system", Role::System),
    ("human", Role::User),
    ("user", Role::User),
    ("gpt", Role::Assistant),
    ("assistant", Role::Assistant),
    ("function_call", Role::ToolCall),
    ("tool_call", Role::ToolCall),
    ("observation", Role::ToolResponse),
    ("tool_response", Role::ToolResponse),
    ("tool", Role::Tool),
];
const SHAREGPT_FROM_NAMES: &str = "system, human, user, gpt, assistant, function_call, tool_call, observation, \
                                   tool_response, tool";
/// Column aliases ms-swift maps onto `query` and `response`.
const QUERY_KEYS: [&str; 3] = ["query", "prompt", "question"];
const RESPONSE_KEYS: [&str; 3] = ["response", "answer", "completion"];
/// Quoted input strings in reasons are cut to this many characters.
const QUOTE_CHARS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    System,
    User,
    Assistant,
    ToolCall,
    ToolResponse,
    Tool,
}

impl Role {
    fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool_call" => Some(Role::ToolCall),
            "tool_response" => Some(Role::ToolResponse),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }

    fn is_tool(self) -> bool {
        matches!(self, Role::ToolCall | Role::ToolResponse | Role::Tool)
    }

    /// The role with its article, for reasons: "a user turn", "an assistant turn".
    fn described(self) -> &'static str {
        match self {
            Role::System => "a system message",
            Role::User => "a user turn",
            Role::Assistant => "an assistant turn",
            Role::ToolCall => "a tool_call turn",
            Role::ToolResponse => "a tool_response turn",
            Role::Tool => "a tool turn",
        }
    }
}

/// One message of a conversation; `chars` is the content's length in Unicode scalar values.
#[derive(Debug, Clone, Copy)]
pub(super) struct Turn {
    pub role: Role,
    pub chars: usize,
    /// Index in the row's list, for reasons; None for a row-level `system` key.
    at: Option<usize>,
}

/// A row as ms-swift sees it after preprocessing: an optional leading system
/// message, then user/assistant turns (with tool turns in between).
#[derive(Debug, Default)]
pub(super) struct Conversation {
    pub turns: Vec<Turn>,
}

impl Conversation {
    fn push(&mut self, role: Role, chars: usize, at: Option<usize>) {
        self.turns.push(Turn { role, chars, at });
    }
}

/// What one non-empty line turned out to be. `format` is None for a line that
/// is not a JSON object at all.
#[derive(Debug)]
pub(super) struct RowOutcome {
    pub format: Option<DatasetFormat>,
    pub conversation: Result<Conversation, String>,
}

/// Parses and validates one line (without its line terminator).
pub(super) fn check_row(text: &str) -> RowOutcome {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(error) => return RowOutcome { format: None, conversation: Err(json_error(text, &error)) },
    };
    let Value::Object(row) = value else {
        let reason = format!("row is {}, expected a JSON object", kind(&value));
        return RowOutcome { format: None, conversation: Err(reason) };
    };
    let format = detect_format(&row);
    let conversation = match format {
        DatasetFormat::Messages => messages_row(&row),
        DatasetFormat::ShareGpt => sharegpt_row(&row),
        DatasetFormat::QueryResponse => query_response_row(&row),
        DatasetFormat::Alpaca => alpaca_row(&row),
        DatasetFormat::Unknown => Err(unknown_row(&row)),
    };
    RowOutcome { format: Some(format), conversation }
}

fn detect_format(row: &Map<String, Value>) -> DatasetFormat {
    if row.contains_key("messages") {
        DatasetFormat::Messages
    } else if row.contains_key("conversations") || row.contains_key("conversation") {
        DatasetFormat::ShareGpt
    } else if row.contains_key("instruction") || row.contains_key("output") {
        DatasetFormat::Alpaca
    } else if QUERY_KEYS.iter().chain(&RESPONSE_KEYS).any(|key| row.contains_key(*key)) {
        DatasetFormat::QueryResponse
    } else {
        DatasetFormat::Unknown
    }
}

/// serde_json's message without its "at line 1 column N" tail, and the column
/// in characters (serde_json counts bytes).
fn json_error(text: &str, error: &serde_json::Error) -> String {
    let message = error.to_string();
    let tail = format!(" at line {} column {}", error.line(), error.column());
    let message = message.strip_suffix(&tail).unwrap_or(&message);
    let column = text.char_indices().take_while(|(byte, _)| *byte < error.column()).count();
    if error.is_eof() {
        format!("invalid JSON at column {column}: {message} (is the line truncated?)")
    } else {
        format!("invalid JSON at column {column}: {message}")
    }
}

fn unknown_row(row: &Map<String, Value>) -> String {
    let keys: Vec<String> = row.keys().take(8).map(|key| quote(key)).collect();
    let keys = if keys.is_empty() { "none".to_owned() } else { keys.join(", ") };
    format!(
        "row has none of the keys messages, conversations, query/response, instruction/output \
         (its keys: {keys})"
    )
}

fn messages_row(row: &Map<String, Value>) -> Result<Conversation, String> {
    let list = match row.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(format!("messages is {}, expected a list of {{role, content}} objects", kind(other)));
        }
        None => return Err("row has no messages".to_owned()),
    };
    if list.is_empty() {
        return Err("messages is an empty list".to_owned());
    }
    let mut conversation = Conversation::default();
    for (index, message) in list.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(format!("messages[{index}] is {}, expected an object with role and content", kind(message)));
        };
        let role = match message.get("role") {
            Some(Value::String(name)) => match Role::parse(name) {
                Some(role) => role,
                None => return Err(format!("messages[{index}].role is {}, expected one of {ROLES}", quote(name))),
            },
            Some(other) => return Err(format!("messages[{index}].role is {}, expected a string", kind(other))),
            None => return Err(format!("messages[{index}] has no role")),
        };
        // OpenAI tool calls: an assistant message whose content may be null, carrying `tool_calls`.
        if role == Role::Assistant
            && has_tool_calls(message)
            && !matches!(message.get("content"), Some(Value::String(text)) if !text.is_empty())
        {
            conversation.push(Role::ToolCall, 0, Some(index));
            continue;
        }
        let chars = match message.get("content") {
            Some(Value::String(text)) => text.chars().count(),
            Some(Value::Null) => {
                return Err(format!("messages[{index}].content is null; ms-swift drops rows whose content is None"));
            }
            Some(other) => return Err(format!("messages[{index}].content is {}, expected a string", kind(other))),
            None => return Err(format!("messages[{index}] has no content")),
        };
        conversation.push(role, chars, Some(index));
    }
    check_order("messages", &conversation)?;
    Ok(conversation)
}

fn has_tool_calls(message: &Map<String, Value>) -> bool {
    matches!(message.get("tool_calls"), Some(Value::Array(calls)) if !calls.is_empty())
}

fn sharegpt_row(row: &Map<String, Value>) -> Result<Conversation, String> {
    let (field, list) = match (row.get("conversations"), row.get("conversation")) {
        (Some(value), _) => ("conversations", value),
        (None, Some(value)) => ("conversation", value),
        (None, None) => return Err("row has no conversations".to_owned()),
    };
    let list = match list {
        Value::Array(list) => list,
        other => return Err(format!("{field} is {}, expected a list", kind(other))),
    };
    if list.is_empty() {
        return Err(format!("{field} is an empty list"));
    }
    let mut conversation = Conversation::default();
    if let Some(chars) = optional_text(row, "system")? {
        conversation.push(Role::System, chars, None);
    }
    for (index, entry) in list.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(format!("{field}[{index}] is {}, expected an object", kind(entry)));
        };
        if let Some(from) = entry.get("from") {
            let role = match from {
                Value::String(name) => match SHAREGPT_FROM.iter().find(|(known, _)| known == name) {
                    Some((_, role)) => *role,
                    None => {
                        return Err(format!(
                            "{field}[{index}].from is {}, expected one of {SHAREGPT_FROM_NAMES}",
                            quote(name)
                        ));
                    }
                },
                other => return Err(format!("{field}[{index}].from is {}, expected a string", kind(other))),
            };
            let chars = required_text(entry, &format!("{field}[{index}]"), "value")?;
            conversation.push(role, chars, Some(index));
        } else {
            // ms-swift's own pair form: {"human": query, "assistant": response}.
            let path = format!("{field}[{index}]");
            let query = optional_text(entry, "human")?.or(optional_text(entry, "user")?);
            let response = optional_text(entry, "assistant")?.or(optional_text(entry, "gpt")?);
            if query.is_none() && response.is_none() {
                return Err(format!("{path} has neither from/value nor human/assistant keys"));
            }
            if let Some(chars) = query {
                conversation.push(Role::User, chars, Some(index));
            }
            if let Some(chars) = response {
                conversation.push(Role::Assistant, chars, Some(index));
            }
        }
    }
    check_order(field, &conversation)?;
    Ok(conversation)
}

fn query_response_row(row: &Map<String, Value>) -> Result<Conversation, String> {
    let mut conversation = Conversation::default();
    if let Some(chars) = optional_text(row, "system")? {
        conversation.push(Role::System, chars, None);
    }
    match row.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (index, pair) in pairs.iter().enumerate() {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(query), Value::String(response)]) => {
                        conversation.push(Role::User, query.chars().count(), None);
                        conversation.push(Role::Assistant, response.chars().count(), None);
                    }
                    _ => return Err(format!("history[{index}] is not a [query, response] pair of strings")),
                }
            }
        }
        Some(other) => return Err(format!("history is {}, expected a list of [query, response] pairs", kind(other))),
    }
    conversation.push(Role::User, aliased_text(row, &QUERY_KEYS)?, None);
    conversation.push(Role::Assistant, aliased_text(row, &RESPONSE_KEYS)?, None);
    Ok(conversation)
}

fn alpaca_row(row: &Map<String, Value>) -> Result<Conversation, String> {
    let mut conversation = Conversation::default();
    if let Some(chars) = optional_text(row, "system")? {
        conversation.push(Role::System, chars, None);
    }
    // ms-swift joins instruction and input into one query, separated by a newline.
    let instruction = optional_text(row, "instruction")?;
    let input = optional_text(row, "input")?;
    let query = match (instruction, input) {
        (None, None) => return Err("row has neither instruction nor input".to_owned()),
        (Some(0), Some(chars)) | (Some(chars), Some(0)) => chars,
        (Some(instruction), Some(input)) => instruction + 1 + input,
        (Some(chars), None) | (None, Some(chars)) => chars,
    };
    conversation.push(Role::User, query, None);
    conversation.push(Role::Assistant, required_text(row, "row", "output")?, None);
    Ok(conversation)
}

/// The first of `keys` the row has, which must be a string.
fn aliased_text(row: &Map<String, Value>, keys: &[&str]) -> Result<usize, String> {
    for key in keys {
        if row.contains_key(*key) {
            return required_text(row, "row", key);
        }
    }
    Err(format!("row has no {}", keys.join(", no ")))
}

/// A key that must hold a string; its length in characters.
fn required_text(object: &Map<String, Value>, path: &str, key: &str) -> Result<usize, String> {
    match object.get(key) {
        Some(Value::String(text)) => Ok(text.chars().count()),
        Some(Value::Null) => Err(format!("{} is null, expected a string", field_path(path, key))),
        Some(other) => Err(format!("{} is {}, expected a string", field_path(path, key), kind(other))),
        None => Err(format!("{path} has no {key}")),
    }
}

/// A key that may be absent or null, and is otherwise a string.
fn optional_text(object: &Map<String, Value>, key: &str) -> Result<Option<usize>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.chars().count())),
        Some(other) => Err(format!("{key} is {}, expected a string", kind(other))),
    }
}

fn field_path(path: &str, key: &str) -> String {
    if path == "row" { key.to_owned() } else { format!("{path}.{key}") }
}

/// After an optional leading system message, user and assistant alternate
/// starting with user; tool turns may sit between a user or assistant turn and
/// the next assistant turn; the last turn is an assistant answer.
fn check_order(field: &str, conversation: &Conversation) -> Result<(), String> {
    let name = |turn: &Turn| match turn.at {
        Some(index) => format!("{field}[{index}]"),
        None => "the row's system key".to_owned(),
    };
    let turns = &conversation.turns;
    if !turns.iter().any(|turn| turn.role == Role::Assistant) {
        return Err(format!("{field} has no assistant turn"));
    }
    let mut previous: Option<&Turn> = None;
    for (position, turn) in turns.iter().enumerate() {
        let role = turn.role;
        let before = previous.map(|turn| turn.role);
        if role == Role::System {
            if position > 0 {
                return Err(format!("{} is a system message; a system message may only come first", name(turn)));
            }
        } else if matches!(before, None | Some(Role::System)) {
            if role != Role::User {
                return Err(format!(
                    "{} is {}, but the conversation must start with a user turn (after an optional system message)",
                    name(turn),
                    role.described()
                ));
            }
        } else if let Some(last) = previous {
            let allowed = match last.role {
                Role::User => role == Role::Assistant || role.is_tool(),
                Role::Assistant => role == Role::User || role.is_tool(),
                _ => role == Role::Assistant || role.is_tool(),
            };
            if !allowed {
                let rule = if last.role.is_tool() {
                    "tool turns must be followed by an assistant turn"
                } else {
                    "user and assistant turns must alternate"
                };
                return Err(format!(
                    "{} is {} after {} at {}; {rule}",
                    name(turn),
                    role.described(),
                    last.role.described(),
                    name(last)
                ));
            }
        }
        previous = Some(turn);
    }
    match previous {
        Some(last) if last.role != Role::Assistant => Err(format!(
            "{field} ends with {} at {}; the last turn must be an assistant answer",
            last.role.described(),
            name(last)
        )),
        _ => Ok(()),
    }
}

/// A JSON value's kind with its article, for reasons.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string from the input, quoted and cut short so one odd row cannot flood the report.
fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() { format!("{:?}", format!("{head}…")) } else { format!("{head:?}") }
}
