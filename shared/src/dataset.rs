//! Checks an SFT dataset before a job spends GPU hours on it: streams a JSONL
//! file, recognises each row's schema (messages, ShareGPT, query/response,
//! alpaca), applies ms-swift's `_check_messages` rules and the turn order its
//! templates expect, and gathers statistics that predict how the fine-tuned
//! model will behave (terse answers, no multi-turn data).
//!
//! ms-swift itself drops a bad row with only a log line (`--strict true` makes
//! it fail), so a dataset can silently lose rows; this reports every one.

mod row;
mod stats;

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use row::{RowOutcome, check_row};
pub use stats::Distribution;
use stats::StatsAccumulator;

/// An assistant answer shorter than this many characters counts as short.
pub const SHORT_ANSWER_CHARS: usize = 20;
/// At most this many problems are kept; the rest are only counted.
pub const MAX_REPORTED_PROBLEMS: usize = 1000;
/// Warn when at least this share of assistant answers is short.
const SHORT_ANSWERS_WARN_SHARE: f64 = 0.5;
/// Warn when at least this share of rows has a single assistant answer.
const SINGLE_TURN_WARN_SHARE: f64 = 0.9;
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The schema a row is written in; all four are accepted by `megatron sft --dataset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// `{"messages": [{"role": ..., "content": ...}, ...]}`
    Messages,
    /// `{"conversations"|"conversation": [{"from": ..., "value": ...}, ...]}`, or
    /// ms-swift's `[{"human": ..., "assistant": ...}]` pairs.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// `{"query": ..., "response": ..., "history": [[q, r], ...]}`, with ms-swift's
    /// aliases prompt/question and answer/completion.
    QueryResponse,
    /// `{"instruction": ..., "input": ..., "output": ...}`
    Alpaca,
    /// A JSON object with none of the keys above.
    Unknown,
}

impl fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatasetFormat::Messages => "messages",
            DatasetFormat::ShareGpt => "ShareGPT",
            DatasetFormat::QueryResponse => "query/response",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Unknown => "unknown",
        })
    }
}

/// A row ms-swift would drop (or fail on, with `--strict true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowProblem {
    /// 1-based line number in the file, counting empty lines.
    pub line: usize,
    pub reason: String,
}

/// Statistics over the valid rows of the majority format; lengths are in
/// characters (Unicode scalar values), not bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Non-empty lines.
    pub rows: usize,
    pub valid_rows: usize,
    /// Blank lines, skipped.
    pub empty_lines: usize,
    /// Assistant answers per valid row.
    pub turns_per_row: Distribution,
    pub user_chars: Distribution,
    pub assistant_chars: Distribution,
    /// Valid rows with exactly one assistant answer, and their share of the valid rows.
    pub single_turn_rows: usize,
    pub share_single_turn: f64,
    /// Assistant answers under [`SHORT_ANSWER_CHARS`] characters, and their share of all answers.
    pub short_answers: usize,
    pub share_short_answers: f64,
    pub empty_answers: usize,
    pub system_prompt_rows: usize,
    /// Rows with tool_call/tool_response/tool turns.
    pub tool_rows: usize,
}

/// The outcome of checking one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetReport {
    pub path: String,
    /// The format most rows are in; rows in any other format are problems.
    pub format: DatasetFormat,
    /// Rows per format; lines that are not JSON objects are in no format.
    pub formats: BTreeMap<DatasetFormat, usize>,
    /// The first [`MAX_REPORTED_PROBLEMS`] bad rows, in line order.
    pub problems: Vec<RowProblem>,
    /// Bad rows beyond those listed in `problems`.
    pub problems_omitted: usize,
    pub stats: DatasetStats,
    pub warnings: Vec<String>,
}

/// What a job does when its dataset has problems (`dataset_policy:` in a job file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetPolicy {
    /// Refuse to start the job (the default).
    #[default]
    Fail,
    /// Start it anyway (ms-swift drops the bad rows), unless no row is valid.
    Warn,
}

