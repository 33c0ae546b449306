//! Starts and supervises the processes of job launches on this node.
//!
//! Each process runs under a shim (`cohort-agent shim`, see [`shim`]) that
//! leads the process group holding the rank, sends the rank's stdout and
//! stderr to files in the launch's directory, and records its exit there. The
//! agent follows those files and sends them, line by line, to the controller.
//! Nothing ties a rank to the agent process, so an agent that crashes or is
//! restarted finds its launches again ([`Supervisor::recover`]) from the
//! state file each launch keeps next to its output.
//!
//! Stopping is SIGTERM to the group, SIGKILL after the grace period, then a
//! sweep of /proc for any process of the launch that left the group (e.g. by
//! `setsid`), recognised by the COHORT_* variables it inherited.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::{
    AgentMessage, LaunchCommand, LogLine, ProcessEvent, ProcessExited, ProcessStarted, RunningLaunch, RunningProcess,
    TrainingPoint, agent_message::Msg, now_unix_ms, process_event::Event,
};
use cohort_shared::metrics::{LogFormat, TrainingMetrics};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;

mod jsonl;
mod kmsg;
mod logs;
mod proctree;
mod recover;
pub mod shim;
pub mod stacks;
mod state;
mod tail;

use crate::rank_user::{RankIdentity, RankUserError, RankUserPolicy};

use state::{ExitRecord, LaunchRecord, ProcessFiles, ProcessRecord, launch_dir};
pub use tail::OutputBudget;
use tail::{Destination, Follower};

/// How long finished launches are remembered for a reconnecting controller.
const KEEP_ENDED: Duration = Duration::from_secs(600);
/// How long a shim may take to say whether it started its process.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the exit of an adopted shim (not the agent's child) is looked for.
const ADOPTED_POLL: Duration = Duration::from_millis(25);
/// What is reported for a process whose shim died without recording its exit.
const SHIM_KILLED: &str = "exit unknown: the shim was killed";

/// The most bytes of output lines in one `LogBatch`: far below the
/// controller's 16 MiB message limit, so a chatty rank never breaks a session.
pub const MAX_LOG_BATCH_BYTES: usize = 1 << 20;

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
    #[error(transparent)]
    User(#[from] RankUserError),
    #[error("cannot create the job's cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// What a restarted agent found of the launches it had supervised.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Recovery {
    /// Processes whose shims still run, now supervised again.
    pub adopted: usize,
    /// Processes that ended while no agent watched; their exits are reported at registration.
    pub ended: usize,
    /// Launches that ended longer than the retention time ago; their state was removed.
    pub removed: usize,
}

type LaunchKey = (String, u32);

struct Launch {
    /// Where its output, exit files and state file live.
    dir: PathBuf,
    record: LaunchRecord,
    processes: Vec<Supervised>,
    grace: Duration,
    ended_at: Option<Instant>,
    /// A preemption's signal went out: the ranks save until then, before SIGTERM.
    save_until: Option<Instant>,
}

struct Supervised {
    index: u32,
    /// The shim's pid, which is also the process group of the rank.
    pid: u32,
    started_unix_ms: i64,
    exited: Option<ProcessExited>,
    stop_requested: bool,
    /// SIGTERM went to its group (after a preemption's signal, `stop_requested` is set before it).
    term_sent: bool,
    /// The agent sent SIGKILL to the group after the grace period.
    killed: bool,
    /// Becomes true when the process has exited and its output is drained.
    done: watch::Receiver<bool>,
}

/// How the agent learns that a shim ended.
enum Shim {
    /// Its own child: waited for.
    Child(tokio::process::Child),
    /// A shim of an earlier agent: polled by pid and start time.
    Adopted { start_ticks: u64 },
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    node_name: String,
    work_dir: PathBuf,
    /// The program run as `<shim> shim ...`.
    shim: PathBuf,
    launches: Mutex<HashMap<LaunchKey, Launch>>,
    out: mpsc::Sender<Outbound>,
    /// py-spy for stack dumps; without it, faulthandler via SIGUSR1.
    py_spy: std::sync::OnceLock<PathBuf>,
    /// The controller lease file and fence delay the shims watch.
    fence: std::sync::OnceLock<(PathBuf, Duration)>,
    /// Which users the processes may run as.
    rank_users: RankUserPolicy,
    /// Per-job cgroups with the node's limits; None where the node has none.
    cgroups: Option<crate::cgroup::JobCgroups>,
    /// How much of each process's output goes to the controller.
    output_budget: OutputBudget,
}

