//! What the agent keeps on disk so that a restarted agent finds the launches
//! it supervised: one `launch.json` per launch, and per process the exit file
//! its shim writes. Both are replaced atomically (temp file + rename), so a
//! reader sees the old or the new content, never half of it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The per-launch state file, in the launch's directory.
pub const STATE_FILE: &str = "launch.json";

/// The directory of one launch: its output files, exit files and state.
pub fn launch_dir(work_dir: &Path, job_id: &str, attempt: u32) -> PathBuf {
    work_dir.join("jobs").join(job_id).join(format!("attempt-{attempt}"))
}

/// The files of one process of a launch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessFiles {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Written by the shim when the rank has exited.
    pub exit: PathBuf,
}

impl ProcessFiles {
    /// Made by the agent before it signals the process's group to stop or
    /// save: the shim then lets what the rank leaves end by itself.
    pub fn stop_marker(&self) -> PathBuf {
        self.exit.with_extension("stopping")
    }

    pub fn new(dir: &Path, index: u32) -> Self {
        Self {
            stdout: dir.join(format!("{index}.out")),
            stderr: dir.join(format!("{index}.err")),
            exit: dir.join(format!("{index}.exit")),
        }
    }
}

/// A launch as persisted: enough to adopt its shims or report their exits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub job_id: String,
    pub attempt: u32,
    pub grace_ms: u64,
    pub node_name: String,
    /// Pids from another boot name other processes (or none).
    pub boot_id: String,
    /// When the agent began stopping the launch: exits after it were the agent's doing.
    #[serde(default)]
    pub stopping_since_unix_ms: Option<i64>,
    pub processes: Vec<ProcessRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub index: u32,
    /// The shim's pid, which is also the process group of the rank; 0 when nothing started.
    pub shim_pid: u32,
    /// The shim's start time (clock ticks since boot) from /proc, against pid reuse.
    pub shim_start_ticks: u64,
    pub rank_pid: u32,
    pub started_unix_ms: i64,
    /// Set when the process could not be started.
    #[serde(default)]
    pub spawn_error: Option<String>,
    pub files: ProcessFiles,
}

impl LaunchRecord {
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomically(&dir.join(STATE_FILE), &json)
    }

    /// Removes the state and exit files of a finished launch; its output stays for `FetchLogs`.
    pub fn remove(&self, dir: &Path) {
        for p in &self.processes {
            let _ = std::fs::remove_file(&p.files.exit);
        }
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// How a rank ended, as its shim (or, when the shim could not, the agent) recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_unix_ms: i64,
    #[serde(default)]
    pub rank_pid: u32,
    /// Why the exit is uncertain, e.g. "exit unknown: the shim was killed".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl ExitRecord {
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable exit file");
                None
            }
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomically(path, &json)
    }
}

/// Writes `bytes` to a temporary file next to `path`, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// This boot's id; empty where the kernel does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A process's state letter and start time (ticks since boot) from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let state = fields.next()?.chars().next()?;
    // starttime is field 22 of the line, the 20th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The start time of a live process, to recognise it again later.
pub fn start_ticks(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// Whether `pid` still names the process that started at `start_ticks` and
/// has not exited (a zombie nobody reaps counts as exited).
pub fn is_alive(pid: u32, start_ticks: u64) -> bool {
    pid > 0 && stat(pid).is_some_and(|(state, start)| start == start_ticks && state != 'Z' && state != 'X')
}
