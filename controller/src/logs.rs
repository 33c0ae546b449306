//! Job output as the agents stream it, kept on disk only: appended to
//! `<data-dir>/logs/<job>.log` (one record a line) and read back by range, so
//! that neither a long job's history nor its followers take memory.
//!
//! In memory, per job still being written: the open file, its length, the next
//! sequence number and the attempts whose lines were replaced ([`JobLogs`],
//! a few dozen bytes). Followers are woken by a broadcast of "the file of job
//! J now ends at byte B" and read the new records from the file (the page
//! cache); lines are never copied into the broadcast. A finished job's entry
//! is dropped ([`LogHub::retain`]): readers then take the file's length.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cohort_proto::{JobLogLine, LogLine, LogStream};
use tokio::sync::{Mutex, broadcast};

/// Followers' wake-ups not yet taken; a follower that falls further behind
/// reads up to the file's current end instead.
const WAKE_UPS: usize = 1024;
/// Bytes read from a log file per step when going backwards (tail) and at
/// most per chunk when streaming forwards.
const BACKWARD_BLOCK: u64 = 64 * 1024;
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Written to the broadcast after records were appended to a job's file.
#[derive(Debug, Clone)]
pub struct Appended {
    pub job_id: Arc<str>,
    /// Where the file's complete records now end.
    pub end: u64,
}

pub struct LogHub {
    dir: PathBuf,
    jobs: Mutex<HashMap<String, JobLogs>>,
    tx: broadcast::Sender<Appended>,
}

/// What the hub keeps of a job being written: no lines.
struct JobLogs {
    file: File,
    /// Bytes of complete records in the file.
    len: u64,
    next_seq: u64,
    /// `(attempt, seq)`: that attempt's lines numbered below `seq` no longer
    /// count (the attempt was read back from the agents' files).
    replaced: Vec<(u32, u64)>,
}

/// A job's log as one reader sees it: its file, where the file ended when the
/// reader opened it, and the wake-ups for later records.
pub struct LogReader {
    path: PathBuf,
    pub end: u64,
    replaced: Arc<[(u32, u64)]>,
    pub appended: broadcast::Receiver<Appended>,
}

impl LogHub {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, jobs: Mutex::new(HashMap::new()), tx: broadcast::channel(WAKE_UPS).0 })
    }

    fn path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.log"))
    }

    fn replaced_path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.replaced"))
    }

    /// Appends a batch of one node's lines.
    pub async fn append(&self, job_id: &str, node_name: &str, node_rank: u32, attempt: u32, lines: Vec<LogLine>) {
        let mut jobs = self.jobs.lock().await;
        let Some(logs) = self.loaded(&mut jobs, job_id) else { return };
        let mut text = String::new();
        for line in lines {
            let seq = logs.next_seq;
            push_record(
                &mut text,
                &JobLogLine { node_name: node_name.to_string(), node_rank, attempt, line: Some(line), seq },
            );
            logs.next_seq += 1;
        }
        self.write(job_id, logs, text.as_bytes());
    }

    /// Replaces an attempt's lines with `lines` (read back from the agents'
    /// files by a controller that did not see the attempt from its start),
    /// numbered after every line so far; later live lines follow them.
    pub async fn replace_attempt(&self, job_id: &str, attempt: u32, lines: Vec<(String, u32, LogLine)>) {
        let mut jobs = self.jobs.lock().await;
        let Some(logs) = self.loaded(&mut jobs, job_id) else { return };
        logs.replaced.push((attempt, logs.next_seq));
        let saved = logs.replaced.iter().map(|(a, s)| format!("{a}\t{s}\n")).collect::<String>();
        if let Err(e) = std::fs::write(self.replaced_path(job_id), saved) {
            tracing::warn!(job = job_id, error = %e, "could not record a replaced attempt of the job's log");
        }
        let mut text = String::new();
        for (node_name, node_rank, line) in lines {
            push_record(&mut text, &JobLogLine { node_name, node_rank, attempt, line: Some(line), seq: logs.next_seq });
            logs.next_seq += 1;
        }
        self.write(job_id, logs, text.as_bytes());
    }

    fn write(&self, job_id: &str, logs: &mut JobLogs, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match logs.file.write_all(bytes) {
            Ok(()) => logs.len += bytes.len() as u64,
            Err(e) => {
                tracing::warn!(job = job_id, error = %e, "could not append to the job's log file");
                // A partial record would run into the next one: end it.
                logs.len = logs.file.metadata().map(|m| m.len()).unwrap_or(logs.len);
                if logs.file.write_all(b"\n").is_ok() {
                    logs.len += 1;
                }
            }
        }
        let _ = self.tx.send(Appended { job_id: Arc::from(job_id), end: logs.len });
    }

    /// A reader of the job's log from its start to where it ends now, and the
    /// wake-ups for what is appended after.
    pub async fn reader(&self, job_id: &str) -> LogReader {
        let jobs = self.jobs.lock().await;
        let appended = self.tx.subscribe();
        let path = self.path(job_id);
        let (end, replaced) = match jobs.get(job_id) {
            Some(logs) => (logs.len, logs.replaced.clone()),
            None => (complete_len(&path), read_replaced(&self.replaced_path(job_id))),
        };
        LogReader { path, end, replaced: replaced.into(), appended }
    }

    /// Where the job's log ends now.
    pub async fn end(&self, job_id: &str) -> u64 {
        match self.jobs.lock().await.get(job_id) {
            Some(logs) => logs.len,
            None => complete_len(&self.path(job_id)),
        }
    }

    /// Forgets a deleted job: what is kept of it and its files.
    pub async fn remove(&self, job_id: &str) -> std::io::Result<()> {
        self.jobs.lock().await.remove(job_id);
        remove_file(&self.path(job_id))?;
        remove_file(&self.replaced_path(job_id))
    }

    /// Drops what is kept of the jobs for which `keep` is false (their files stay).
    pub async fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.jobs.lock().await.retain(|id, _| keep(id));
    }

    /// An upper bound of the memory the hub holds for the jobs being written.
    pub async fn resident_bytes(&self) -> usize {
        let jobs = self.jobs.lock().await;
        jobs.iter()
            .map(|(id, logs)| {
                id.capacity()
                    + std::mem::size_of::<(String, JobLogs)>()
                    + logs.replaced.capacity() * std::mem::size_of::<(u32, u64)>()
            })
            .sum()
    }

    /// The job's entry, opened on first touch since start (the next sequence
    /// number from the file's last record); None when the file cannot be opened.
    fn loaded<'a>(&self, jobs: &'a mut HashMap<String, JobLogs>, job_id: &str) -> Option<&'a mut JobLogs> {
        if !jobs.contains_key(job_id) {
            let path = self.path(job_id);
            let opened = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&path);
            let mut file = match opened {
                Ok(file) => file,
                Err(e) => {
                    tracing::warn!(job = job_id, path = %path.display(), error = %e, "cannot open the job's log file");
                    return None;
                }
            };
            let mut len = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A record cut short (a crash while writing) must not run into the next one.
            if len > 0 && last_byte(&mut file, len) != Some(b'\n') && file.write_all(b"\n").is_ok() {
                len += 1;
            }
            let next_seq = last_seq(&mut file, len).map(|s| s + 1).unwrap_or(0);
            let replaced = read_replaced(&self.replaced_path(job_id));
            jobs.insert(job_id.to_string(), JobLogs { file, len, next_seq, replaced });
        }
        jobs.get_mut(job_id)
    }
}

