//! Job output as the agents stream it: kept in memory for followers (bounded
//! per job) and appended to `<data-dir>/logs/<job>.log` so that it outlives
//! the controller.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;

use cohort_proto::{JobLogLine, LogLine, LogStream};
use tokio::sync::{Mutex, broadcast};

/// Lines kept in memory per job; older ones are still in the file.
const MEMORY_LINES: usize = 50_000;

/// A line with the job it belongs to, as broadcast to followers.
#[derive(Debug, Clone)]
pub struct TaggedLine {
    pub job_id: Arc<str>,
    pub line: JobLogLine,
}

pub struct LogHub {
    dir: PathBuf,
    jobs: Mutex<HashMap<String, JobLogs>>,
    tx: broadcast::Sender<TaggedLine>,
}

#[derive(Default)]
struct JobLogs {
    lines: VecDeque<JobLogLine>,
    next_seq: u64,
    file: Option<std::fs::File>,
}

impl LogHub {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, jobs: Mutex::new(HashMap::new()), tx: broadcast::channel(16_384).0 })
    }

    fn path(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.log"))
    }

    /// Appends a batch of one node's lines.
    pub async fn append(&self, job_id: &str, node_name: &str, node_rank: u32, attempt: u32, lines: Vec<LogLine>) {
        let mut jobs = self.jobs.lock().await;
        let logs = self.loaded(&mut jobs, job_id);
        let tag: Arc<str> = Arc::from(job_id);
        let mut text = String::new();
        for line in lines {
            let entry = JobLogLine {
                node_name: node_name.to_string(),
                node_rank,
                attempt,
                line: Some(line),
                seq: logs.next_seq,
            };
            logs.next_seq += 1;
            text.push_str(&encode(&entry));
            text.push('\n');
            let _ = self.tx.send(TaggedLine { job_id: tag.clone(), line: entry.clone() });
            logs.lines.push_back(entry);
            if logs.lines.len() > MEMORY_LINES {
                logs.lines.pop_front();
            }
        }
        if logs.file.is_none() {
            logs.file = std::fs::OpenOptions::new().create(true).append(true).open(self.path(job_id)).ok();
        }
        if let Some(file) = logs.file.as_mut()
            && let Err(e) = file.write_all(text.as_bytes())
        {
            tracing::warn!(job = job_id, error = %e, "could not append to the job's log file");
        }
    }

    /// Replaces an attempt's lines with `lines` (read back from the agents'
    /// files by a controller that did not see the attempt from its start),
    /// numbered after every line so far; later live lines follow them.
    pub async fn replace_attempt(&self, job_id: &str, attempt: u32, lines: Vec<(String, u32, LogLine)>) {
        let mut jobs = self.jobs.lock().await;
        let logs = self.loaded(&mut jobs, job_id);
        logs.lines.retain(|l| l.attempt != attempt);
        let mut text = format!("{REPLACE_MARKER}\t{attempt}\n");
        for (node_name, node_rank, line) in lines {
            let entry = JobLogLine { node_name, node_rank, attempt, line: Some(line), seq: logs.next_seq };
            logs.next_seq += 1;
            text.push_str(&encode(&entry));
            text.push('\n');
            logs.lines.push_back(entry);
        }
        while logs.lines.len() > MEMORY_LINES {
            logs.lines.pop_front();
        }
        if logs.file.is_none() {
            logs.file = std::fs::OpenOptions::new().create(true).append(true).open(self.path(job_id)).ok();
        }
        if let Some(file) = logs.file.as_mut() {
            let _ = file.write_all(text.as_bytes());
        }
    }

    /// The job's lines with `seq >= from` (from memory, or the file after a
    /// restart) and a receiver for the lines that come after them.
    pub async fn snapshot(&self, job_id: &str, from: u64) -> (Vec<JobLogLine>, broadcast::Receiver<TaggedLine>) {
        let mut jobs = self.jobs.lock().await;
        let rx = self.tx.subscribe();
        let logs = self.loaded(&mut jobs, job_id);
        let mut lines: Vec<JobLogLine> = logs.lines.iter().filter(|l| l.seq >= from).cloned().collect();
        let first_in_memory = logs.lines.front().map(|l| l.seq).unwrap_or(logs.next_seq);
        if from < first_in_memory {
            // Older lines than memory holds: read them back from the file.
            let mut older: Vec<JobLogLine> = read_file(&self.path(job_id))
                .into_iter()
                .filter(|l| l.seq >= from && l.seq < first_in_memory)
                .collect();
            older.append(&mut lines);
            lines = older;
        }
        (lines, rx)
    }

    fn loaded<'a>(&self, jobs: &'a mut HashMap<String, JobLogs>, job_id: &str) -> &'a mut JobLogs {
        jobs.entry(job_id.to_string()).or_insert_with(|| {
            // First touch since start: continue the file's sequence numbers.
            let mut lines: VecDeque<JobLogLine> = read_file(&self.path(job_id)).into();
            while lines.len() > MEMORY_LINES {
                lines.pop_front();
            }
            let next_seq = lines.back().map(|l| l.seq + 1).unwrap_or(0);
            JobLogs { lines, next_seq, file: None }
        })
    }
}

