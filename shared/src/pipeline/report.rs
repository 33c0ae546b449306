//! The comparison report of a pipeline: the answers of the model before and
//! after training side by side (from `swift infer` result files), how their
//! length and style changed, and benchmark scores before and after with the
//! differences. Rendered as Markdown and as a self-contained HTML page.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportError {
    #[error("{source_name}:{line}: {message}")]
    BadLine { source_name: String, line: usize, message: String },
}

/// One answered prompt of a `swift infer` result file.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The last user turn (earlier turns are context).
    pub prompt: String,
    pub response: String,
}

/// Reads a `swift infer --result_path` file: one JSON object per line with
/// `response` and `messages` (the prompt rows, the answer appended as the
/// last assistant turn). Every line must parse: a report from half a file misleads.
pub fn read_answers(text: &str, source_name: &str) -> Result<Vec<Answer>, ReportError> {
    let mut answers = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |message: String| ReportError::BadLine { source_name: source_name.to_owned(), line: index + 1, message };
        let row: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let response = row
            .get("response")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"response\" text: is this a `swift infer --result_path` file?".into()))?;
        let messages = row.get("messages").and_then(Value::as_array).cloned().unwrap_or_default();
        let prompt = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
            .map(content_text)
            .or_else(|| row.get("query").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| bad("no user message in \"messages\"".into()))?;
        answers.push(Answer { prompt, response: response.to_owned() });
    }
    Ok(answers)
}

/// Message content is text, or a list of parts of which the text ones count.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        other => other.to_string(),
    }
}

/// Benchmark scores from an evaluation's output files: evalscope reports
/// (`{"dataset_name": "gsm8k", "score": 0.71, ...}`), and flat objects of
/// `{"benchmark": score}` (ms-swift's `eval_result.jsonl`, or a job's own
/// tool). Later files win for the same benchmark.
pub fn read_scores(files: &[(String, String)]) -> BTreeMap<String, f64> {
    let mut scores = BTreeMap::new();
    for (_, text) in files {
        let values: Vec<Value> = match serde_json::from_str::<Value>(text) {
            Ok(value) => vec![value],
            Err(_) => text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect(),
        };
        for value in values {
            let Value::Object(object) = value else { continue };
            let name = object.get("dataset_name").or_else(|| object.get("name")).and_then(Value::as_str);
            match (name, object.get("score").and_then(Value::as_f64)) {
                (Some(name), Some(score)) => {
                    scores.insert(name.to_owned(), score);
                }
                _ => {
                    for (key, value) in &object {
                        if let Some(score) = value.as_f64() {
                            scores.insert(key.clone(), score);
                        }
                    }
                }
            }
        }
    }
    scores
}

/// Length and style of a set of answers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Style {
    pub answers: usize,
    pub mean_words: f64,
    pub median_words: f64,
    pub mean_chars: f64,
    /// Share (0-1) of answers with a bulleted or numbered list.
    pub with_lists: f64,
    /// Share of answers with a fenced code block.
    pub with_code: f64,
    /// Share of answers with more than one paragraph.
    pub multi_paragraph: f64,
    /// Share of answers of 20 words or fewer.
    pub terse: f64,
}

pub fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

fn has_list(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start();
        line.starts_with("- ")
            || line.starts_with("* ")
            || line.split_once(". ").is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    })
}

impl Style {
    pub fn of<'a>(answers: impl IntoIterator<Item = &'a str>) -> Style {
        let answers: Vec<&str> = answers.into_iter().collect();
        let n = answers.len();
        if n == 0 {
            return Style::default();
        }
        let share = |test: &dyn Fn(&str) -> bool| answers.iter().filter(|a| test(a)).count() as f64 / n as f64;
        let mut counts: Vec<usize> = answers.iter().map(|a| words(a)).collect();
        counts.sort_unstable();
        let median = if n % 2 == 1 { counts[n / 2] as f64 } else { (counts[n / 2 - 1] + counts[n / 2]) as f64 / 2.0 };
        Style {
            answers: n,
            mean_words: counts.iter().sum::<usize>() as f64 / n as f64,
            median_words: median,
            mean_chars: answers.iter().map(|a| a.chars().count()).sum::<usize>() as f64 / n as f64,
            with_lists: share(&has_list),
            with_code: share(&|a| a.contains("```")),
            multi_paragraph: share(&|a| a.trim().contains("\n\n")),
            terse: share(&|a| words(a) <= 20),
        }
    }
}

