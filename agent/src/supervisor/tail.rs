//! Follows a process's output files (its shim writes them) and sends each new
//! line to the controller, with the training metrics parsed from it and the
//! torchrun root cause kept for the exit report.
//!
//! Polling, not inotify: a read() at EOF costs about a microsecond, and the
//! interval backs off while a process is quiet.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{LogLine, LogStream, now_unix_ms};
use cohort_shared::metrics::{ChildFailure, ChildFailureParser, parse_line};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Outbound, training_point};

/// Longest line kept whole; longer output is split into pieces this long,
/// each cut piece ending with [`SPLIT_MARKER`].
pub const MAX_LINE: usize = 64 * 1024;
/// Ends a piece of a line that was longer than [`MAX_LINE`].
pub const SPLIT_MARKER: &str = " [cohort: line over 64 KiB, continued on the next line]";
/// Bytes of output a process may send to the controller per second on average,
/// and in a burst: more is dropped with a gap record (the files keep it all),
/// so one chatty rank cannot flood the session or the controller's disk.
/// The agent's `--output-rate` and `--output-burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutputBudget {
    /// 0: no limit.
    pub per_second: u64,
    pub burst: u64,
}

impl Default for OutputBudget {
    fn default() -> Self {
        OutputBudget { per_second: 1 << 20, burst: 8 << 20 }
    }
}
/// Poll interval right after output, and the most it backs off to when quiet.
const POLL_BUSY: Duration = Duration::from_millis(20);
const POLL_QUIET: Duration = Duration::from_millis(50);
/// Most bytes read from one file per poll, so one chatty process cannot hog a worker.
const READ_PER_POLL: u64 = 4 << 20;
/// How much of an existing file's end is read to find a torchrun trailer.
const TRAILER_WINDOW: u64 = 64 * 1024;
/// The last lines of a process kept for the failure classifier.
pub const LAST_LINES: usize = 40;

/// Where the lines of one process go.
#[derive(Clone)]
pub struct Destination {
    pub out: mpsc::Sender<Outbound>,
    pub node: String,
    pub job_id: String,
    pub attempt: u32,
    pub index: u32,
    pub budget: OutputBudget,
}

/// Where following starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StartAt {
    /// A new process: every byte.
    Beginning,
    /// An adopted process: what it prints from now on (the earlier output is
    /// in the files, for `FetchLogs`); the end of the files only primes the
    /// root-cause parser.
    End,
}

/// A running follower of a process's stdout and stderr files.
pub struct Follower {
    finish: oneshot::Sender<()>,
    task: JoinHandle<Ended>,
}

/// What the output of a finished process says.
#[derive(Debug, Default)]
pub struct Ended {
    /// torchrun's root cause, described; empty when there was none.
    pub root_cause: String,
    /// The last lines of stdout and stderr, oldest first.
    pub last_lines: Vec<String>,
}

impl Follower {
    pub fn start(dest: Destination, stdout: PathBuf, stderr: PathBuf, from: StartAt) -> Self {
        let (finish, mut finished) = oneshot::channel();
        let mut streams = [Stream::new(LogStream::Stdout, stdout, from), Stream::new(LogStream::Stderr, stderr, from)];
        let task = tokio::spawn(async move {
            let mut delay = POLL_BUSY;
            let mut last = std::collections::VecDeque::with_capacity(LAST_LINES);
            let mut budget = Budget::new(dest.budget);
            loop {
                let mut got = false;
                for s in &mut streams {
                    got |= s.poll(&dest, false, &mut last, &mut budget).await;
                }
                if budget.gap_due() {
                    budget.report_gap(&dest, false).await;
                }
                delay = if got { POLL_BUSY } else { (delay * 3 / 2).min(POLL_QUIET) };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut finished => break,
                }
            }
            // The process is gone: read to the end, unfinished last lines included.
            for s in &mut streams {
                s.poll(&dest, true, &mut last, &mut budget).await;
            }
            budget.report_gap(&dest, true).await;
            // stderr's trailer over stdout's.
            let root_cause = streams.iter().rev().find_map(|s| s.trailer.root_cause()).map(describe);
            Ended { root_cause: root_cause.unwrap_or_default(), last_lines: last.into() }
        });
        Self { finish, task }
    }

    /// Reads the files to their end, sends the rest, and returns the torchrun
    /// root cause seen in the output and the last lines.
    pub async fn finish(self) -> Ended {
        let _ = self.finish.send(());
        self.task.await.unwrap_or_default()
    }
}

