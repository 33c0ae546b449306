//! torchrun's `ChildFailedError` trailer: which rank failed first, how it died.
//!
//! ```text
//! Root Cause (first observed failure):
//! [0]:
//!   rank      : 4 (local_rank: 4)
//!   exitcode  : -9 (pid: 208585)
//!   traceback : Signal 9 (SIGKILL) received by PID 208585
//! ```

/// The first failed rank as torchrun reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildFailure {
    /// Global rank.
    pub rank: u32,
    pub local_rank: Option<u32>,
    /// Negative for a signal, as in Python's `Popen.returncode`.
    pub exit_code: i32,
    pub pid: Option<u32>,
    /// e.g. `SIGKILL`, from the traceback line or a negative exit code.
    pub signal: Option<String>,
}

/// Reads a process's output line by line and keeps the root cause of the last
/// `ChildFailedError` trailer seen.
#[derive(Debug, Default)]
pub struct ChildFailureParser {
    in_root_cause: bool,
    current: Partial,
    root_cause: Option<ChildFailure>,
}

#[derive(Debug, Default)]
struct Partial {
    rank: Option<u32>,
    local_rank: Option<u32>,
    exit_code: Option<i32>,
    pid: Option<u32>,
    signal: Option<String>,
}

impl ChildFailureParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line of output (with or without its newline).
    pub fn feed(&mut self, line: &str) {
        let line = line.trim();
        if line.starts_with("Root Cause") {
            self.in_root_cause = true;
            self.current = Partial::default();
            return;
        }
        if !self.in_root_cause {
            return;
        }
        // The block ends at torchrun's ruler lines.
        if line.starts_with("===") || line.starts_with("---") {
            self.in_root_cause = false;
            return;
        }
        if let Some(value) = field(line, "rank") {
            let (number, inner) = split_parenthesised(value);
            self.current.rank = number.parse().ok();
            self.current.local_rank = inner.and_then(|inner| field(inner, "local_rank")).and_then(|v| v.parse().ok());
        } else if let Some(value) = field(line, "exitcode") {
            let (number, inner) = split_parenthesised(value);
            self.current.exit_code = number.parse().ok();
            self.current.pid = inner.and_then(|inner| field(inner, "pid")).and_then(|v| v.parse().ok());
        } else if let Some(value) = field(line, "traceback") {
            // "Signal 9 (SIGKILL) received by PID 208585"
            if value.starts_with("Signal") {
                self.current.signal = value
                    .split_once('(')
                    .and_then(|(_, rest)| rest.split_once(')'))
                    .map(|(name, _)| name.trim().to_owned())
                    .filter(|name| !name.is_empty());
            }
        }
        if let (Some(rank), Some(exit_code)) = (self.current.rank, self.current.exit_code) {
            let signal = self.current.signal.clone().or_else(|| {
                (exit_code < 0).then(|| {
                    let number = exit_code.unsigned_abs();
                    signal_name(number).map_or_else(|| format!("signal {number}"), str::to_owned)
                })
            });
            self.root_cause = Some(ChildFailure {
                rank,
                local_rank: self.current.local_rank,
                exit_code,
                pid: self.current.pid,
                signal,
            });
        }
    }

    /// The first failed rank of the last trailer, once its rank and exit code were seen.
    pub fn root_cause(&self) -> Option<ChildFailure> {
        self.root_cause.clone()
    }
}

/// The value of `name : value` when the line is that field.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(name)?.trim_start();
    Some(rest.strip_prefix(':')?.trim())
}

/// `"4 (local_rank: 4)"` → `("4", Some("local_rank: 4"))`.
fn split_parenthesised(value: &str) -> (&str, Option<&str>) {
    match value.split_once('(') {
        Some((head, rest)) => (head.trim(), Some(rest.trim_end_matches(')').trim())),
        None => (value.trim(), None),
    }
}

/// The conventional name of a Linux signal number ("SIGKILL" for 9), for the
/// signals a dying training process usually gets.
pub fn signal_name(number: u32) -> Option<&'static str> {
    Some(match number {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

/// "code 3" or "signal 9 (SIGKILL)".
pub fn describe_exit(exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (exit_code, signal) {
        (_, Some(sig)) => match signal_name(sig.unsigned_abs()) {
            Some(name) => format!("signal {sig} ({name})"),
            None => format!("signal {sig}"),
        },
        (Some(code), None) => format!("code {code}"),
        (None, None) => "an unknown status".to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<ChildFailure> {
        let mut parser = ChildFailureParser::new();
        text.lines().for_each(|line| parser.feed(line));
        parser.root_cause()
    }

    #[test]
    fn only_the_root_cause_counts_not_other_failures() {
        let text = "\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/x/sft.py FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2025-01-01_00:00:00
  rank      : 5 (local_rank: 1)
  exitcode  : 1 (pid: 11)
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-01-01_00:00:00
  host      : node-1
  rank      : 2 (local_rank: 0)
  exitcode  : -11 (pid: 12)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
  rank      : 9 (local_rank: 9)
";
        assert_eq!(
            parse(text),
            Some(ChildFailure {
                rank: 2,
                local_rank: Some(0),
                exit_code: -11,
                pid: Some(12),
                signal: Some("SIGSEGV".into()),
            })
        );
    }

    #[test]
    fn a_plain_exit_has_no_signal() {
        let failure = parse(
            "Root Cause (first observed failure):\n[0]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 7)\n",
        )
        .unwrap();
        assert_eq!((failure.exit_code, failure.signal), (1, None));
    }

    #[test]
    fn nothing_before_a_trailer() {
        assert_eq!(parse("rank : 3\nexitcode : 1\n"), None);
        assert_eq!(parse("Root Cause (first observed failure):\n  rank : 3\n"), None);
    }
}