/// A benchmark's score before and after (None where a run reported none).
pub type ScoreRow = (String, Option<f64>, Option<f64>);

/// One prompt with both answers.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedAnswer {
    pub prompt: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    /// e.g. "qwen3-ft-7".
    pub title: String,
    /// Per infer stage: its name and the prompts with both answers.
    pub comparisons: Vec<(String, Vec<PairedAnswer>)>,
    /// Per eval stage: its name and (benchmark, before, after).
    pub scores: Vec<(String, Vec<ScoreRow>)>,
}

/// Pairs the answers of the same prompts (by prompt text, in the before file's order).
pub fn pair(before: &[Answer], after: &[Answer]) -> Vec<PairedAnswer> {
    let mut remaining: Vec<Option<&Answer>> = after.iter().map(Some).collect();
    let mut pairs = Vec::new();
    for answer in before {
        let matched =
            remaining.iter_mut().find(|a| a.is_some_and(|a| a.prompt == answer.prompt)).and_then(Option::take);
        pairs.push(PairedAnswer {
            prompt: answer.prompt.clone(),
            before: Some(answer.response.clone()),
            after: matched.map(|a| a.response.clone()),
        });
    }
    for answer in remaining.into_iter().flatten() {
        pairs.push(PairedAnswer { prompt: answer.prompt.clone(), before: None, after: Some(answer.response.clone()) });
    }
    pairs
}

