//! Output files read back for a controller that has no history of them.

use std::path::PathBuf;

use cohort_proto::{AgentMessage, LogLine, LogStream, agent_message::Msg};

use super::state::launch_dir;
use super::{Outbound, Supervisor};

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
            let text =
                tokio::fs::read(&path).await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let unix_ms = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or_default();
            for chunk in lines[lines.len().saturating_sub(max)..].chunks(1000) {
                let batch = cohort_proto::LogBatch {
                    job_id: cmd.job_id.clone(),
                    attempt: cmd.attempt,
                    lines: chunk
                        .iter()
                        .map(|t| LogLine { process_index: index, stream: stream as i32, text: t.to_string(), unix_ms })
                        .collect(),
                    fetch_command_id: command_id,
                };
                let _ = self.inner.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::Logs(batch)) })).await;
            }
        }
        let answer = cohort_proto::QueryResult { command_id, error, result: None };
        let _ = self.inner.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(answer)) })).await;
    }
}