impl DatasetPolicy {
    /// Whether a job may start with this dataset.
    pub fn allows(self, report: &DatasetReport) -> bool {
        match self {
            DatasetPolicy::Fail => report.is_ok(),
            DatasetPolicy::Warn => report.stats.valid_rows > 0,
        }
    }
}

/// The dataset file could not be read; bad rows are never an error, they are in the report.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset {}: cannot open: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("dataset {}: read failed after line {line}: {source}", path.display())]
    Read { path: PathBuf, line: usize, source: io::Error },
}

/// Checks a JSONL dataset line by line, never holding more than one line in
/// memory, and never stopping at a bad row.
pub fn check_jsonl(path: &Path) -> Result<DatasetReport, DatasetError> {
    let file = File::open(path).map_err(|source| DatasetError::Open { path: path.to_owned(), source })?;
    let mut scan = Scan::default();
    match scan.read(BufReader::with_capacity(1 << 20, file)) {
        Ok(()) => Ok(scan.finish(&path.display().to_string())),
        Err(source) => Err(DatasetError::Read { path: path.to_owned(), line: scan.line, source }),
    }
}

/// Checks JSONL from any reader; `name` is what the report calls it. A read
/// error ends the check and is reported as a problem on the line it hit.
pub fn check_reader(name: &str, reader: impl BufRead) -> DatasetReport {
    let mut scan = Scan::default();
    let failure = scan.read(reader).err();
    let line = scan.line + 1;
    let mut report = scan.finish(name);
    if let Some(error) = failure {
        let reason = format!("read failed: {error}; the rest of the input was not checked");
        report.problems.push(RowProblem { line, reason });
    }
    report
}

impl DatasetReport {
    /// True when every row is valid and there is at least one.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.stats.valid_rows > 0
    }

    /// Bad rows, listed or not.
    pub fn invalid_rows(&self) -> usize {
        self.problems.len() + self.problems_omitted
    }

    /// A summary line, each bad row as `  path:LINE: reason`, a statistics
    /// table and the warnings.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    fn write_to(&self, out: &mut String) -> fmt::Result {
        let stats = &self.stats;
        let formats: Vec<String> = self.formats.iter().map(|(format, rows)| format!("{format} {rows}")).collect();
        let formats = if formats.is_empty() { "none".to_owned() } else { formats.join(", ") };
        let verdict = if self.is_ok() { "OK" } else { "FAILED" };
        writeln!(
            out,
            "dataset {}: {verdict}: {} of {} {} valid, {} invalid; {} format (rows per format: {formats})",
            self.path,
            stats.valid_rows,
            stats.rows,
            plural(stats.rows, "row", "rows"),
            self.invalid_rows(),
            self.format,
        )?;
        for problem in &self.problems {
            writeln!(out, "  {}:{}: {}", self.path, problem.line, problem.reason)?;
        }
        if self.problems_omitted > 0 {
            writeln!(out, "  ... and {} more bad rows", self.problems_omitted)?;
        }
        writeln!(out, "statistics over {} valid {}:", stats.valid_rows, plural(stats.valid_rows, "row", "rows"))?;
        writeln!(out, "  {:<22}{:>8}{:>8}{:>8}{:>8}{:>10}", "", "min", "p50", "p90", "max", "mean")?;
        for (label, distribution) in [
            ("turns per row", &stats.turns_per_row),
            ("user turn chars", &stats.user_chars),
            ("assistant turn chars", &stats.assistant_chars),
        ] {
            if distribution.count == 0 {
                writeln!(out, "  {label:<22}{:>8}{:>8}{:>8}{:>8}{:>10}", "-", "-", "-", "-", "-")?;
            } else {
                let Distribution { min, p50, p90, max, mean, .. } = distribution;
                writeln!(out, "  {label:<22}{min:>8}{p50:>8}{p90:>8}{max:>8}{mean:>10.1}")?;
            }
        }
        let answers = stats.assistant_chars.count;
        writeln!(
            out,
            "  single-turn rows      {} ({} of {})",
            percent(stats.share_single_turn),
            stats.single_turn_rows,
            stats.valid_rows
        )?;
        writeln!(
            out,
            "  short answers         {} under {SHORT_ANSWER_CHARS} chars ({} of {answers})",
            percent(stats.share_short_answers),
            stats.short_answers
        )?;
        writeln!(out, "  system prompt rows    {}", stats.system_prompt_rows)?;
        writeln!(out, "  tool rows             {}", stats.tool_rows)?;
        writeln!(out, "  empty lines skipped   {}", stats.empty_lines)?;
        if !self.warnings.is_empty() {
            writeln!(out, "warnings:")?;
            for warning in &self.warnings {
                writeln!(out, "  - {warning}")?;
            }
        }
        Ok(())
    }
}