impl LogReader {
    /// Where the last `n` lines kept by `keep` start (reading backwards from
    /// [`LogReader::end`], never the whole file unless it holds fewer).
    pub async fn tail_start(&self, n: u32, keep: impl Fn(&JobLogLine) -> bool + Send + 'static) -> u64 {
        let (path, end, replaced) = (self.path.clone(), self.end, self.replaced.clone());
        let found = tokio::task::spawn_blocking(move || {
            let mut file = File::open(&path).ok()?;
            let mut seen = 0u32;
            let mut start = end;
            each_line_backward(&mut file, end, |offset, bytes| {
                let kept = decode(&String::from_utf8_lossy(bytes)).is_some_and(|l| visible(&replaced, &l) && keep(&l));
                if kept {
                    seen += 1;
                    start = offset;
                }
                seen < n
            })
            .ok()?;
            Some(if seen < n { 0 } else { start })
        });
        found.await.ok().flatten().unwrap_or(0)
    }

    /// The lines in `[from, to)`, at most about [`CHUNK_BYTES`] of them, and
    /// where the next chunk starts.
    pub async fn chunk(&self, from: u64, to: u64) -> (Vec<JobLogLine>, u64) {
        let (path, replaced) = (self.path.clone(), self.replaced.clone());
        let read = tokio::task::spawn_blocking(move || read_chunk(&path, from, to, &replaced));
        read.await.ok().and_then(Result::ok).unwrap_or((Vec::new(), to))
    }
}

fn read_chunk(path: &Path, from: u64, to: u64, replaced: &[(u32, u64)]) -> std::io::Result<(Vec<JobLogLine>, u64)> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut reader = BufReader::new(file.take(to.saturating_sub(from)));
    let mut lines = Vec::new();
    let mut offset = from;
    let mut record = Vec::new();
    while offset < to && offset - from < CHUNK_BYTES {
        record.clear();
        let n = reader.read_until(b'\n', &mut record)?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        let text = String::from_utf8_lossy(&record);
        if let Some(line) = decode(text.trim_end_matches('\n'))
            && visible(replaced, &line)
        {
            lines.push(line);
        }
    }
    // A file shorter than expected (removed, truncated): nothing more to read.
    Ok((lines, if offset == from { to } else { offset }))
}

/// Whether a line still counts (its attempt was not replaced after it).
fn visible(replaced: &[(u32, u64)], line: &JobLogLine) -> bool {
    !replaced.iter().any(|&(attempt, seq)| line.attempt == attempt && line.seq < seq)
}

