//! Starts and supervises the processes of job launches on this node.
//!
//! Each process is the leader of its own process group; its stdout and stderr
//! go to files in the launch's directory and, line by line, to the controller.
//! Stopping is SIGTERM to the group, SIGKILL after the grace period, then a
//! sweep of /proc for any process of the launch that left the group (e.g. by
//! `setsid`), recognised by the COHORT_* variables it inherited.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::{
    AgentMessage, LaunchCommand, LogLine, LogStream, ProcessEvent, ProcessExited, ProcessStarted, RunningLaunch,
    RunningProcess, TrainingPoint, agent_message::Msg, now_unix_ms, process_event::Event,
};
use cohort_shared::metrics::{ChildFailureParser, LogFormat, TrainingMetrics, parse_line};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

/// Longest line kept whole; longer output is split.
const MAX_LINE: usize = 64 * 1024;
/// How long finished launches are remembered for a reconnecting controller.
const KEEP_ENDED: Duration = Duration::from_secs(600);
/// How long output readers may lag behind a process's exit (a grandchild may
/// hold the pipe open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What the supervisor sends towards the controller, in order.
#[derive(Debug)]
pub enum Outbound {
    Line {
        job_id: String,
        attempt: u32,
        line: LogLine,
    },
    /// A training-metrics line recognised in a process's output.
    Metrics {
        job_id: String,
        attempt: u32,
        point: TrainingPoint,
    },
    Message(AgentMessage),
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("job {job} attempt {attempt} is already running on this node")]
    Duplicate { job: String, attempt: u32 },
    #[error("workdir {0} does not exist on this node")]
    MissingWorkdir(String),
    #[error("cannot create {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

type LaunchKey = (String, u32);

struct Launch {
    processes: Vec<Supervised>,
    grace: Duration,
    ended_at: Option<Instant>,
}

struct Supervised {
    index: u32,
    pid: u32,
    started_unix_ms: i64,
    exited: Option<ProcessExited>,
    stop_requested: bool,
    /// Becomes true when the process has exited and its output is drained.
    done: watch::Receiver<bool>,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    node_name: String,
    work_dir: PathBuf,
    launches: Mutex<HashMap<LaunchKey, Launch>>,
    out: mpsc::Sender<Outbound>,
}

impl Supervisor {
    pub fn new(node_name: String, work_dir: PathBuf, out: mpsc::Sender<Outbound>) -> Self {
        Self { inner: Arc::new(Inner { node_name, work_dir, launches: Mutex::new(HashMap::new()), out }) }
    }

    /// Starts every process of a launch. A process that cannot be spawned is
    /// reported as `spawn_failed`; the others still start (the controller
    /// tears the gang down).
    pub async fn launch(&self, cmd: LaunchCommand) -> Result<(), LaunchError> {
        let key = (cmd.job_id.clone(), cmd.attempt);
        let mut launches = self.inner.launches.lock().await;
        if launches.contains_key(&key) {
            return Err(LaunchError::Duplicate { job: cmd.job_id, attempt: cmd.attempt });
        }
        let log_dir = self.inner.work_dir.join("jobs").join(&cmd.job_id).join(format!("attempt-{}", cmd.attempt));
        std::fs::create_dir_all(&log_dir)
            .map_err(|source| LaunchError::Io { path: log_dir.display().to_string(), source })?;
        let cwd = if cmd.workdir.is_empty() {
            let dir = self.inner.work_dir.join("jobs").join(&cmd.job_id).join("workdir");
            std::fs::create_dir_all(&dir)
                .map_err(|source| LaunchError::Io { path: dir.display().to_string(), source })?;
            dir
        } else {
            let dir = PathBuf::from(&cmd.workdir);
            if !dir.is_dir() {
                return Err(LaunchError::MissingWorkdir(cmd.workdir));
            }
            dir
        };
        let mut launch = Launch {
            processes: Vec::new(),
            grace: Duration::from_millis(u64::from(cmd.stop_grace_ms)),
            ended_at: None,
        };
        for spec in &cmd.processes {
            match self.spawn(&cmd, spec, &cwd, &log_dir).await {
                Ok(p) => launch.processes.push(p),
                Err(error) => {
                    tracing::warn!(job = %cmd.job_id, index = spec.index, %error, "spawn failed");
                    let (tx, done) = watch::channel(true);
                    drop(tx);
                    launch.processes.push(Supervised {
                        index: spec.index,
                        pid: 0,
                        started_unix_ms: 0,
                        exited: Some(ProcessExited {
                            exit_code: Some(127),
                            signal: None,
                            stopped_by_agent: false,
                            ended_unix_ms: now_unix_ms(),
                            root_cause: String::new(),
                        }),
                        stop_requested: false,
                        done,
                    });
                    self.event(&cmd.job_id, cmd.attempt, spec.index, Event::SpawnFailed(error)).await;
                }
            }
        }
        launches.insert(key, launch);
        Ok(())
    }

