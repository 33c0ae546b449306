//! The dataset checker against the fixture files, each other format, a large
//! generated file, and arbitrary bytes (which must never panic).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Cursor, Write};
use std::path::{Path, PathBuf};

use cohort_shared::dataset::{
    DatasetError, DatasetFormat, DatasetPolicy, DatasetReport, MAX_REPORTED_PROBLEMS, RowProblem, check_jsonl,
    check_reader,
};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets").join(name)
}

/// A file under cargo's scratch directory for integration tests.
fn scratch_file(name: &str, contents: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dataset-{name}"));
    fs::write(&path, contents).unwrap();
    path
}

fn check_text(text: &str) -> DatasetReport {
    check_reader("test.jsonl", Cursor::new(text.as_bytes()))
}

/// The one reason a single-row dataset gets.
fn single_problem(row: &str) -> String {
    let report = check_text(row);
    match &report.problems[..] {
        [problem] => problem.reason.clone(),
        other => panic!("one problem expected for {row}, got {other:?}"),
    }
}

fn problem(line: usize, reason: &str) -> RowProblem {
    RowProblem { line, reason: reason.to_owned() }
}

#[test]
fn messages_bad_fixture_reports_each_bad_row() {
    let report = check_jsonl(&fixture("messages-bad.jsonl")).unwrap();
    let roles = "system, user, assistant, tool_call, tool_response, tool";
    assert_eq!(
        report.problems,
        [
            problem(1, "messages is an empty list"),
            problem(2, &format!("messages[1].role is \"robot\", expected one of {roles}")),
            problem(3, "messages[0].content is null; ms-swift drops rows whose content is None"),
            problem(4, "messages has no assistant turn"),
            problem(5, "invalid JSON at column 52: EOF while parsing a string (is the line truncated?)"),
            problem(6, "invalid JSON at column 2: expected ident"),
            problem(7, "row is in ShareGPT format, the rest of the file is messages format"),
        ]
    );
    assert_eq!(report.format, DatasetFormat::Messages);
    assert_eq!(report.formats, BTreeMap::from([(DatasetFormat::Messages, 5), (DatasetFormat::ShareGpt, 1)]));
    assert_eq!(report.problems_omitted, 0);
    assert_eq!((report.stats.rows, report.stats.valid_rows), (8, 1));
    assert!(!report.is_ok());
    assert!(!DatasetPolicy::Fail.allows(&report));
    assert!(DatasetPolicy::Warn.allows(&report));
    let rendered = report.render();
    assert!(rendered.contains("messages-bad.jsonl:4: messages has no assistant turn\n"), "{rendered}");
}

#[test]
fn messages_good_fixture_statistics() {
    let report = check_jsonl(&fixture("messages-good.jsonl")).unwrap();
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(report.format, DatasetFormat::Messages);
    assert_eq!(report.formats, BTreeMap::from([(DatasetFormat::Messages, 3)]));
    let stats = &report.stats;
    assert_eq!((stats.rows, stats.valid_rows, stats.empty_lines), (3, 3, 0));
    // Turns per row are 1, 2, 1: one multi-turn row.
    assert_eq!(stats.single_turn_rows, 2);
    assert!((stats.share_single_turn - 2.0 / 3.0).abs() < 1e-9);
    let turns = stats.turns_per_row;
    assert_eq!((turns.count, turns.min, turns.p50, turns.max), (3, 1, 1, 2));
    assert!((turns.mean - 4.0 / 3.0).abs() < 1e-9);
    // Chinese text is counted in characters: "告诉我明天的天气" is 8, "等于2" is 3.
    let user = stats.user_chars;
    assert_eq!((user.count, user.min, user.max), (4, 4, 35));
    let assistant = stats.assistant_chars;
    assert_eq!((assistant.count, assistant.min, assistant.p50, assistant.max), (4, 3, 3, 155));
    // Three of the four answers ("明天天气晴朗", "等于2", "等于3") are under 20 characters.
    assert_eq!(stats.short_answers, 3);
    assert!((stats.share_short_answers - 0.75).abs() < 1e-9);
    assert_eq!(stats.system_prompt_rows, 2);
    assert!(report.warnings.iter().any(|warning| warning.starts_with("75% of assistant answers are under 20")));
    assert!(DatasetPolicy::Fail.allows(&report));
}