/// The torchrun root cause in the end of finished output files (an exit that
/// happened while no agent was following them).
pub fn root_cause_of(files: &[&Path]) -> String {
    // The last file's trailer over the earlier ones'.
    let cause = files.iter().rev().find_map(|path| {
        let mut trailer = ChildFailureParser::new();
        prime(&mut trailer, path);
        trailer.root_cause()
    });
    cause.map(describe).unwrap_or_default()
}

fn describe(c: ChildFailure) -> String {
    let signal = c.signal.map(|s| format!(", {s}")).unwrap_or_default();
    format!("torchrun root cause: rank {} exited with code {}{signal}", c.rank, c.exit_code)
}

/// The last lines of finished output files (an exit seen by a restarted agent).
pub fn last_lines_of(files: &[&Path]) -> Vec<String> {
    let mut lines = Vec::new();
    for path in files {
        let Ok(mut file) = std::fs::File::open(path) else { continue };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut tail = Vec::new();
        if file.seek(SeekFrom::Start(len.saturating_sub(TRAILER_WINDOW))).is_ok() {
            let _ = file.take(TRAILER_WINDOW).read_to_end(&mut tail);
        }
        let text = String::from_utf8_lossy(&tail);
        let all: Vec<&str> = text.lines().collect();
        lines.extend(all[all.len().saturating_sub(LAST_LINES / 2)..].iter().map(|l| l.to_string()));
    }
    lines
}

/// Feeds the last lines of a file to the parser; returns the file's length.
fn prime(trailer: &mut ChildFailureParser, path: &Path) -> u64 {
    let Ok(mut file) = std::fs::File::open(path) else { return 0 };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if file.seek(SeekFrom::Start(len.saturating_sub(TRAILER_WINDOW))).is_ok() {
        let _ = file.take(TRAILER_WINDOW).read_to_end(&mut tail);
    }
    for line in String::from_utf8_lossy(&tail).lines() {
        trailer.feed(line);
    }
    len
}

struct Stream {
    kind: LogStream,
    path: PathBuf,
    file: Option<std::fs::File>,
    offset: u64,
    /// Bytes after the last newline, waiting for the rest of their line.
    partial: Vec<u8>,
    trailer: ChildFailureParser,
    /// Set by the last poll: where the file ended then.
    end: Option<u64>,
}

impl Stream {
    fn new(kind: LogStream, path: PathBuf, from: StartAt) -> Self {
        let mut trailer = ChildFailureParser::new();
        let offset = if from == StartAt::End { prime(&mut trailer, &path) } else { 0 };
        Self { kind, path, file: None, offset, partial: Vec::new(), trailer, end: None }
    }

    /// Sends the lines written since the last poll; with `last`, also an
    /// unfinished last line. Returns whether there was anything new.
    async fn poll(
        &mut self,
        dest: &Destination,
        last: bool,
        kept: &mut std::collections::VecDeque<String>,
        budget: &mut Budget,
    ) -> bool {
        let mut got = false;
        loop {
            let before = self.offset;
            let lines = self.read_lines(last);
            got |= !lines.is_empty();
            for text in lines {
                if kept.len() == LAST_LINES {
                    kept.pop_front();
                }
                kept.push_back(text.clone());
                send(dest, self.kind, text, budget).await;
            }
            // The last poll reads on, a chunk at a time, to the end seen first.
            if !last || self.end.is_none_or(|end| self.offset >= end) || self.offset == before {
                return got;
            }
            // Sending rarely waits: without this a long drain would hold the
            // worker thread, and the session's heartbeats with it.
            tokio::task::yield_now().await;
        }
    }

