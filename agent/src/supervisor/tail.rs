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

/// Longest line kept whole; longer output is split.
const MAX_LINE: usize = 64 * 1024;
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
            loop {
                let mut got = false;
                for s in &mut streams {
                    got |= s.poll(&dest, false, &mut last).await;
                }
                delay = if got { POLL_BUSY } else { (delay * 3 / 2).min(POLL_QUIET) };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut finished => break,
                }
            }
            // The process is gone: read to the end, unfinished last lines included.
            for s in &mut streams {
                s.poll(&dest, true, &mut last).await;
            }
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
}

impl Stream {
    fn new(kind: LogStream, path: PathBuf, from: StartAt) -> Self {
        let mut trailer = ChildFailureParser::new();
        let offset = if from == StartAt::End { prime(&mut trailer, &path) } else { 0 };
        Self { kind, path, file: None, offset, partial: Vec::new(), trailer }
    }

    /// Sends the lines written since the last poll; with `last`, also an
    /// unfinished last line. Returns whether there was anything new.
    async fn poll(&mut self, dest: &Destination, last: bool, kept: &mut std::collections::VecDeque<String>) -> bool {
        let lines = self.read_lines(last);
        let got = !lines.is_empty();
        for text in lines {
            if kept.len() == LAST_LINES {
                kept.pop_front();
            }
            kept.push_back(text.clone());
            send(dest, self.kind, text).await;
        }
        got
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
        // At the end, everything up to the length seen now (an escaped writer may never stop).
        let limit = match last {
            true => file.metadata().map(|m| m.len().saturating_sub(self.offset)).unwrap_or(0),
            false => READ_PER_POLL,
        };
        let before = self.partial.len();
        let n = file.take(limit).read_to_end(&mut self.partial).unwrap_or(0);
        self.partial.truncate(before + n);
        self.offset += n as u64;
        let mut lines = Vec::new();
        let mut start = 0;
        loop {
            let rest = &self.partial[start..];
            let end = match rest.iter().take(MAX_LINE).position(|b| *b == b'\n') {
                Some(pos) => start + pos + 1,
                // A line longer than MAX_LINE goes in pieces.
                None if rest.len() >= MAX_LINE => start + MAX_LINE,
                None if last && !rest.is_empty() => self.partial.len(),
                None => break,
            };
            let text = String::from_utf8_lossy(&self.partial[start..end]).trim_end_matches(['\n', '\r']).to_string();
            self.trailer.feed(&text);
            lines.push(text);
            start = end;
        }
        self.partial.drain(..start);
        lines
    }
}

async fn send(dest: &Destination, kind: LogStream, text: String) {
    // Metrics go first so that they are never dropped with a line.
    if let Some(metrics) = parse_line(&text) {
        let point = training_point(metrics, &dest.node);
        let _ = dest.out.send(Outbound::Metrics { job_id: dest.job_id.clone(), attempt: dest.attempt, point }).await;
    }
    let line = LogLine { process_index: dest.index, stream: kind as i32, text, unix_ms: now_unix_ms() };
    // Never wait on a slow controller: drop the line (it is in the file) when the queue is full.
    let _ = dest.out.try_send(Outbound::Line { job_id: dest.job_id.clone(), attempt: dest.attempt, line });
}