/// The agent's directory for a job, `<work_dir>/jobs/<job id>/workdir`,
/// made if missing and given to the job's user: its processes write there
/// (and a `sync:` archive is unpacked there, as that user).
pub fn job_workdir(work_dir: &Path, job_id: &str, identity: &RankIdentity) -> std::io::Result<PathBuf> {
    let dir = work_dir.join("jobs").join(job_id).join("workdir");
    std::fs::create_dir_all(&dir)?;
    if identity.needs_switch() {
        nix::unistd::chown(&dir, Some(identity.uid.into()), Some(identity.gid.into()))?;
    }
    Ok(dir)
}

impl Supervisor {
    /// A supervisor whose shims are this very binary (`/proc/self/exe` still
    /// runs it after a package upgrade replaced the file).
    pub fn new(node_name: String, work_dir: PathBuf, out: mpsc::Sender<Outbound>) -> Self {
        Self::with_shim(node_name, work_dir, out, PathBuf::from("/proc/self/exe"))
    }

    /// A supervisor that runs `shim` (a `cohort-agent` binary) as the shim.
    pub fn with_shim(node_name: String, work_dir: PathBuf, out: mpsc::Sender<Outbound>, shim: PathBuf) -> Self {
        let launches = Mutex::new(HashMap::new());
        Self {
            inner: Arc::new(Inner {
                node_name,
                work_dir,
                shim,
                launches,
                out,
                py_spy: Default::default(),
                fence: Default::default(),
                rank_users: RankUserPolicy::agent_user(),
                cgroups: None,
                output_budget: OutputBudget::default(),
            }),
        }
    }

    /// Makes every shim stop its rank itself once `lease` (renewed by the
    /// session on each acknowledged heartbeat) is older than `after`, so that
    /// a killed agent's ranks are fenced too.
    pub fn set_fence(&self, lease: PathBuf, after: Duration) {
        let _ = self.inner.fence.set((lease, after));
    }

    fn fence_args(&self, grace_ms: u32) -> Vec<String> {
        match self.inner.fence.get() {
            Some((lease, after)) => vec![
                "--lease-file".into(),
                lease.display().to_string(),
                "--fence-after-ms".into(),
                after.as_millis().to_string(),
                "--grace-ms".into(),
                grace_ms.to_string(),
            ],
            None => Vec::new(),
        }
    }

