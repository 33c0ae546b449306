//! Running the job's interpreter for preflight (the package probe, the ms-swift
//! argument check) as the JOB's user, never as the agent's (issue 14: a job's
//! `python:` is whatever the submitter names, and the agent runs as root).
//!
//! When the job's user is not the agent's, the agent starts itself as
//! `cohort-agent preflight-as uid:gid:groups -- <python> ...` with the job's
//! environment on stdin: that helper sets the supplementary groups, the group
//! and the user, and only then execs the interpreter with the environment
//! applied. Nothing the job controls (`LD_PRELOAD`, `PYTHONPATH`, the
//! interpreter itself) is loaded by a process with the agent's privileges.
//! Each run has a timeout (a hung import must not hang the agent; the child is
//! killed) and keeps at most [`MAX_OUTPUT`] bytes of each stream.

use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::rank_user::RankIdentity;

/// The first argument that makes `cohort-agent` run a preflight interpreter as a user.
pub const PREFLIGHT_AS: &str = "preflight-as";
/// The tail of each of stdout and stderr that is kept: the probe's and the
/// check's answer is their last line, an error's cause the last lines.
pub const MAX_OUTPUT: usize = 1 << 20;
/// More than this on the helper's stdin is refused.
const MAX_ENV_BYTES: u64 = 16 << 20;

/// The job's interpreter, as it runs for preflight.
#[derive(Clone, Copy)]
pub struct Interpreter<'a> {
    /// The job's interpreter (a path or a command name).
    pub python: &'a str,
    /// Applied to the interpreter only, after the switch of user.
    pub env: &'a [(String, String)],
    /// The user to run as: None or the agent's own identity runs it directly.
    pub identity: Option<&'a RankIdentity>,
    /// The `cohort-agent` binary that provides `preflight-as`.
    pub helper: &'a Path,
    /// The working directory (the job's); "/" when it is not a directory here.
    pub cwd: &'a str,
}

/// What came back.
#[derive(Debug)]
pub struct RunOutput {
    pub status: ExitStatus,
    /// The last [`MAX_OUTPUT`] bytes of stdout.
    pub stdout: Vec<u8>,
    /// The last [`MAX_OUTPUT`] bytes of stderr.
    pub stderr: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot run {python}: {error}")]
    Spawn { python: String, error: String },
    #[error("{python} did not finish within {timeout:?} (a hung import?); it was killed")]
    Timeout { python: String, timeout: Duration },
    #[error("waiting for {python}: {error}")]
    Wait { python: String, error: String },
}

/// The environment sent to `preflight-as` on stdin.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HelperInput {
    env: Vec<(String, String)>,
}

impl Interpreter<'_> {
    /// Runs the interpreter with `args` (`-c <script> ...`), killed after `timeout`.
    pub async fn run(&self, args: &[String], timeout: Duration) -> Result<RunOutput, RunError> {
        let python = self.python.to_owned();
        let switch = self.identity.filter(|id| id.needs_switch());
        let cwd = if Path::new(self.cwd).is_dir() { self.cwd } else { "/" };
        // Another user's own HOME, USER and LOGNAME first, so that the job's env can override them.
        let mut env: Vec<(String, String)> = switch
            .map(|id| {
                id.login_env().into_iter().map(|(k, v)| (k.to_owned(), v.to_string_lossy().into_owned())).collect()
            })
            .unwrap_or_default();
        env.extend(self.env.iter().cloned());
        let mut command = match switch {
            Some(id) => {
                let mut command = tokio::process::Command::new(self.helper);
                command.arg0("cohort-agent").arg(PREFLIGHT_AS).arg(id.to_arg()).arg("--").arg(self.python);
                command.stdin(Stdio::piped());
                command
            }
            None => {
                let mut command = tokio::process::Command::new(self.python);
                command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).stdin(Stdio::null());
                command
            }
        };
        command.args(args).current_dir(cwd).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child =
            command.spawn().map_err(|e| RunError::Spawn { python: python.clone(), error: e.to_string() })?;
        let finished = async {
            if let Some(mut stdin) = child.stdin.take() {
                let input = serde_json::to_vec(&HelperInput { env }).unwrap_or_default();
                // A helper that died before reading shows in its exit and stderr.
                let _ = stdin.write_all(&input).await;
            }
            let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
            let (stdout, stderr, status) = tokio::join!(read_tail(stdout), read_tail(stderr), child.wait());
            status.map(|status| RunOutput { status, stdout, stderr })
        };
        match tokio::time::timeout(timeout, finished).await {
            Err(_) => Err(RunError::Timeout { python, timeout }),
            Ok(Err(e)) => Err(RunError::Wait { python, error: e.to_string() }),
            Ok(Ok(output)) => Ok(output),
        }
    }
}

/// Reads a stream to its end, keeping only its last [`MAX_OUTPUT`] bytes.
async fn read_tail(stream: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut stream) = stream else { return Vec::new() };
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&chunk[..n]);
                // Trimmed in bulk, not per read: a chatty child costs no quadratic copying.
                if kept.len() > 2 * MAX_OUTPUT {
                    kept.drain(..kept.len() - MAX_OUTPUT);
                }
            }
        }
    }
    if kept.len() > MAX_OUTPUT {
        kept.drain(..kept.len() - MAX_OUTPUT);
    }
    kept
}

/// Whether this process was started as `cohort-agent preflight-as`.
pub fn invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == PREFLIGHT_AS)
}

/// `cohort-agent preflight-as uid:gid:groups -- <python> args...`: reads the
/// environment from stdin, drops to the user (groups, group, user, in that
/// order, while still allowed to), then execs the interpreter with that
/// environment and stdin on /dev/null. Returns only on failure, with 127.
pub fn preflight_as_main() -> i32 {
    let fail = |message: String| {
        eprintln!("cohort-agent {PREFLIGHT_AS}: {message}");
        127
    };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let (Some(run_as), Some(dashes)) = (args.first(), args.get(1)) else {
        return fail("usage: preflight-as uid:gid:groups -- <program> [args...]".into());
    };
    if dashes != "--" || args.len() < 3 {
        return fail("usage: preflight-as uid:gid:groups -- <program> [args...]".into());
    }
    let input: HelperInput = match crate::job_files::read_stdin_json(MAX_ENV_BYTES, "environment") {
        Ok(input) => input,
        Err(message) => return fail(message),
    };
    if let Err(e) = crate::rank_user::become_user(&run_as.to_string_lossy()) {
        return fail(e.to_string());
    }
    let program = PathBuf::from(&args[2]);
    let error = std::process::Command::new(&program).args(&args[3..]).envs(input.env).stdin(Stdio::null()).exec();
    let _ = std::io::stderr().flush();
    fail(format!("{}: {error}", program.display()))
}