/// Scores of both runs, one row per benchmark either has.
pub fn score_rows(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> Vec<(String, Option<f64>, Option<f64>)> {
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    names.into_iter().map(|name| (name.clone(), before.get(name).copied(), after.get(name).copied())).collect()
}

fn percent_change(before: f64, after: f64) -> Option<f64> {
    (before > 0.0).then(|| (after - before) / before * 100.0)
}

/// One sentence on how length and style changed, e.g. "Answers got 71% shorter
/// (median 182 → 41 words); lists 60% → 0%: the model became terse."
pub fn summary(pairs: &[PairedAnswer]) -> String {
    let before = Style::of(pairs.iter().filter_map(|p| p.before.as_deref()));
    let after = Style::of(pairs.iter().filter_map(|p| p.after.as_deref()));
    if before.answers == 0 || after.answers == 0 {
        return "Not enough answers to compare.".to_owned();
    }
    let mut text = match percent_change(before.mean_words, after.mean_words) {
        Some(change) if change <= -10.0 => format!("Answers got {:.0}% shorter", -change),
        Some(change) if change >= 10.0 => format!("Answers got {change:.0}% longer"),
        _ => "Answer length stayed about the same".to_owned(),
    };
    let _ = write!(
        text,
        " (mean {:.0} → {:.0} words, median {:.0} → {:.0})",
        before.mean_words, after.mean_words, before.median_words, after.median_words
    );
    let mut style = Vec::new();
    let mut note = |what: &str, b: f64, a: f64| {
        if (a - b).abs() >= 0.2 {
            style.push(format!("{what} {:.0}% → {:.0}%", b * 100.0, a * 100.0));
        }
    };
    note("answers with lists", before.with_lists, after.with_lists);
    note("with code blocks", before.with_code, after.with_code);
    note("with several paragraphs", before.multi_paragraph, after.multi_paragraph);
    note("of 20 words or fewer", before.terse, after.terse);
    if !style.is_empty() {
        let _ = write!(text, "; {}", style.join(", "));
    }
    if after.terse - before.terse >= 0.3 || (after.mean_words < before.mean_words * 0.5 && after.mean_words < 40.0) {
        text.push_str(": the model became terse");
    }
    text.push('.');
    text
}

fn fmt_score(score: Option<f64>) -> String {
    score.map(|s| format!("{s:.4}")).unwrap_or_else(|| "–".to_owned())
}

fn fmt_delta(before: Option<f64>, after: Option<f64>) -> String {
    match (before, after) {
        (Some(b), Some(a)) => format!("{:+.4}", a - b),
        _ => "–".to_owned(),
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = format!("# Before and after training: {}\n", self.title);
        for (stage, rows) in &self.scores {
            let _ = write!(
                md,
                "\n## Benchmark scores ({stage})\n\n| benchmark | before | after | change |\n|---|---:|---:|---:|\n"
            );
            for (name, before, after) in rows {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    md_cell(name),
                    fmt_score(*before),
                    fmt_score(*after),
                    fmt_delta(*before, *after)
                );
            }
        }
        for (stage, pairs) in &self.comparisons {
            let before = Style::of(pairs.iter().filter_map(|p| p.before.as_deref()));
            let after = Style::of(pairs.iter().filter_map(|p| p.after.as_deref()));
            let _ = write!(md, "\n## Answers ({stage})\n\n{}\n\n", summary(pairs));
            md.push_str("| | before | after |\n|---|---:|---:|\n");
            let _ = writeln!(md, "| answers | {} | {} |", before.answers, after.answers);
            let _ = writeln!(md, "| mean words | {:.1} | {:.1} |", before.mean_words, after.mean_words);
            let _ = writeln!(md, "| median words | {:.1} | {:.1} |", before.median_words, after.median_words);
            let _ = writeln!(md, "| mean characters | {:.1} | {:.1} |", before.mean_chars, after.mean_chars);
            let pct = |v: f64| format!("{:.0}%", v * 100.0);
            let _ = writeln!(md, "| with lists | {} | {} |", pct(before.with_lists), pct(after.with_lists));
            let _ = writeln!(md, "| with code blocks | {} | {} |", pct(before.with_code), pct(after.with_code));
            let _ = writeln!(
                md,
                "| several paragraphs | {} | {} |",
                pct(before.multi_paragraph),
                pct(after.multi_paragraph)
            );
            let _ = writeln!(md, "| 20 words or fewer | {} | {} |", pct(before.terse), pct(after.terse));
            md.push_str("\n| # | prompt | before | after | words before → after |\n|---:|---|---|---|---|\n");
            for (index, pair) in pairs.iter().enumerate() {
                let count =
                    |a: &Option<String>| a.as_deref().map(|t| words(t).to_string()).unwrap_or_else(|| "–".into());
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} → {} |",
                    index + 1,
                    md_cell(&pair.prompt),
                    md_cell(pair.before.as_deref().unwrap_or("(no answer)")),
                    md_cell(pair.after.as_deref().unwrap_or("(no answer)")),
                    count(&pair.before),
                    count(&pair.after)
                );
            }
        }
        md
    }

    pub fn html(&self) -> String {
        let mut html = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title><style>\n\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}}\n\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}}\n\
             td.answer{{white-space:pre-wrap;width:40%}}td.num{{text-align:right}}.up{{color:#1a7f37}}.down{{color:#cf222e}}\n\
             </style></head><body>\n<h1>Before and after training: {0}</h1>\n",
            escape(&self.title)
        );
        for (stage, rows) in &self.scores {
            let _ = write!(
                html,
                "<h2>Benchmark scores ({})</h2>\n<table><tr><th>benchmark</th><th>before</th><th>after</th><th>change</th></tr>\n",
                escape(stage)
            );
            for (name, before, after) in rows {
                let class = match (before, after) {
                    (Some(b), Some(a)) if a > b => "num up",
                    (Some(b), Some(a)) if a < b => "num down",
                    _ => "num",
                };
                let _ = writeln!(
                    html,
                    "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"{class}\">{}</td></tr>",
                    escape(name),
                    fmt_score(*before),
                    fmt_score(*after),
                    fmt_delta(*before, *after)
                );
            }
            html.push_str("</table>\n");
        }
        for (stage, pairs) in &self.comparisons {
            let _ = write!(
                html,
                "<h2>Answers ({})</h2>\n<p>{}</p>\n<table><tr><th>#</th><th>prompt</th><th>before</th><th>after</th><th>words</th></tr>\n",
                escape(stage),
                escape(&summary(pairs))
            );
            for (index, pair) in pairs.iter().enumerate() {
                let count =
                    |a: &Option<String>| a.as_deref().map(|t| words(t).to_string()).unwrap_or_else(|| "–".into());
                let _ = writeln!(
                    html,
                    "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"answer\">{}</td><td class=\"answer\">{}</td><td class=\"num\">{} → {}</td></tr>",
                    index + 1,
                    escape(&pair.prompt),
                    escape(pair.before.as_deref().unwrap_or("(no answer)")),
                    escape(pair.after.as_deref().unwrap_or("(no answer)")),
                    count(&pair.before),
                    count(&pair.after)
                );
            }
            html.push_str("</table>\n");
        }
        html.push_str("</body></html>\n");
        html
    }
}

/// Markdown table cells: no pipes or newlines.
fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace("\r\n", "<br>").replace('\n', "<br>")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