#[test]
fn other_formats_are_recognised() {
    let cases = [
        (
            "sharegpt",
            DatasetFormat::ShareGpt,
            concat!(
                r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}"#,
                "\n",
                r#"{"system": "be brief", "conversation": [{"human": "q1", "assistant": "r1"}, {"human": "q2", "assistant": "r2"}]}"#,
            ),
        ),
        (
            "query-response",
            DatasetFormat::QueryResponse,
            concat!(
                r#"{"system": "s", "query": "q2", "response": "r2", "history": [["q1", "r1"]]}"#,
                "\n",
                r#"{"prompt": "q", "completion": "r"}"#,
            ),
        ),
        (
            "alpaca",
            DatasetFormat::Alpaca,
            concat!(
                r#"{"instruction": "translate", "input": "bonjour", "output": "hello"}"#,
                "\n",
                r#"{"instruction": "say hi", "output": "hi"}"#,
            ),
        ),
    ];
    for (name, format, text) in cases {
        let report = check_jsonl(&scratch_file(&format!("{name}.jsonl"), text)).unwrap();
        assert!(report.is_ok(), "{name}: {}", report.render());
        assert_eq!(report.format, format, "{name}");
        assert_eq!(report.formats, BTreeMap::from([(format, 2)]), "{name}");
        assert_eq!(report.stats.valid_rows, 2, "{name}");
    }
    let report = check_text(r#"{"system": "s", "query": "q2", "response": "r2", "history": [["q1", "r1"]]}"#);
    assert_eq!(report.stats.turns_per_row.max, 2);
    assert_eq!(report.stats.system_prompt_rows, 1);
    // "translate" + newline + "bonjour".
    let report = check_text(r#"{"instruction": "translate", "input": "bonjour", "output": "hello"}"#);
    assert_eq!(report.stats.user_chars.max, 17);
}

#[test]
fn minority_format_rows_are_problems_whatever_the_majority() {
    let text = concat!(
        r#"{"instruction": "a", "output": "b"}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#,
        "\n",
        r#"{"instruction": "c", "output": "d"}"#,
        "\n",
        r#"{"query": "e", "response": "f"}"#,
        "\n",
        r#"{"text": "g"}"#,
    );
    let report = check_text(text);
    assert_eq!(report.format, DatasetFormat::Alpaca);
    assert_eq!(
        report.problems,
        [
            problem(2, "row is in messages format, most of the file (2 of 4 rows) is alpaca format"),
            problem(4, "row is in query/response format, most of the file (2 of 4 rows) is alpaca format"),
            problem(
                5,
                "row has none of the keys messages, conversations, query/response, instruction/output \
                 (its keys: \"text\")"
            ),
        ]
    );
    assert_eq!(report.formats.get(&DatasetFormat::Unknown), Some(&1));
}

#[test]
fn turn_order_errors_say_where_it_breaks() {
    let row = |roles: &[&str]| {
        let messages: Vec<String> =
            roles.iter().map(|role| format!(r#"{{"role": "{role}", "content": "x"}}"#)).collect();
        format!(r#"{{"messages": [{}]}}"#, messages.join(", "))
    };
    let cases: [(&[&str], &str); 7] = [
        (
            &["user", "user", "assistant"],
            "messages[1] is a user turn after a user turn at messages[0]; user and assistant turns must alternate",
        ),
        (
            &["assistant", "user", "assistant"],
            "messages[0] is an assistant turn, but the conversation must start with a user turn (after an optional \
             system message)",
        ),
        (
            &["user", "assistant", "system", "user", "assistant"],
            "messages[2] is a system message; a system message may only come first",
        ),
        (
            &["system", "user", "assistant", "assistant"],
            "messages[3] is an assistant turn after an assistant turn at messages[2]; user and assistant turns must \
             alternate",
        ),
        (
            &["user", "tool_call", "user", "assistant"],
            "messages[2] is a user turn after a tool_call turn at messages[1]; tool turns must be followed by an \
             assistant turn",
        ),
        (
            &["user", "assistant", "user"],
            "messages ends with a user turn at messages[2]; the last turn must be an assistant answer",
        ),
        (&["system"], "messages has no assistant turn"),
    ];
    for (roles, reason) in cases {
        assert_eq!(single_problem(&row(roles)), reason, "{roles:?}");
    }
    for valid in [
        &["system", "user", "assistant", "user", "assistant"][..],
        &["user", "tool_call", "tool_response", "assistant"],
        &["user", "assistant", "tool_call", "tool", "tool_response", "assistant", "user", "assistant"],
    ] {
        let report = check_text(&row(valid));
        assert!(report.is_ok(), "{valid:?}: {:?}", report.problems);
    }
}

#[test]
fn field_errors_name_field_and_index() {
    let cases = [
        (r#"{"messages": "hi"}"#, "messages is a string, expected a list of {role, content} objects"),
        (r#"{"messages": [1]}"#, "messages[0] is a number, expected an object with role and content"),
        (r#"{"messages": [{"content": "x"}]}"#, "messages[0] has no role"),
        (r#"{"messages": [{"role": 3, "content": "x"}]}"#, "messages[0].role is a number, expected a string"),
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0] has no content"),
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ["x"]}]}"#,
            "messages[1].content is a list, expected a string",
        ),
        (r#"[1, 2]"#, "row is a list, expected a JSON object"),
        (
            r#"{"conversations": [{"from": "bot", "value": "x"}]}"#,
            "conversations[0].from is \"bot\", expected one of system, human, user, gpt, assistant, function_call, tool_call, observation, tool_response, tool",
        ),
        (r#"{"query": "q"}"#, "row has no response, no answer, no completion"),
        (
            r#"{"query": "q", "response": "r", "history": [["a"]]}"#,
            "history[0] is not a [query, response] pair of strings",
        ),
        (r#"{"instruction": "q", "output": null}"#, "output is null, expected a string"),
    ];
    for (row, reason) in cases {
        assert_eq!(single_problem(row), reason, "{row}");
    }
}

#[test]
fn openai_tool_calls_with_null_content_are_accepted() {
    let row = r#"{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]}, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]}"#;
    let report = check_text(row);
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.stats.tool_rows, 1);
    assert_eq!(report.stats.turns_per_row.max, 1);
}

#[test]
fn empty_lines_crlf_bom_and_bad_utf8() {
    let good = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#;
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(format!("{good}\r\n\r\n   \n{good}\n").as_bytes());
    bytes.extend_from_slice(b"{\"messages\": \"\xff\"}\n");
    let report = check_reader("mixed.jsonl", Cursor::new(bytes));
    assert_eq!((report.stats.rows, report.stats.valid_rows, report.stats.empty_lines), (3, 2, 2));
    assert_eq!(report.problems, [problem(5, "line is not valid UTF-8 (bad byte at offset 14)")]);
    assert!(report.warnings.iter().any(|warning| warning == "2 empty lines were skipped"));
    assert!(report.warnings.iter().any(|warning| warning.contains("byte-order mark")));
}

#[test]
fn empty_input_is_not_ok() {
    let report = check_text("\n\n");
    assert!(!report.is_ok());
    assert!(!DatasetPolicy::Warn.allows(&report));
    assert_eq!(report.format, DatasetFormat::Unknown);
    assert_eq!(report.stats.empty_lines, 2);
    assert!(report.render().contains("statistics over 0 valid rows"));
}

#[test]
fn missing_file_names_the_path() {
    let path = Path::new("/nonexistent/cohort/train.jsonl");
    let error = check_jsonl(path).unwrap_err();
    assert!(matches!(error, DatasetError::Open { .. }));
    assert!(error.to_string().starts_with("dataset /nonexistent/cohort/train.jsonl: cannot open: "), "{error}");
}

#[test]
fn problems_beyond_the_cap_are_counted() {
    let extra = 250;
    let text = "{}\n".repeat(MAX_REPORTED_PROBLEMS + extra);
    let report = check_text(&text);
    assert_eq!(report.problems.len(), MAX_REPORTED_PROBLEMS);
    assert_eq!(report.problems_omitted, extra);
    assert_eq!(report.problems.last().map(|problem| problem.line), Some(MAX_REPORTED_PROBLEMS));
    assert!(report.render().contains(&format!("... and {extra} more bad rows")));
}

#[test]
fn large_generated_file_is_streamed() {
    const ROWS: usize = 200_000;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dataset-large.jsonl");
    let mut file = BufWriter::new(fs::File::create(&path).unwrap());
    for index in 0..ROWS {
        if index % 1000 == 999 {
            writeln!(file, r#"{{"messages": [{{"role": "user", "content": "q{index}"}}]}}"#).unwrap();
        } else if index % 3 == 0 {
            writeln!(
                file,
                r#"{{"messages": [{{"role": "system", "content": "s"}}, {{"role": "user", "content": "问题{index}"}}, {{"role": "assistant", "content": "a{index}"}}, {{"role": "user", "content": "again"}}, {{"role": "assistant", "content": "a fairly long answer number {index}"}}]}}"#
            )
            .unwrap();
        } else {
            writeln!(
                file,
                r#"{{"messages": [{{"role": "user", "content": "question {index}"}}, {{"role": "assistant", "content": "answer {index}"}}]}}"#
            )
            .unwrap();
        }
    }
    file.flush().unwrap();
    drop(file);
    let report = check_jsonl(&path).unwrap();
    let bad = ROWS / 1000;
    assert_eq!(report.stats.rows, ROWS);
    assert_eq!(report.stats.valid_rows, ROWS - bad);
    assert_eq!(report.invalid_rows(), bad);
    assert_eq!(report.problems[0], problem(1000, "messages has no assistant turn"));
    let multi_turn = (0..ROWS).filter(|index| index % 1000 != 999 && index % 3 == 0).count();
    assert_eq!(report.stats.turns_per_row.max, 2);
    assert_eq!(report.stats.valid_rows - report.stats.single_turn_rows, multi_turn);
    assert_eq!(report.stats.system_prompt_rows, multi_turn);
    fs::remove_file(&path).unwrap();
}

#[test]
fn policy_serde_names() {
    assert_eq!(serde_json::to_string(&DatasetPolicy::Fail).unwrap(), r#""fail""#);
    assert_eq!(serde_json::from_str::<DatasetPolicy>(r#""warn""#).unwrap(), DatasetPolicy::Warn);
    assert_eq!(serde_json::to_string(&DatasetFormat::ShareGpt).unwrap(), r#""sharegpt""#);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 0..20)) {
        let input = lines.join(&b'\n');
        let report = check_reader("fuzz.jsonl", Cursor::new(input));
        let _ = report.render();
        prop_assert!(report.stats.valid_rows <= report.stats.rows);
    }

    #[test]
    fn json_shaped_lines_never_panic(
        lines in prop::collection::vec(
            r#"\{("(messages|conversations|query|response|instruction|output|role|content|from|value|history|system)": ?(null|1|"[a-z语 ]{0,5}"|\[|\{|\]|\}|, ?)){0,12}"#,
            0..20,
        )
    ) {
        let report = check_text(&lines.join("\n"));
        let _ = report.render();
        prop_assert_eq!(report.stats.rows, report.stats.valid_rows + report.invalid_rows());
    }
}

#[test]
fn render_lists_bad_rows_statistics_and_warnings() {
    let rendered = check_jsonl(&fixture("messages-good.jsonl")).unwrap().render();
    let lines: Vec<&str> = rendered.lines().collect();
    assert!(
        lines[0].ends_with(
            "messages-good.jsonl: OK: 3 of 3 rows valid, 0 invalid; messages format (rows per format: messages 3)"
        ),
        "{rendered}"
    );
    for expected in [
        "  turns per row                1       1       2       2       1.3",
        "  assistant turn chars         3       3     155     155      41.8",
        "  single-turn rows      67% (2 of 3)",
        "  - 75% of assistant answers are under 20 characters: a model fine-tuned on this learns to answer tersely",
    ] {
        assert!(lines.contains(&expected), "{expected:?} not in\n{rendered}");
    }
    let report = check_jsonl(&fixture("messages-bad.jsonl")).unwrap();
    let rendered = report.render();
    let listed: Vec<&str> =
        rendered.lines().filter(|line| line.starts_with("  ") && line.contains("messages-bad.jsonl:")).collect();
    assert_eq!(listed.len(), 7, "{rendered}");
    assert!(
        listed[6].ends_with("messages-bad.jsonl:7: row is in ShareGPT format, the rest of the file is messages format")
    );
}
