//! Output files read back for a controller that has no history of them.

use std::path::PathBuf;

use cohort_proto::{AgentMessage, LogLine, LogStream, agent_message::Msg};

use std::io::{Read, Seek, SeekFrom};

use super::state::launch_dir;
use super::tail::split_lines;
use super::{MAX_LOG_BATCH_BYTES, Outbound, Supervisor};

/// The most of each output file read back: a controller holds a node's
/// answer in memory until the fetch is complete.
const FETCH_WINDOW: u64 = 4 << 20;

impl Supervisor {
    /// Sends the output files of a launch back (a new leader has no history),
    /// the last `max_lines_per_file` lines of each, then the query's answer.
    pub async fn fetch_logs(&self, command_id: u64, cmd: cohort_proto::FetchLogsCommand) {
        let dir = launch_dir(&self.inner.work_dir, &cmd.job_id, cmd.attempt);
        let max = if cmd.max_lines_per_file == 0 { 10_000 } else { cmd.max_lines_per_file as usize };
        let mut error = String::new();
        let mut files: Vec<(u32, LogStream, PathBuf)> = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let (Some(stem), Some(ext)) =
                        (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|s| s.to_str()))
                    else {
                        continue;
                    };
                    let Ok(index) = stem.parse::<u32>() else { continue };
                    let stream = match ext {
                        "out" => LogStream::Stdout,
                        "err" => LogStream::Stderr,
                        _ => continue,
                    };
                    files.push((index, stream, path));
                }
            }
            Err(e) => {
                error = format!("no output of {} attempt {} here ({}: {e})", cmd.job_id, cmd.attempt, dir.display())
            }
        }
        files.sort_by_key(|(index, stream, _)| (*index, *stream as i32));
        for (index, stream, path) in files {
            let (texts, skipped) = file_end(&path, max);
            let unix_ms = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            let mut lines: Vec<LogLine> = Vec::with_capacity(texts.len() + 1);
            if skipped > 0 {
                let text = format!(
                    "[cohort: the first {skipped} bytes of {} are not shown: only its last {} KiB are read back]",
                    path.display(),
                    FETCH_WINDOW / 1024
                );
                lines.push(LogLine {
                    process_index: index,
                    stream: stream as i32,
                    text,
                    unix_ms,
                    dropped_bytes: skipped,
                });
            }
            lines.extend(texts.into_iter().map(|text| LogLine {
                process_index: index,
                stream: stream as i32,
                text,
                unix_ms,
                dropped_bytes: 0,
            }));
            for lines in in_batches(lines) {
                let batch = cohort_proto::LogBatch {
                    job_id: cmd.job_id.clone(),
                    attempt: cmd.attempt,
                    lines,
                    fetch_command_id: command_id,
                };
                let _ = self.inner.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::Logs(batch)) })).await;
            }
        }
        let answer = cohort_proto::QueryResult { command_id, error, result: None };
        let _ = self.inner.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(answer)) })).await;
    }
}

/// The last `max` lines of a file's last [`FETCH_WINDOW`] bytes, and how many
/// bytes before them were not read.
fn file_end(path: &std::path::Path, max: usize) -> (Vec<String>, u64) {
    let Ok(mut file) = std::fs::File::open(path) else { return (Vec::new(), 0) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(FETCH_WINDOW);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.take(FETCH_WINDOW).read_to_end(&mut bytes).is_err() {
        return (Vec::new(), 0);
    }
    // A window that starts mid-line starts at the next line, if it holds one.
    let from = match start {
        0 => 0,
        _ => bytes.iter().position(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0),
    };
    let (mut lines, _) = split_lines(&bytes[from..], true);
    let skipped = start + from as u64;
    let extra = lines.len().saturating_sub(max);
    lines.drain(..extra);
    (lines, skipped)
}

/// `lines` in batches of at most [`MAX_LOG_BATCH_BYTES`] (one line over it goes alone).
pub fn in_batches(lines: Vec<LogLine>) -> Vec<Vec<LogLine>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for line in lines {
        let size = line.text.len() + 32;
        if bytes + size > MAX_LOG_BATCH_BYTES && !batch.is_empty() {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(line);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_huge_file_without_newlines_is_read_back_from_its_end_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.out");
        std::fs::write(&path, vec![b'z'; 3 * FETCH_WINDOW as usize]).unwrap();
        let (lines, skipped) = file_end(&path, 10_000);
        // Only the window is read, in pieces of 64 KiB.
        assert_eq!(skipped, 2 * FETCH_WINDOW);
        assert_eq!(lines.len(), (FETCH_WINDOW as usize).div_ceil(super::super::tail::MAX_LINE));

        std::fs::write(&path, [vec![b'z'; 2 * FETCH_WINDOW as usize], b"\n".to_vec(), vec![b'q'; 300_000]].concat())
            .unwrap();
        let (lines, skipped) = file_end(&path, 10_000);
        assert_eq!(skipped, 2 * FETCH_WINDOW + 1);
        assert_eq!(lines.len(), 5, "300,000 bytes in pieces of 64 KiB");
        let batch_lines: Vec<LogLine> =
            (0..100).map(|_| LogLine { text: "w".repeat(60_000), ..LogLine::default() }).collect();
        for batch in in_batches(batch_lines) {
            let bytes: usize = batch.iter().map(|l| l.text.len()).sum();
            assert!(bytes <= MAX_LOG_BATCH_BYTES, "a batch of {bytes} bytes");
        }
    }
}