    /// The complete lines written since the last read (long ones in pieces).
    ///
    /// Plain blocking reads: the files are local and in the page cache, so a
    /// read takes microseconds, less than handing it to a blocking thread.
    fn read_lines(&mut self, last: bool) -> Vec<String> {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else { return Vec::new() };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        // At the end, everything up to the length seen first (an escaped writer
        // may never stop), still READ_PER_POLL at a time.
        if last && self.end.is_none() {
            self.end = Some(file.metadata().map(|m| m.len()).unwrap_or(0));
        }
        let limit = match self.end {
            Some(end) => end.saturating_sub(self.offset).min(READ_PER_POLL),
            None => READ_PER_POLL,
        };
        let before = self.partial.len();
        let n = file.take(limit).read_to_end(&mut self.partial).unwrap_or(0);
        self.partial.truncate(before + n);
        self.offset += n as u64;
        let at_end = self.end.is_some_and(|end| self.offset >= end || n == 0);
        let (lines, used) = split_lines(&self.partial, at_end);
        for text in &lines {
            self.trailer.feed(text);
        }
        self.partial.drain(..used);
        lines
    }
}

/// The lines in `bytes` (without their endings; a line longer than
/// [`MAX_LINE`] in pieces, cut at a character boundary and marked) and how
/// many bytes they used; with `last`, an unfinished last line too.
pub fn split_lines(bytes: &[u8], last: bool) -> (Vec<String>, usize) {
    let mut lines = Vec::new();
    let mut start = 0;
    loop {
        let rest = &bytes[start..];
        let (end, cut) = match rest.iter().take(MAX_LINE).position(|b| *b == b'\n') {
            Some(pos) => (start + pos + 1, false),
            // Back off to the start of a UTF-8 character, so the piece stays readable.
            None if rest.len() >= MAX_LINE => {
                let boundary = (MAX_LINE - 3..=MAX_LINE)
                    .rev()
                    .find(|&i| rest.get(i).is_none_or(|b| b & 0xC0 != 0x80))
                    .unwrap_or(MAX_LINE);
                (start + boundary, true)
            }
            None if last && !rest.is_empty() => (bytes.len(), false),
            None => break,
        };
        let mut text = String::from_utf8_lossy(&bytes[start..end]).trim_end_matches(['\n', '\r']).to_string();
        if cut {
            text.push_str(SPLIT_MARKER);
        }
        lines.push(text);
        start = end;
    }
    (lines, start)
}

/// A token bucket of output bytes, and what was dropped since the last gap record.
pub struct Budget {
    limit: OutputBudget,
    tokens: u64,
    refilled: tokio::time::Instant,
    /// Bytes dropped and not yet reported.
    dropped: u64,
    reported: tokio::time::Instant,
}

impl Budget {
    pub fn new(limit: OutputBudget) -> Self {
        let now = tokio::time::Instant::now();
        Budget { limit, tokens: limit.burst, refilled: now, dropped: 0, reported: now }
    }

    /// Whether a gap record should go out while output is still being dropped
    /// (at most one a second).
    fn gap_due(&self) -> bool {
        self.dropped > 0 && self.reported.elapsed() >= GAP_REPORT_EVERY
    }

    /// Whether `bytes` more may be sent now (and takes them if so).
    fn take(&mut self, bytes: u64) -> bool {
        if self.limit.per_second == 0 {
            return true;
        }
        let now = tokio::time::Instant::now();
        let earned = (now.duration_since(self.refilled).as_secs_f64() * self.limit.per_second as f64) as u64;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(self.limit.burst);
            self.refilled = now;
        }
        if self.tokens < bytes {
            return false;
        }
        self.tokens -= bytes;
        true
    }

    /// Sends the gap record for the bytes dropped so far, if any: without
    /// waiting on a full queue (the count then waits for the next try), or,
    /// with `at_end`, waiting a little, since there will be no next try.
    async fn report_gap(&mut self, dest: &Destination, at_end: bool) {
        if self.dropped == 0 {
            return;
        }
        let text = format!(
            "[cohort: {} bytes of output dropped on node {} process {} (over the output budget of {} KiB/s, or a full queue); the node's output files keep everything]",
            self.dropped,
            dest.node,
            dest.index,
            self.limit.per_second / 1024
        );
        let line = LogLine {
            process_index: dest.index,
            stream: LogStream::Stderr as i32,
            text,
            unix_ms: now_unix_ms(),
            dropped_bytes: self.dropped,
        };
        let item = Outbound::Line { job_id: dest.job_id.clone(), attempt: dest.attempt, line };
        let sent = match at_end {
            true => dest.out.send_timeout(item, GAP_REPORT_WAIT).await.is_ok(),
            false => dest.out.try_send(item).is_ok(),
        };
        if sent {
            self.dropped = 0;
            self.reported = tokio::time::Instant::now();
        }
    }
}