/// Problems from one source, keeping only the first [`MAX_REPORTED_PROBLEMS`].
#[derive(Debug, Default)]
struct ProblemLog {
    first: Vec<RowProblem>,
    total: usize,
}

impl ProblemLog {
    fn push(&mut self, line: usize, reason: String) {
        self.total += 1;
        if self.first.len() < MAX_REPORTED_PROBLEMS {
            self.first.push(RowProblem { line, reason });
        }
    }
}

/// Rows of one known format. Which format is the majority is only known at the
/// end, so each keeps its own statistics, problems and first line numbers.
#[derive(Debug, Default)]
struct FormatTally {
    rows: usize,
    /// The first lines of this format, reported if it turns out to be a minority.
    lines: Vec<usize>,
    problems: ProblemLog,
    stats: StatsAccumulator,
}

/// The state of one pass over the input.
#[derive(Debug, Default)]
struct Scan {
    line: usize,
    rows: usize,
    empty_lines: usize,
    bom: bool,
    /// Rows in no known format: not JSON, not an object, unknown keys.
    unformatted: ProblemLog,
    unknown_rows: usize,
    tallies: BTreeMap<DatasetFormat, FormatTally>,
}

impl Scan {
    fn read(&mut self, mut reader: impl BufRead) -> io::Result<()> {
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            if reader.read_until(b'\n', &mut buffer)? == 0 {
                return Ok(());
            }
            self.line(&buffer);
        }
    }

    fn line(&mut self, bytes: &[u8]) {
        self.line += 1;
        let mut bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        if self.line == 1
            && let Some(rest) = bytes.strip_prefix(UTF8_BOM)
        {
            self.bom = true;
            bytes = rest;
        }
        if bytes.iter().all(|byte| matches!(byte, b' ' | b'\t' | b'\r')) {
            self.empty_lines += 1;
            return;
        }
        self.rows += 1;
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => {
                let reason = format!("line is not valid UTF-8 (bad byte at offset {})", error.valid_up_to());
                self.unformatted.push(self.line, reason);
                return;
            }
        };
        let RowOutcome { format, conversation } = check_row(text);
        match (format, conversation) {
            (None, Err(reason)) => self.unformatted.push(self.line, reason),
            (Some(DatasetFormat::Unknown), result) => {
                self.unknown_rows += 1;
                let reason = result.err().unwrap_or_else(|| "row is in no known format".to_owned());
                self.unformatted.push(self.line, reason);
            }
            (Some(format), result) => {
                let tally = self.tallies.entry(format).or_default();
                tally.rows += 1;
                if tally.lines.len() < MAX_REPORTED_PROBLEMS {
                    tally.lines.push(self.line);
                }
                match result {
                    Ok(conversation) => tally.stats.add(&conversation),
                    Err(reason) => tally.problems.push(self.line, reason),
                }
            }
            // check_row gives every line that is not an object an error.
            (None, Ok(_)) => self.unformatted.push(self.line, "row is not a JSON object".to_owned()),
        }
    }

    fn finish(self, name: &str) -> DatasetReport {
        let majority = self
            .tallies
            .iter()
            .max_by(|a, b| a.1.rows.cmp(&b.1.rows).then(b.0.cmp(a.0)))
            .map_or(DatasetFormat::Unknown, |(format, _)| *format);
        let mut formats: BTreeMap<DatasetFormat, usize> =
            self.tallies.iter().map(|(format, tally)| (*format, tally.rows)).collect();
        if self.unknown_rows > 0 {
            formats.insert(DatasetFormat::Unknown, self.unknown_rows);
        }
        let known_rows: usize = self.tallies.values().map(|tally| tally.rows).sum();

        let mut problems = self.unformatted.first;
        let mut total = self.unformatted.total;
        let mut accumulator = StatsAccumulator::default();
        for (format, tally) in self.tallies {
            if format == majority {
                problems.extend(tally.problems.first);
                total += tally.problems.total;
                accumulator = tally.stats;
                continue;
            }
            let majority_rows = formats.get(&majority).copied().unwrap_or(0);
            let reason = if tally.rows + majority_rows == known_rows {
                format!("row is in {format} format, the rest of the file is {majority} format")
            } else {
                format!(
                    "row is in {format} format, most of the file ({majority_rows} of {known_rows} rows) is {majority} format"
                )
            };
            problems.extend(tally.lines.into_iter().map(|line| RowProblem { line, reason: reason.clone() }));
            total += tally.rows;
        }
        problems.sort_by_key(|problem| problem.line);
        problems.truncate(MAX_REPORTED_PROBLEMS);
        let problems_omitted = total.saturating_sub(problems.len());

        let assistant_chars = accumulator.assistant_chars.summary();
        let stats = DatasetStats {
            rows: self.rows,
            valid_rows: accumulator.rows,
            empty_lines: self.empty_lines,
            turns_per_row: accumulator.turns.summary(),
            user_chars: accumulator.user_chars.summary(),
            assistant_chars,
            single_turn_rows: accumulator.single_turn_rows,
            share_single_turn: share(accumulator.single_turn_rows as u64, accumulator.rows as u64),
            short_answers: accumulator.short_answers,
            share_short_answers: share(accumulator.short_answers as u64, assistant_chars.count),
            empty_answers: accumulator.empty_answers,
            system_prompt_rows: accumulator.system_prompt_rows,
            tool_rows: accumulator.tool_rows,
        };
        let mut report = DatasetReport {
            path: name.to_owned(),
            format: majority,
            formats,
            problems,
            problems_omitted,
            stats,
            warnings: Vec::new(),
        };
        report.warnings = warnings(&report, self.bom);
        report
    }
}

