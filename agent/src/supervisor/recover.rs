//! Recovery after an agent restart: the launches an earlier agent process
//! supervised, found again from their state files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{ProcessExited, now_unix_ms};
use tokio::time::Instant;

use super::state::{self, ExitRecord, LaunchRecord, ProcessRecord};
use super::{
    KEEP_ENDED, Launch, Recovery, Shim, Supervised, Supervisor, is_clean, join_causes, sweep, tail, unrecorded_exit,
};

impl Supervisor {
    /// Finds the launches an earlier agent process supervised on this node
    /// (from their state files): shims still running are adopted, exits that
    /// happened meanwhile are read from the exit files and reported with the
    /// next `report(true)`, i.e. at registration. Call it once, before the
    /// session to the controller starts.
    ///
    /// An adopted process's output is streamed from where its files end now;
    /// what it printed while no agent ran is in the files (`FetchLogs`).
    pub async fn recover(&self) -> Recovery {
        let mut recovery = Recovery::default();
        let boot = state::boot_id();
        let mut launches = self.inner.launches.lock().await;
        let mut to_stop = Vec::new();
        for path in state_files(&self.inner.work_dir) {
            let record = match LaunchRecord::load(&path) {
                Ok(record) => record,
                Err(error) => {
                    tracing::warn!(%error, "unreadable launch state; left alone");
                    continue;
                }
            };
            let key = (record.job_id.clone(), record.attempt);
            let Some(dir) = path.parent().map(Path::to_path_buf) else { continue };
            if record.node_name != self.inner.node_name {
                tracing::warn!(path = %path.display(), node = %record.node_name, "launch state of another node; left alone");
                continue;
            }
            if launches.contains_key(&key) {
                continue;
            }
            let same_boot = record.boot_id == boot;
            let stopping = record.stopping_since_unix_ms.is_some();
            let mut processes = Vec::new();
            let mut ended = Vec::new();
            for r in &record.processes {
                // A shim with an exit file is past the rank's exit, even if it has not quite exited.
                let running = r.spawn_error.is_none()
                    && same_boot
                    && !r.files.exit.exists()
                    && state::is_alive(r.shim_pid, r.shim_start_ticks);
                if running {
                    let adopted = Shim::Adopted { start_ticks: r.shim_start_ticks };
                    let done = self.follow(&key, r.index, r.shim_pid, &r.files, tail::StartAt::End, adopted);
                    tracing::info!(job = %key.0, attempt = key.1, index = r.index, pid = r.shim_pid, "process adopted");
                    processes.push(Supervised {
                        index: r.index,
                        pid: r.shim_pid,
                        started_unix_ms: r.started_unix_ms,
                        exited: None,
                        // The previous agent sent the SIGTERM; a resumed stop only escalates.
                        stop_requested: stopping,
                        term_sent: stopping,
                        killed: false,
                        done,
                    });
                } else {
                    let exited = ended_while_away(&record, r);
                    ended.push(exited.clone());
                    processes.push(Supervised::ended(r.index, r.shim_pid, r.started_unix_ms, exited));
                }
            }
            let last_end = ended.iter().map(|e| e.ended_unix_ms).max().unwrap_or_else(now_unix_ms);
            let age = Duration::from_millis(u64::try_from(now_unix_ms() - last_end).unwrap_or(0));
            let all_ended = ended.len() == processes.len();
            if all_ended && age >= KEEP_ENDED {
                record.remove(&dir);
                recovery.removed += 1;
                continue;
            }
            recovery.adopted += processes.len() - ended.len();
            recovery.ended += ended.len();
            if all_ended {
                sweep(&record.job_id, record.attempt, &self.inner.node_name, &self.inner.work_dir);
            } else if stopping || ended.iter().any(|e| !e.stopped_by_agent && !is_clean(e)) {
                // Finish what the previous agent started, or the local gang stop it missed.
                to_stop.push((key.clone(), Duration::from_millis(record.grace_ms)));
            }
            let ended_at = all_ended.then(|| Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
            let grace = Duration::from_millis(record.grace_ms);
            launches.insert(key, Launch { dir, record, processes, grace, ended_at, save_until: None });
        }
        drop(launches);
        for ((job_id, attempt), grace) in to_stop {
            let this = self.clone();
            tokio::spawn(async move { this.stop(&job_id, attempt, grace).await });
        }
        recovery
    }
}

/// The exit of a process that ended while no agent watched it.
fn ended_while_away(launch: &LaunchRecord, r: &ProcessRecord) -> ProcessExited {
    if r.spawn_error.is_some() {
        return ProcessExited { exit_code: Some(127), ended_unix_ms: r.started_unix_ms, ..Default::default() };
    }
    let stopping_since = launch.stopping_since_unix_ms;
    let record = ExitRecord::read(&r.files.exit).unwrap_or_else(|| {
        // The shim died without a word: SIGKILLed by the stopping agent, or killed by someone else.
        let record = unrecorded_exit(stopping_since.is_some(), None);
        if let Err(e) = record.write(&r.files.exit) {
            tracing::warn!(path = %r.files.exit.display(), error = %e, "cannot write the exit file");
        }
        record
    });
    let root_cause = tail::root_cause_of(&[&r.files.stdout, &r.files.stderr]);
    ProcessExited {
        exit_code: record.exit_code,
        signal: record.signal,
        stopped_by_agent: stopping_since.is_some_and(|t| record.ended_unix_ms >= t),
        ended_unix_ms: record.ended_unix_ms,
        root_cause: join_causes(&record.note, &root_cause),
        last_lines: tail::last_lines_of(&[&r.files.stdout, &r.files.stderr]),
    }
}

/// Every `jobs/<job>/attempt-<n>/launch.json` under the work dir.
fn state_files(work_dir: &Path) -> Vec<PathBuf> {
    let Ok(jobs) = std::fs::read_dir(work_dir.join("jobs")) else { return Vec::new() };
    let mut files: Vec<PathBuf> = jobs
        .flatten()
        .filter_map(|job| std::fs::read_dir(job.path()).ok())
        .flat_map(|attempts| attempts.flatten().map(|a| a.path().join(state::STATE_FILE)))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}