    /// The same supervisor with the node's rule for the users processes run as
    /// (before it is cloned or used).
    pub fn with_rank_users(mut self, policy: RankUserPolicy) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.rank_users = policy;
        }
        self
    }

    /// The same supervisor running each job attempt's processes in a cgroup
    /// of its own (before it is cloned or used).
    pub fn with_cgroups(mut self, cgroups: Option<crate::cgroup::JobCgroups>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.cgroups = cgroups;
        }
        self
    }

    /// The same supervisor with the node's output budget per process (before
    /// it is cloned or used).
    pub fn with_output_budget(mut self, budget: OutputBudget) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.output_budget = budget;
        }
        self
    }

    /// Starts every process of a launch. A process that cannot be spawned is
    /// reported as `spawn_failed`; the others still start (the controller
    /// tears the gang down).
    pub async fn launch(&self, cmd: LaunchCommand) -> Result<(), LaunchError> {
        // Before anything is created: a user this node does not allow changes nothing.
        let identity = self.inner.rank_users.resolve_blocking(&cmd.user).await?;
        if !cmd.metrics_dir.is_empty() {
            let follower = crate::supervisor::jsonl::JsonlMetrics {
                supervisor: self.clone(),
                dir: PathBuf::from(&cmd.metrics_dir),
                job_id: cmd.job_id.clone(),
                attempt: cmd.attempt,
                node: self.inner.node_name.clone(),
                out: self.inner.out.clone(),
            };
            tokio::spawn(follower.run());
        }
        let key = (cmd.job_id.clone(), cmd.attempt);
        let mut launches = self.inner.launches.lock().await;
        if launches.contains_key(&key) {
            return Err(LaunchError::Duplicate { job: cmd.job_id, attempt: cmd.attempt });
        }
        let dir = launch_dir(&self.inner.work_dir, &cmd.job_id, cmd.attempt);
        std::fs::create_dir_all(&dir).map_err(|source| LaunchError::Io { path: dir.display().to_string(), source })?;
        let cgroup = self.inner.cgroups.as_ref().map(|c| c.create(&cmd.job_id, cmd.attempt)).transpose()?;
        let cgroup_dirs = cgroup.map(|c| c.dirs).unwrap_or_default();
        let cwd = if cmd.workdir.is_empty() {
            let dir = self.inner.work_dir.join("jobs").join(&cmd.job_id).join("workdir");
            job_workdir(&self.inner.work_dir, &cmd.job_id, &identity)
                .map_err(|source| LaunchError::Io { path: dir.display().to_string(), source })?
        } else {
            let dir = PathBuf::from(&cmd.workdir);
            if !dir.is_dir() {
                return Err(LaunchError::MissingWorkdir(cmd.workdir));
            }
            dir
        };
        let grace = Duration::from_millis(u64::from(cmd.stop_grace_ms));
        let record = LaunchRecord {
            job_id: cmd.job_id.clone(),
            attempt: cmd.attempt,
            grace_ms: grace.as_millis() as u64,
            node_name: self.inner.node_name.clone(),
            boot_id: state::boot_id(),
            stopping_since_unix_ms: None,
            processes: Vec::new(),
        };
        let mut launch =
            Launch { dir: dir.clone(), record, processes: Vec::new(), grace, ended_at: None, save_until: None };
        for spec in &cmd.processes {
            let files = ProcessFiles::new(&dir, spec.index);
            match self.spawn(&cmd, spec, &cwd, &files, &identity, &cgroup_dirs).await {
                Ok((p, r)) => {
                    launch.processes.push(p);
                    launch.record.processes.push(r);
                }
                Err(error) => {
                    tracing::warn!(job = %cmd.job_id, index = spec.index, %error, "spawn failed");
                    let ended_unix_ms = now_unix_ms();
                    let exited = ProcessExited { exit_code: Some(127), ended_unix_ms, ..Default::default() };
                    launch.processes.push(Supervised::ended(spec.index, 0, 0, exited));
                    launch.record.processes.push(ProcessRecord {
                        index: spec.index,
                        shim_pid: 0,
                        shim_start_ticks: 0,
                        rank_pid: 0,
                        started_unix_ms: ended_unix_ms,
                        spawn_error: Some(error.clone()),
                        files,
                    });
                    self.event(&cmd.job_id, cmd.attempt, spec.index, Event::SpawnFailed(error)).await;
                }
            }
        }
        if launch.processes.iter().all(|p| p.exited.is_some()) {
            launch.ended_at = Some(Instant::now());
            // Nothing started, so no exit will remove the cgroup.
            if let Some(cgroups) = &self.inner.cgroups {
                cgroups.remove(&cgroups.cgroup(&cmd.job_id, cmd.attempt), Duration::ZERO).await;
            }
        }
        // Without it a restarted agent cannot adopt the launch; the launch itself still runs.
        if let Err(e) = launch.record.save(&dir) {
            tracing::warn!(job = %cmd.job_id, dir = %dir.display(), error = %e, "cannot write the launch's state file");
        }
        launches.insert(key, launch);
        Ok(())
    }

    async fn spawn(
        &self,
        cmd: &LaunchCommand,
        spec: &cohort_proto::ProcessSpec,
        cwd: &Path,
        files: &ProcessFiles,
        identity: &RankIdentity,
        cgroup_dirs: &[PathBuf],
    ) -> Result<(Supervised, ProcessRecord), String> {
        let Some(program) = spec.argv.first() else { return Err("empty command line".into()) };
        // A relative program path with a slash is relative to the workdir.
        let program =
            if program.contains('/') && !program.starts_with('/') { cwd.join(program) } else { PathBuf::from(program) };
        // Fresh output files, no exit file: the follower starts at byte 0.
        // Readable by the agent (root) only: on a shared node, ranks of other
        // jobs (other users) must not read this job's output. The rank writes
        // through the descriptors its shim opened.
        let fresh = |path: &Path| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        fresh(&files.stdout)?;
        fresh(&files.stderr)?;
        let _ = std::fs::remove_file(&files.exit);
        let _ = std::fs::remove_file(files.stop_marker());
        // The shim's own complaints land in the process's stderr file, appended like the rank's output.
        let shim_stderr = std::fs::File::options()
            .append(true)
            .open(&files.stderr)
            .map_err(|e| format!("{}: {e}", files.stderr.display()))?;
        let mut command = tokio::process::Command::new(&self.inner.shim);
        command
            .arg0("cohort-agent")
            .arg(shim::SUBCOMMAND)
            .arg("--exit-file")
            .arg(&files.exit)
            .arg("--stop-file")
            .arg(files.stop_marker())
            .arg("--stdout")
            .arg(&files.stdout)
            .arg("--stderr")
            .arg(&files.stderr)
            .args(self.fence_args(cmd.stop_grace_ms))
            .args(identity.needs_switch().then(|| format!("--run-as={}", identity.to_arg())))
            .args(cgroup_dirs.iter().map(|d| format!("--cgroup={}", d.display())))
            .arg("--env-stdin")
            .arg("--")
            .arg(&program)
            .args(&spec.argv[1..])
            .current_dir(cwd)
            // The sweep finds escaped descendants by these four (the work
            // dir tells apart two agents on one host, e.g. test clusters).
            .env("COHORT_JOB_ID", &cmd.job_id)
            .env("COHORT_ATTEMPT", cmd.attempt.to_string())
            .env("COHORT_NODE_NAME", &self.inner.node_name)
            .env(AGENT_DIR_VAR, &self.inner.work_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(shim_stderr)
            .kill_on_drop(false);
        for name in cohort_runtime::service::NOTIFY_ENV {
            command.env_remove(name);
        }
        let mut child =
            command.spawn().map_err(|e| format!("cannot start the shim {}: {e}", self.inner.shim.display()))?;
        let pid = child.id().ok_or("the shim exited before its pid was read")?;
        // The job's environment reaches only the rank's own exec, never the shim's or
        // exec-as's (both root): see shim.rs. Another user's own HOME, USER and
        // LOGNAME first, so that the job's env can override them.
        let env = shim::JobEnv {
            vars: identity
                .needs_switch()
                .then(|| identity.login_env())
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_owned(), v.to_string_lossy().into_owned()))
                .chain(spec.env.iter().map(|v| (v.name.clone(), v.value.clone())))
                .collect(),
        };
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt as _;
            // A shim that died before reading shows in the handshake below.
            let _ = stdin.write_all(&env.to_json()).await;
        }
        let rank_pid = match handshake(&mut child).await {
            Ok(shim::Handshake::Started { rank_pid }) => rank_pid,
            Ok(shim::Handshake::Failed { error }) => {
                let _ = child.wait().await;
                return Err(error);
            }
            Err(error) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(format!("the shim did not start {}: {error}", program.display()));
            }
        };
        let started_unix_ms = now_unix_ms();
        // 0 when the shim is already gone (a very short process): then its exit file says everything.
        let shim_start_ticks = state::start_ticks(pid).unwrap_or(0);
        tracing::info!(job = %cmd.job_id, attempt = cmd.attempt, index = spec.index, pid, rank_pid, "process started");
        let started = ProcessStarted { pid, started_unix_ms, user: identity.name.clone() };
        self.event(&cmd.job_id, cmd.attempt, spec.index, Event::Started(started)).await;
        let key = (cmd.job_id.clone(), cmd.attempt);
        let done = self.follow(&key, spec.index, pid, files, tail::StartAt::Beginning, Shim::Child(child));
        let p = Supervised {
            index: spec.index,
            pid,
            started_unix_ms,
            exited: None,
            stop_requested: false,
            term_sent: false,
            killed: false,
            done,
        };
        let r = ProcessRecord {
            index: spec.index,
            shim_pid: pid,
            shim_start_ticks,
            rank_pid,
            started_unix_ms,
            spawn_error: None,
            files: files.clone(),
        };
        Ok((p, r))
    }

    /// Follows a process's output and waits for its shim to end; then reports
    /// the exit (after the last line). The receiver turns true when all is done.
    fn follow(
        &self,
        (job_id, attempt): &LaunchKey,
        index: u32,
        pid: u32,
        files: &ProcessFiles,
        from: tail::StartAt,
        shim: Shim,
    ) -> watch::Receiver<bool> {
        let dest = Destination {
            out: self.inner.out.clone(),
            node: self.inner.node_name.clone(),
            job_id: job_id.clone(),
            attempt: *attempt,
            index,
            budget: self.inner.output_budget,
        };
        let follower = Follower::start(dest, files.stdout.clone(), files.stderr.clone(), from);
        let (done_tx, done) = watch::channel(false);
        let this = self.clone();
        let (job_id, attempt, exit_file) = (job_id.clone(), *attempt, files.exit.clone());
        tokio::spawn(async move {
            let status = match shim {
                Shim::Child(mut child) => Some(child.wait().await),
                Shim::Adopted { start_ticks } => {
                    // Not until the exit file: a signalled shim writes it, then
                    // waits for what its rank left (saving) to end.
                    while state::is_alive(pid, start_ticks) {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    None
                }
            };
            // Whatever the rank left in its group goes with it (the shim does
            // this too; not when it was killed).
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let ended = follower.finish().await;
            let record = ExitRecord::read(&exit_file);
            this.on_exit(&job_id, attempt, index, record, status, ended).await;
            let _ = done_tx.send(true);
        });
        done
    }

    async fn on_exit(
        &self,
        job_id: &str,
        attempt: u32,
        index: u32,
        record: Option<ExitRecord>,
        shim_status: Option<std::io::Result<std::process::ExitStatus>>,
        ended: tail::Ended,
    ) {
        let mut launches = self.inner.launches.lock().await;
        let Some(launch) = launches.get_mut(&(job_id.to_string(), attempt)) else { return };
        let exit_file = launch.record.processes.iter().find(|r| r.index == index).map(|r| r.files.exit.clone());
        let Some(p) = launch.processes.iter_mut().find(|p| p.index == index) else { return };
        let record = match record {
            Some(record) => record,
            None => {
                let record = unrecorded_exit(p.killed, shim_status);
                // Written for the shim, so that a restarted agent reports the same.
                if let Some(path) = exit_file
                    && let Err(e) = record.write(&path)
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the exit file");
                }
                record
            }
        };
        let mut last_lines = ended.last_lines;
        let clean = record.exit_code == Some(0) && record.signal.is_none();
        let mut note = record.note.clone();
        if !p.stop_requested && !clean {
            let cgroup = self.inner.cgroups.as_ref().map(|c| (c, c.cgroup(job_id, attempt)));
            // A rank the kernel's OOM killer took says nothing itself: the kernel log does.
            let whose = kmsg::Whose {
                pids: vec![p.pid, record.rank_pid],
                cgroups: cgroup.as_ref().map(|(_, c)| c.dirs.clone()).unwrap_or_default(),
            };
            last_lines.extend(kmsg::oom_kills_since(p.started_unix_ms, &whose));
            // Nor does one stopped by its cgroup's limits: the cgroup's counters do.
            if let Some((cgroups, cgroup)) = &cgroup
                && let Some(hit) = cgroups.limits_hit(cgroup)
            {
                note = join_causes(&hit, &note);
            }
        }
        let exited = ProcessExited {
            exit_code: record.exit_code,
            signal: record.signal,
            stopped_by_agent: p.stop_requested,
            ended_unix_ms: record.ended_unix_ms,
            root_cause: join_causes(&note, &ended.root_cause),
            last_lines,
        };
        p.exited = Some(exited.clone());
        tracing::info!(job = job_id, attempt, index, code = ?exited.exit_code, signal = ?exited.signal, "process exited");
        let failed = !exited.stopped_by_agent && !is_clean(&exited);
        let siblings_alive = launch.processes.iter().any(|p| p.exited.is_none());
        if !siblings_alive {
            launch.ended_at = Some(Instant::now());
        }
        let grace = launch.grace;
        drop(launches);
        if !siblings_alive {
            // The launch is over: nothing of it may outlive it.
            let swept = sweep(job_id, attempt, &self.inner.node_name, &self.inner.work_dir);
            if swept > 0 {
                tracing::warn!(job = job_id, attempt, swept, "killed leftovers of a finished launch");
            }
            if let Some(cgroups) = &self.inner.cgroups {
                cgroups.remove(&cgroups.cgroup(job_id, attempt), Duration::from_secs(5)).await;
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
        self.stop_after(job_id, attempt, grace, None).await
    }

    /// [`Self::stop`], for a preemption first: `save` is a signal sent to each
    /// group and how long the ranks get to save and exit before the SIGTERM.
    /// A stop that comes while they save waits for the same end.
    pub async fn stop_after(&self, job_id: &str, attempt: u32, grace: Duration, save: Option<(Signal, Duration)>) {
        let save_until = self.signal_to_save(job_id, attempt, save).await;
        if let Some(until) = save_until {
            for mut done in self.unfinished(job_id, attempt).await {
                if tokio::time::timeout_at(until, done.wait_for(|d| *d)).await.is_err() {
                    tracing::info!(
                        job = job_id,
                        attempt,
                        "the ranks did not exit in the preemption's grace; stopping them"
                    );
                    break;
                }
            }
        }
        let mut waits = Vec::new();
        {
            let mut launches = self.inner.launches.lock().await;
            let Some(launch) = launches.get_mut(&(job_id.to_string(), attempt)) else { return };
            mark_stopping(launch, job_id);
            for p in launch.processes.iter_mut().filter(|p| p.exited.is_none()) {
                p.stop_requested = true;
                if !p.term_sent {
                    p.term_sent = true;
                    tracing::info!(job = job_id, attempt, index = p.index, pid = p.pid, "SIGTERM to process group");
                    let _ = killpg(Pid::from_raw(p.pid as i32), Signal::SIGTERM);
                }
                waits.push((p.index, p.pid, p.done.clone()));
            }
        }
        let deadline = Instant::now() + grace;
        for (index, pid, mut done) in waits {
            let in_time = tokio::time::timeout_at(deadline, done.wait_for(|d| *d)).await.is_ok();
            if !in_time {
                tracing::warn!(job = job_id, pid, ?grace, "still running after the grace period; SIGKILL");
                self.mark_killed(job_id, attempt, index).await;
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = done.wait_for(|d| *d).await;
            }
        }
        let swept = sweep(job_id, attempt, &self.inner.node_name, &self.inner.work_dir);
        if swept > 0 {
            tracing::warn!(job = job_id, attempt, swept, "killed processes that had left their process group");
        }
    }

    /// Sends a preemption's signal once per launch; returns until when its ranks save (None: no save asked).
    async fn signal_to_save(&self, job_id: &str, attempt: u32, save: Option<(Signal, Duration)>) -> Option<Instant> {
        let mut launches = self.inner.launches.lock().await;
        let launch = launches.get_mut(&(job_id.to_string(), attempt))?;
        if let Some((signal, save_grace)) = save
            && launch.save_until.is_none()
            && launch.processes.iter().any(|p| p.exited.is_none() && !p.stop_requested)
        {
            mark_stopping(launch, job_id);
            launch.save_until = Some(Instant::now() + save_grace);
            for p in launch.processes.iter_mut().filter(|p| p.exited.is_none() && !p.stop_requested) {
                p.stop_requested = true;
                tracing::info!(job = job_id, attempt, index = p.index, pid = p.pid, %signal, ?save_grace, "preemption: signal to process group to save");
                let _ = killpg(Pid::from_raw(p.pid as i32), signal);
            }
        }
        launch.save_until
    }

    /// The exit watches of a launch's processes still running.
    async fn unfinished(&self, job_id: &str, attempt: u32) -> Vec<watch::Receiver<bool>> {
        let launches = self.inner.launches.lock().await;
        let Some(launch) = launches.get(&(job_id.to_string(), attempt)) else { return Vec::new() };
        launch.processes.iter().filter(|p| p.exited.is_none()).map(|p| p.done.clone()).collect()
    }

    async fn mark_killed(&self, job_id: &str, attempt: u32, index: u32) {
        let mut launches = self.inner.launches.lock().await;
        if let Some(p) = launches
            .get_mut(&(job_id.to_string(), attempt))
            .and_then(|l| l.processes.iter_mut().find(|p| p.index == index))
        {
            p.killed = true;
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
        launches.retain(|_, l| {
            let keep = l.ended_at.is_none_or(|t| now.duration_since(t) < KEEP_ENDED);
            if !keep {
                l.record.remove(&l.dir);
            }
            keep
        });
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

    /// Every launch this supervisor holds, by job and attempt: true for one
    /// that ended (kept a while after), false for one that runs.
    pub async fn launches_ended(&self) -> HashMap<(String, u32), bool> {
        let launches = self.inner.launches.lock().await;
        launches.iter().map(|(key, l)| (key.clone(), l.ended_at.is_some())).collect()
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

/// Before the first signal: a restarted agent counts later exits as its own doing.
fn mark_stopping(launch: &mut Launch, job_id: &str) {
    // Before any signal: a shim whose rank dies of it finds the marker and
    // waits for what the rank left (saving) instead of killing it.
    for process in &launch.record.processes {
        let marker = process.files.stop_marker();
        // A stop resent every few seconds finds it there already.
        if marker.exists() {
            continue;
        }
        if let Err(e) = std::fs::write(&marker, b"") {
            tracing::warn!(job = job_id, path = %marker.display(), error = %e, "cannot mark the process as stopping");
        }
    }
    let alive = launch.processes.iter().any(|p| p.exited.is_none());
    if alive && launch.record.stopping_since_unix_ms.is_none() {
        launch.record.stopping_since_unix_ms = Some(now_unix_ms());
        if let Err(e) = launch.record.save(&launch.dir) {
            tracing::warn!(job = job_id, error = %e, "cannot update the launch's state file");
        }
    }
}

impl Supervised {
    /// A process that is over (or never started).
    fn ended(index: u32, pid: u32, started_unix_ms: i64, exited: ProcessExited) -> Self {
        let (tx, done) = watch::channel(true);
        drop(tx);
        Self {
            index,
            pid,
            started_unix_ms,
            exited: Some(exited),
            stop_requested: false,
            term_sent: false,
            killed: false,
            done,
        }
    }
}

/// Reads the shim's one-line answer: the rank's pid, or why it did not start.
async fn handshake(child: &mut tokio::process::Child) -> Result<shim::Handshake, String> {
    let pipe = child.stdout.take().ok_or("no pipe to the shim")?;
    let mut line = String::new();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, BufReader::new(pipe).read_line(&mut line)).await {
        Err(_) => Err(format!("no answer within {HANDSHAKE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("it exited without an answer".into()),
        Ok(Ok(_)) => serde_json::from_str(line.trim()).map_err(|e| format!("unreadable answer {line:?}: {e}")),
    }
}

fn is_clean(exited: &ProcessExited) -> bool {
    exited.exit_code == Some(0) && exited.signal.is_none()
}

fn join_causes(note: &str, root_cause: &str) -> String {
    match (note.is_empty(), root_cause.is_empty()) {
        (false, false) => format!("{note}; {root_cause}"),
        (true, _) => root_cause.to_string(),
        (false, true) => note.to_string(),
    }
}

/// The exit of a process whose shim left no exit file: killed with its
/// group by the agent's escalation, killed alone, or unable to write it.
fn unrecorded_exit(killed_by_agent: bool, shim: Option<std::io::Result<std::process::ExitStatus>>) -> ExitRecord {
    use std::os::unix::process::ExitStatusExt;
    let unknown =
        |note: String| ExitRecord { exit_code: None, signal: None, ended_unix_ms: now_unix_ms(), rank_pid: 0, note };
    if killed_by_agent {
        return ExitRecord { signal: Some(Signal::SIGKILL as i32), ..unknown(String::new()) };
    }
    match shim {
        // The shim exits with the rank's code when it cannot write the file.
        Some(Ok(status)) if status.code().is_some() => {
            ExitRecord { exit_code: status.code(), ..unknown("the shim could not write the exit file".into()) }
        }
        Some(Ok(status)) => unknown(format!("{SHIM_KILLED} (signal {})", status.signal().unwrap_or_default())),
        Some(Err(e)) => unknown(format!("exit unknown: waiting for the shim failed: {e}")),
        None => unknown(SHIM_KILLED.into()),
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
        is_save: m.saved,
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

/// The variable naming the work dir of the agent that started a process.
const AGENT_DIR_VAR: &str = "COHORT_AGENT_WORK_DIR";

/// Kills (SIGKILL) every process of this node's launch that is still alive,
/// found by its inherited COHORT_* variables: those of this agent's work dir
/// (or of none: started before the variable existed). Returns how many it killed.
fn sweep(job_id: &str, attempt: u32, node: &str, work_dir: &Path) -> usize {
    let wanted =
        [format!("COHORT_JOB_ID={job_id}"), format!("COHORT_ATTEMPT={attempt}"), format!("COHORT_NODE_NAME={node}")];
    let own_dir = format!("{AGENT_DIR_VAR}={}", work_dir.display());
    let other_agent = |vars: &[&[u8]]| {
        vars.iter().any(|v| v.starts_with(AGENT_DIR_VAR.as_bytes()) && v.get(AGENT_DIR_VAR.len()) == Some(&b'='))
            && !vars.contains(&own_dir.as_bytes())
    };
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
        if wanted.iter().all(|w| vars.contains(&w.as_bytes())) && !other_agent(&vars) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests;
