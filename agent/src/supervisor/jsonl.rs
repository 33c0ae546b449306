//! ms-swift writes every metrics record, as JSON, to `logging.jsonl` in its
//! output directory (in `vN-<time>/` run directories with `add_version`), on
//! the last rank. The agent of the last node follows the newest such file of
//! the launch for as long as the launch runs; the controller drops points it
//! already has from the same record printed on stdout.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cohort_shared::metrics::LoggingJsonl;
use tokio::sync::mpsc;

use super::{Outbound, Supervisor, training_point};

const POLL: Duration = Duration::from_millis(500);

pub(super) struct JsonlMetrics {
    pub supervisor: Supervisor,
    pub dir: PathBuf,
    pub job_id: String,
    pub attempt: u32,
    pub node: String,
    pub out: mpsc::Sender<Outbound>,
}

impl JsonlMetrics {
    pub async fn run(self) {
        let started = SystemTime::now() - Duration::from_secs(5);
        // The file, the offset read up to, and its parser (which remembers the last iteration,
        // for ms-swift 3.x eval records that carry none).
        let mut current: Option<(PathBuf, u64, LoggingJsonl)> = None;
        loop {
            tokio::time::sleep(POLL).await;
            let running = self
                .supervisor
                .report(false)
                .await
                .iter()
                .any(|l| l.job_id == self.job_id && l.attempt == self.attempt);
            // Written by this launch: newer than its start (older runs' files are not ours).
            if let Some(newest) = newest_log(&self.dir, started)
                && current.as_ref().is_none_or(|(path, ..)| *path != newest)
            {
                tracing::info!(file = %newest.display(), job = %self.job_id, "following logging.jsonl for metrics");
                current = Some((newest, 0, LoggingJsonl::new()));
            }
            if let Some((path, offset, parser)) = current.as_mut() {
                let lines = read_from(path, offset);
                for line in lines {
                    if let Some(metrics) = parser.parse(&line) {
                        let point = training_point(metrics, &self.node);
                        let msg = Outbound::Metrics { job_id: self.job_id.clone(), attempt: self.attempt, point };
                        if self.out.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if !running {
                return;
            }
        }
    }
}

/// The most recently modified `logging.jsonl` in `dir` or `dir/*/`, if it was written after `since`.
fn newest_log(dir: &Path, since: SystemTime) -> Option<PathBuf> {
    let mut candidates = vec![dir.join("logging.jsonl")];
    if let Ok(entries) = std::fs::read_dir(dir) {
        candidates.extend(entries.flatten().map(|e| e.path().join("logging.jsonl")));
    }
    candidates
        .into_iter()
        .filter_map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .filter(|(t, _)| *t >= since)
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

/// Complete lines after `offset`, advancing it.
fn read_from(path: &Path, offset: &mut u64) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else { return Vec::new() };
    if file.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut reader = BufReader::new(file);
    let mut lines = Vec::new();
    let mut buf = String::new();
    while let Ok(n) = reader.read_line(&mut buf) {
        if n == 0 || !buf.ends_with('\n') {
            break; // a line still being written is read next time
        }
        *offset += n as u64;
        lines.push(buf.trim_end().to_string());
        buf.clear();
    }
    lines
}