    async fn spawn(
        &self,
        cmd: &LaunchCommand,
        spec: &cohort_proto::ProcessSpec,
        cwd: &Path,
        log_dir: &Path,
    ) -> Result<Supervised, String> {
        let Some(program) = spec.argv.first() else { return Err("empty command line".into()) };
        // A relative program path with a slash is relative to the workdir.
        let program =
            if program.contains('/') && !program.starts_with('/') { cwd.join(program) } else { PathBuf::from(program) };
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&spec.argv[1..])
            .current_dir(cwd)
            .envs(spec.env.iter().map(|v| (v.name.as_str(), v.value.as_str())))
            // The sweep finds escaped descendants by these three.
            .env("COHORT_JOB_ID", &cmd.job_id)
            .env("COHORT_ATTEMPT", cmd.attempt.to_string())
            .env("COHORT_NODE_NAME", &self.inner.node_name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|e| format!("{}: {e}", program.display()))?;
        let pid = child.id().ok_or("process exited before its pid was read")?;
        let started_unix_ms = now_unix_ms();
        tracing::info!(job = %cmd.job_id, attempt = cmd.attempt, index = spec.index, pid, "process started");
        self.event(&cmd.job_id, cmd.attempt, spec.index, Event::Started(ProcessStarted { pid, started_unix_ms })).await;