/// The file's length up to its last newline: a record being written is not yet there.
fn complete_len(path: &Path) -> u64 {
    let Ok(mut file) = File::open(path) else { return 0 };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut pos = len;
    let mut block = Vec::new();
    while pos > 0 {
        let step = BACKWARD_BLOCK.min(pos);
        pos -= step;
        block.clear();
        if file.seek(SeekFrom::Start(pos)).is_err()
            || Read::by_ref(&mut file).take(step).read_to_end(&mut block).is_err()
        {
            return 0;
        }
        if let Some(i) = block.iter().rposition(|b| *b == b'\n') {
            return pos + i as u64 + 1;
        }
    }
    0
}

fn last_byte(file: &mut File, len: u64) -> Option<u8> {
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(len.checked_sub(1)?)).ok()?;
    file.read_exact(&mut byte).ok()?;
    Some(byte[0])
}

/// The sequence number of the file's last record.
fn last_seq(file: &mut File, len: u64) -> Option<u64> {
    let mut seq = None;
    each_line_backward(file, len, |_, bytes| {
        seq = decode(&String::from_utf8_lossy(bytes)).map(|l| l.seq);
        seq.is_none()
    })
    .ok()?;
    seq
}

/// Calls `visit` with each line of `file[..end]` (which ends with a newline),
/// last first, with the offset where it starts and its bytes without the
/// newline, until `visit` returns false. Reads [`BACKWARD_BLOCK`] at a time:
/// memory stays one block plus the longest line.
fn each_line_backward(file: &mut File, end: u64, mut visit: impl FnMut(u64, &[u8]) -> bool) -> std::io::Result<()> {
    // `buf` holds the file's bytes [pos, pos + buf.len()), lines not yet visited.
    let mut pos = end;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some((&last, body)) = buf.split_last() {
            let body = if last == b'\n' { body } else { &buf[..] };
            match body.iter().rposition(|b| *b == b'\n') {
                Some(i) => {
                    if !visit(pos + i as u64 + 1, &body[i + 1..]) {
                        return Ok(());
                    }
                    buf.truncate(i + 1);
                }
                None if pos == 0 => {
                    visit(0, body);
                    return Ok(());
                }
                None => break,
            }
        }
        if pos == 0 {
            return Ok(());
        }
        let step = BACKWARD_BLOCK.min(pos);
        pos -= step;
        file.seek(SeekFrom::Start(pos))?;
        let mut block = Vec::with_capacity(step as usize + buf.len());
        Read::by_ref(file).take(step).read_to_end(&mut block)?;
        block.append(&mut buf);
        buf = block;
    }
}

fn read_replaced(path: &Path) -> Vec<(u32, u64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let (attempt, seq) = l.split_once('\t')?;
            Some((attempt.parse().ok()?, seq.parse().ok()?))
        })
        .collect()
}

/// One line per record: seq, attempt, node rank, node, process index, stream
/// ("out", "err", or "gap<N>" for a gap record of N dropped bytes), time, then
/// the text (which may itself hold tabs; a newline in it is written as U+2424).
fn push_record(out: &mut String, l: &JobLogLine) {
    use std::fmt::Write as _;
    let line = l.line.clone().unwrap_or_default();
    let stream = match line.dropped_bytes {
        0 if line.stream == LogStream::Stderr as i32 => "err".to_string(),
        0 => "out".to_string(),
        dropped => format!("{GAP}{dropped}"),
    };
    let _ = write!(
        out,
        "{}\t{}\t{}\t{}\t{}\t{stream}\t{}\t",
        l.seq, l.attempt, l.node_rank, l.node_name, line.process_index, line.unix_ms
    );
    out.extend(line.text.chars().map(|c| if c == '\n' { '\u{2424}' } else { c }));
    out.push('\n');
}

/// The stream field of a gap record, before its byte count.
const GAP: &str = "gap";

fn decode(text: &str) -> Option<JobLogLine> {
    let mut f = text.splitn(8, '\t');
    let seq = f.next()?.parse().ok()?;
    let attempt = f.next()?.parse().ok()?;
    let node_rank = f.next()?.parse().ok()?;
    let node_name = f.next()?.to_string();
    let process_index = f.next()?.parse().ok()?;
    let (stream, dropped_bytes) = match f.next()? {
        "err" => (LogStream::Stderr, 0),
        gap if gap.starts_with(GAP) => (LogStream::Stderr, gap[GAP.len()..].parse().ok()?),
        _ => (LogStream::Stdout, 0),
    };
    let unix_ms = f.next()?.parse().ok()?;
    let text = f.next()?.to_string();
    Some(JobLogLine {
        node_name,
        node_rank,
        attempt,
        seq,
        line: Some(LogLine { process_index, stream: stream as i32, text, unix_ms, dropped_bytes }),
    })
}

#[cfg(test)]
mod tests;

/// Removes a file; one already gone is no error.
pub(crate) fn remove_file(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