/// One line per record: seq, attempt, node rank, node, process index, stream,
/// time, then the text (which may itself hold tabs).
fn encode(l: &JobLogLine) -> String {
    let line = l.line.clone().unwrap_or_default();
    let stream = if line.stream == LogStream::Stderr as i32 { "err" } else { "out" };
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        l.seq, l.attempt, l.node_rank, l.node_name, line.process_index, stream, line.unix_ms, line.text
    )
}

fn decode(text: &str) -> Option<JobLogLine> {
    let mut f = text.splitn(8, '\t');
    let seq = f.next()?.parse().ok()?;
    let attempt = f.next()?.parse().ok()?;
    let node_rank = f.next()?.parse().ok()?;
    let node_name = f.next()?.to_string();
    let process_index = f.next()?.parse().ok()?;
    let stream = if f.next()? == "err" { LogStream::Stderr } else { LogStream::Stdout };
    let unix_ms = f.next()?.parse().ok()?;
    let text = f.next()?.to_string();
    Some(JobLogLine {
        node_name,
        node_rank,
        attempt,
        seq,
        line: Some(LogLine { process_index, stream: stream as i32, text, unix_ms }),
    })
}

/// Written before an attempt's replacement lines: earlier lines of that attempt no longer count.
const REPLACE_MARKER: &str = "#replace-attempt";

fn read_file(path: &std::path::Path) -> Vec<JobLogLine> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    let mut lines: Vec<JobLogLine> = Vec::new();
    for text in BufReader::new(file).lines().map_while(Result::ok) {
        if let Some(attempt) = text.strip_prefix(REPLACE_MARKER).and_then(|a| a.trim().parse::<u32>().ok()) {
            lines.retain(|l| l.attempt != attempt);
        } else if let Some(line) = decode(&text) {
            lines.push(line);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(text: &str) -> LogLine {
        LogLine { process_index: 1, stream: LogStream::Stderr as i32, text: text.into(), unix_ms: 7 }
    }

    #[tokio::test]
    async fn lines_survive_a_restart_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let hub = LogHub::new(dir.path().into()).unwrap();
            hub.append("j-1", "n1", 0, 1, vec![line("a\tb"), line("c")]).await;
        }
        let hub = LogHub::new(dir.path().into()).unwrap();
        hub.append("j-1", "n2", 1, 1, vec![line("d")]).await;
        let (lines, _) = hub.snapshot("j-1", 0).await;
        let texts: Vec<_> = lines.iter().map(|l| l.line.as_ref().unwrap().text.as_str()).collect();
        assert_eq!(texts, ["a\tb", "c", "d"]);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(lines[2].node_name, "n2");
        assert_eq!(lines[0].line.as_ref().unwrap().stream, LogStream::Stderr as i32);
        let (from_two, _) = hub.snapshot("j-1", 2).await;
        assert_eq!(from_two.len(), 1);
    }

    #[tokio::test]
    async fn a_replaced_attempt_stays_replaced_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let hub = LogHub::new(dir.path().into()).unwrap();
            hub.append("j", "n1", 0, 1, vec![line("live, also in the file")]).await;
            hub.append("j", "n1", 0, 0, vec![line("older attempt")]).await;
            hub.replace_attempt(
                "j",
                1,
                vec![("n1".into(), 0, line("from the file")), ("n1".into(), 0, line("live, also in the file"))],
            )
            .await;
            hub.append("j", "n1", 0, 1, vec![line("after")]).await;
        }
        let hub = LogHub::new(dir.path().into()).unwrap();
        let (lines, _) = hub.snapshot("j", 0).await;
        let texts: Vec<_> = lines.iter().map(|l| l.line.as_ref().unwrap().text.as_str()).collect();
        assert_eq!(texts, ["older attempt", "from the file", "live, also in the file", "after"]);
    }
}