        let readers = [
            child.stdout.take().map(|s| {
                self.capture(cmd, spec.index, LogStream::Stdout, s, log_dir.join(format!("{}.out", spec.index)))
            }),
            child.stderr.take().map(|s| {
                self.capture(cmd, spec.index, LogStream::Stderr, s, log_dir.join(format!("{}.err", spec.index)))
            }),
        ];
        let (done_tx, done) = watch::channel(false);
        let this = self.clone();
        let (job_id, attempt, index) = (cmd.job_id.clone(), cmd.attempt, spec.index);
        tokio::spawn(async move {
            let status = child.wait().await;
            // Whatever the leader left in its group goes with it.
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let mut root_cause = String::new();
            for reader in readers.into_iter().flatten() {
                if let Ok(Ok(Some(cause))) = tokio::time::timeout(DRAIN_AFTER_EXIT, reader).await {
                    root_cause = cause;
                }
            }
            this.on_exit(&job_id, attempt, index, status, root_cause).await;
            let _ = done_tx.send(true);
        });
        Ok(Supervised { index: spec.index, pid, started_unix_ms, exited: None, stop_requested: false, done })
    }

    /// Copies one output stream to its file and, line by line, to the controller.
    fn capture(
        &self,
        cmd: &LaunchCommand,
        index: u32,
        stream: LogStream,
        pipe: impl AsyncRead + Unpin + Send + 'static,
        path: PathBuf,
    ) -> tokio::task::JoinHandle<Option<String>> {
        let out = self.inner.out.clone();
        let node = self.inner.node_name.clone();
        let (job_id, attempt) = (cmd.job_id.clone(), cmd.attempt);
        tokio::spawn(async move {
            let mut file = match tokio::fs::File::create(&path).await {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write output file");
                    None
                }
            };
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::with_capacity(1024);
            let mut trailer = ChildFailureParser::new();
            loop {
                buf.clear();
                let n = match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(&buf[..n]).await;
                }
                let text = String::from_utf8_lossy(&buf[..n]).trim_end_matches(['\n', '\r']).to_string();
                trailer.feed(&text);
                // Metrics go first so that they are never dropped with a line.
                if let Some(metrics) = parse_line(&text) {
                    let point = training_point(metrics, &node);
                    if out.send(Outbound::Metrics { job_id: job_id.clone(), attempt, point }).await.is_err() {
                        break;
                    }
                }
                let line = LogLine { process_index: index, stream: stream as i32, text, unix_ms: now_unix_ms() };
                // Never block a training process on a slow controller: drop
                // the line (it is in the file) when the queue is full.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    out.try_send(Outbound::Line { job_id: job_id.clone(), attempt, line })
                {
                    break;
                }
            }
            if let Some(f) = file.as_mut() {
                let _ = f.flush().await;
            }
            trailer.root_cause().map(|c| {
                let signal = c.signal.map(|s| format!(", {s}")).unwrap_or_default();
                format!("torchrun root cause: rank {} exited with code {}{signal}", c.rank, c.exit_code)
            })
        })
    }

    async fn on_exit(
        &self,
        job_id: &str,
        attempt: u32,
        index: u32,
        status: std::io::Result<std::process::ExitStatus>,
        root_cause: String,
    ) {
        use std::os::unix::process::ExitStatusExt;
        let mut launches = self.inner.launches.lock().await;
        let Some(launch) = launches.get_mut(&(job_id.to_string(), attempt)) else { return };
        let Some(p) = launch.processes.iter_mut().find(|p| p.index == index) else { return };
        let exited = match status {
            Ok(s) => ProcessExited {
                exit_code: s.code(),
                signal: s.signal(),
                stopped_by_agent: p.stop_requested,
                ended_unix_ms: now_unix_ms(),
                root_cause: root_cause.clone(),
            },
            Err(e) => {
                tracing::error!(job = job_id, index, error = %e, "waiting for the process failed");
                ProcessExited {
                    exit_code: None,
                    signal: None,
                    stopped_by_agent: p.stop_requested,
                    ended_unix_ms: now_unix_ms(),
                    root_cause,
                }
            }
        };
        p.exited = Some(exited.clone());
        tracing::info!(job = job_id, attempt, index, code = ?exited.exit_code, signal = ?exited.signal, "process exited");
        let clean = exited.exit_code == Some(0) && exited.signal.is_none();
        let failed = !exited.stopped_by_agent && !clean;
        let siblings_alive = launch.processes.iter().any(|p| p.exited.is_none());
        if !siblings_alive {
            launch.ended_at = Some(Instant::now());
        }
        let grace = launch.grace;
        drop(launches);
        if !siblings_alive {
            // The launch is over: nothing of it may outlive it.
            let swept = sweep(job_id, attempt, &self.inner.node_name);
            if swept > 0 {
                tracing::warn!(job = job_id, attempt, swept, "killed leftovers of a finished launch");
            }
        }
        self.event(job_id, attempt, index, Event::Exited(exited)).await;
        if failed && siblings_alive {
            // Gang semantics start here: the node's other ranks go at once,
            // without waiting for the controller's stop.
            self.stop(job_id, attempt, grace).await;
        }
    }

    /// Stops every process of a launch: SIGTERM to each group, SIGKILL after
    /// `grace`, then a sweep for escapees. Returns when all have exited.
    pub async fn stop(&self, job_id: &str, attempt: u32, grace: Duration) {
        let mut waits = Vec::new();
        {
            let mut launches = self.inner.launches.lock().await;
            let Some(launch) = launches.get_mut(&(job_id.to_string(), attempt)) else { return };
            for p in launch.processes.iter_mut().filter(|p| p.exited.is_none()) {
                if !p.stop_requested {
                    p.stop_requested = true;
                    tracing::info!(job = job_id, attempt, index = p.index, pid = p.pid, "SIGTERM to process group");
                    let _ = killpg(Pid::from_raw(p.pid as i32), Signal::SIGTERM);
                }
                waits.push((p.pid, p.done.clone()));
            }
        }
        let deadline = Instant::now() + grace;
        for (pid, mut done) in waits {
            let in_time = tokio::time::timeout_at(deadline, done.wait_for(|d| *d)).await.is_ok();
            if !in_time {
                tracing::warn!(job = job_id, pid, ?grace, "still running after the grace period; SIGKILL");
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = done.wait_for(|d| *d).await;
            }
        }
        let swept = sweep(job_id, attempt, &self.inner.node_name);
        if swept > 0 {
            tracing::warn!(job = job_id, attempt, swept, "killed processes that had left their process group");
        }
    }

    /// Stops every launch (agent shutdown).
    pub async fn stop_all(&self) {
        let keys: Vec<(LaunchKey, Duration)> = {
            let launches = self.inner.launches.lock().await;
            launches.iter().filter(|(_, l)| l.ended_at.is_none()).map(|(k, l)| (k.clone(), l.grace)).collect()
        };
        let stops = keys.iter().map(|((job, attempt), grace)| self.stop(job, *attempt, *grace));
        futures::future::join_all(stops).await;
    }

    /// What runs now; with `include_ended`, also launches that ended within
    /// the last minutes (for a controller that may have missed their exits).
    pub async fn report(&self, include_ended: bool) -> Vec<RunningLaunch> {
        let mut launches = self.inner.launches.lock().await;
        let now = Instant::now();
        launches.retain(|_, l| l.ended_at.is_none_or(|t| now.duration_since(t) < KEEP_ENDED));
        let mut out: Vec<RunningLaunch> = launches
            .iter()
            .filter(|(_, l)| include_ended || l.ended_at.is_none())
            .map(|((job_id, attempt), l)| RunningLaunch {
                job_id: job_id.clone(),
                attempt: *attempt,
                processes: l
                    .processes
                    .iter()
                    .map(|p| RunningProcess {
                        index: p.index,
                        pid: p.pid,
                        started_unix_ms: p.started_unix_ms,
                        exited: p.exited.clone(),
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
        out
    }

    /// Sends the output files of a launch back (a new leader has no history),
    /// the last `max_lines_per_file` lines of each, then the query's answer.
    pub async fn fetch_logs(&self, command_id: u64, cmd: cohort_proto::FetchLogsCommand) {
        let dir = self.inner.work_dir.join("jobs").join(&cmd.job_id).join(format!("attempt-{}", cmd.attempt));
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

    /// Reports a process that could not be started at all.
    pub async fn spawn_failed(&self, job_id: &str, attempt: u32, index: u32, error: String) {
        self.event(job_id, attempt, index, Event::SpawnFailed(error)).await;
    }

    async fn event(&self, job_id: &str, attempt: u32, index: u32, event: Event) {
        let msg = AgentMessage {
            msg: Some(Msg::ProcessEvent(ProcessEvent { job_id: job_id.into(), attempt, index, event: Some(event) })),
        };
        // Process events are few and must not be lost: wait for room.
        let _ = self.inner.out.send(Outbound::Message(msg)).await;
    }
}

/// The wire form of a parsed metrics line.
pub fn training_point(m: TrainingMetrics, node: &str) -> TrainingPoint {
    TrainingPoint {
        iteration: m.iteration,
        total_iterations: m.total_iterations,
        loss: m.loss,
        learning_rate: m.learning_rate,
        grad_norm: m.grad_norm,
        iteration_time_s: m.iteration_time_s,
        throughput_tflops: m.throughput_tflops,
        memory_gib: m.memory_gib,
        elapsed_s: m.elapsed_s,
        remaining_s: m.remaining_s,
        consumed_samples: m.consumed_samples,
        is_eval: m.is_eval,
        format: match m.format {
            LogFormat::MegatronLm => "megatron-lm",
            LogFormat::MsSwift3 => "ms-swift-3",
            LogFormat::MsSwift4 => "ms-swift-4",
        }
        .into(),
        unix_ms: now_unix_ms(),
        node_name: node.into(),
    }
}

/// Kills (SIGKILL) every process of this node's launch that is still alive,
/// found by its inherited COHORT_* variables. Returns how many it killed.
fn sweep(job_id: &str, attempt: u32, node: &str) -> usize {
    let wanted =
        [format!("COHORT_JOB_ID={job_id}"), format!("COHORT_ATTEMPT={attempt}"), format!("COHORT_NODE_NAME={node}")];
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let me = std::process::id();
    let mut killed = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if wanted.iter().all(|w| vars.contains(&w.as_bytes())) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests;