/// How long a process's last gap record may wait for room in the queue.
const GAP_REPORT_WAIT: Duration = Duration::from_secs(5);
/// Gap records of a process that keeps dropping go out this often.
const GAP_REPORT_EVERY: Duration = Duration::from_secs(1);

async fn send(dest: &Destination, kind: LogStream, text: String, budget: &mut Budget) {
    // Metrics go first so that they are never dropped with a line.
    if let Some(metrics) = parse_line(&text) {
        let point = training_point(metrics, &dest.node);
        let _ = dest.out.send(Outbound::Metrics { job_id: dest.job_id.clone(), attempt: dest.attempt, point }).await;
    }
    let bytes = text.len() as u64 + 1;
    if !budget.take(bytes) {
        budget.dropped += bytes;
        return;
    }
    budget.report_gap(dest, false).await;
    let line =
        LogLine { process_index: dest.index, stream: kind as i32, text, unix_ms: now_unix_ms(), dropped_bytes: 0 };
    // Never wait on a slow controller: drop the line (it is in the file) when the queue is full.
    if dest.out.try_send(Outbound::Line { job_id: dest.job_id.clone(), attempt: dest.attempt, line }).is_err() {
        budget.dropped += bytes;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_line_over_the_cap_is_cut_at_a_character_boundary_and_marked() {
        // 'é' is two bytes: the cut must not fall inside one.
        let mut bytes = "a".repeat(MAX_LINE - 1).into_bytes();
        bytes.extend("é".repeat(10).as_bytes());
        bytes.extend(b"\nshort\nunfinished");
        let (lines, used) = split_lines(&bytes, false);
        assert_eq!(lines.len(), 3, "{:?}", lines.iter().map(|l| l.len()).collect::<Vec<_>>());
        assert!(lines[0].ends_with(SPLIT_MARKER));
        assert!(!lines[0].contains('\u{FFFD}') && !lines[1].contains('\u{FFFD}'));
        assert_eq!(lines[1], "é".repeat(10));
        assert_eq!(lines[2], "short");
        assert_eq!(&bytes[used..], b"unfinished", "an unfinished line waits for the rest");
        let (last, _) = split_lines(&bytes[used..], true);
        assert_eq!(last, ["unfinished"]);
    }

    #[tokio::test(start_paused = true)]
    async fn output_over_the_budget_is_dropped_and_reported_in_one_gap_record() {
        let (out, mut rx) = mpsc::channel(1024);
        let limit = OutputBudget { per_second: 1000, burst: 2000 };
        let dest = Destination { out, node: "n1".into(), job_id: "j".into(), attempt: 1, index: 3, budget: limit };
        let mut budget = Budget::new(limit);
        let text = "x".repeat(499);
        for _ in 0..10 {
            send(&dest, LogStream::Stdout, text.clone(), &mut budget).await;
        }
        // 2000 bytes of burst: 4 lines of 500 bytes, the other 6 dropped.
        tokio::time::advance(Duration::from_secs(1)).await;
        send(&dest, LogStream::Stdout, "after".into(), &mut budget).await;
        let mut lines = Vec::new();
        while let Ok(Outbound::Line { line, .. }) = rx.try_recv() {
            lines.push(line);
        }
        assert_eq!(lines.len(), 6, "4 lines, the gap record, then the next line");
        let gap = &lines[4];
        assert_eq!(gap.dropped_bytes, 3000);
        assert!(gap.text.contains("3000 bytes of output dropped on node n1 process 3"), "{}", gap.text);
        assert_eq!(lines[5].text, "after");
    }

    #[tokio::test]
    async fn lines_refused_by_a_full_queue_count_as_dropped() {
        let (out, mut rx) = mpsc::channel(1);
        let limit = OutputBudget::default();
        let dest = Destination { out, node: "n1".into(), job_id: "j".into(), attempt: 1, index: 0, budget: limit };
        let mut budget = Budget::new(limit);
        send(&dest, LogStream::Stdout, "kept".into(), &mut budget).await;
        send(&dest, LogStream::Stdout, "lost".into(), &mut budget).await;
        assert!(rx.try_recv().is_ok());
        budget.report_gap(&dest, true).await;
        let Ok(Outbound::Line { line, .. }) = rx.try_recv() else { panic!("no gap record") };
        assert_eq!(line.dropped_bytes, 5);
    }
}