fn warnings(report: &DatasetReport, bom: bool) -> Vec<String> {
    let stats = &report.stats;
    let mut warnings = Vec::new();
    if stats.rows == 0 {
        warnings.push("the dataset has no rows".to_owned());
    } else if stats.valid_rows == 0 {
        warnings.push("no row is valid: megatron sft would have nothing to train on".to_owned());
    }
    let invalid = report.invalid_rows();
    if invalid > 0 {
        warnings.push(format!(
            "ms-swift drops the {invalid} invalid {} (\"There are errors in the dataset, the data will be deleted\"), \
             or fails on the first with --strict true",
            plural(invalid, "row", "rows")
        ));
    }
    if report.problems_omitted > 0 {
        warnings.push(format!("only the first {} of {invalid} bad rows are listed", report.problems.len()));
    }
    if stats.assistant_chars.count > 0 && stats.share_short_answers >= SHORT_ANSWERS_WARN_SHARE {
        warnings.push(format!(
            "{} of assistant answers are under {SHORT_ANSWER_CHARS} characters: a model fine-tuned on this learns to \
             answer tersely",
            percent(stats.share_short_answers)
        ));
    }
    if stats.valid_rows > 0 && stats.share_single_turn >= SINGLE_TURN_WARN_SHARE {
        warnings.push(format!(
            "{} of rows are single-turn: a model fine-tuned on this sees few follow-up questions",
            percent(stats.share_single_turn)
        ));
    }
    if stats.empty_answers > 0 {
        warnings.push(format!(
            "{} assistant {} empty",
            stats.empty_answers,
            plural(stats.empty_answers, "answer is", "answers are")
        ));
    }
    if stats.empty_lines > 0 {
        warnings.push(format!(
            "{} empty {} skipped",
            stats.empty_lines,
            plural(stats.empty_lines, "line was", "lines were")
        ));
    }
    if bom {
        warnings.push("line 1 starts with a UTF-8 byte-order mark; it was ignored".to_owned());
    }
    warnings
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

fn percent(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 { one } else { many }
}
