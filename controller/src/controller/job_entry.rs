//! A job's state machine. `JobEntry` holds the job's record (the proto `Job`
//! that is persisted and published) and is the only code that moves the job
//! from one phase to another, stamps its timestamps, closes its attempt
//! record and changes its processes' phases: every transition is a method
//! that refuses a move the job's phase does not allow.

use std::collections::HashMap;

use cohort_proto::{
    AttemptRecord, Checkpoint, Failure, GangPlan, Job, JobState, PipelineStage, Preemption, PrepareResult,
    ProcessExited, ProcessPhase, ProcessStatus, now_unix_ms,
};
use cohort_shared::spec::JobSpec;

use super::{progress, restart};

/// Where a job is in its life (the proto `JobState`, without its wire encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobPhase {
    /// Waiting to be placed.
    Pending,
    /// Placed; its nodes run preflight, staging and dataset checks.
    Preparing,
    /// Launch commands sent; not every process has started.
    Starting,
    /// Every process started (a pipeline: its stages run).
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// An attempt failed and another one comes once the gang is gone.
    Restarting,
    /// A stored state this controller does not know; no transition leaves it.
    Unknown,
}

impl JobPhase {
    pub(super) fn from_proto(state: i32) -> Self {
        match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
            JobState::Unspecified => JobPhase::Unknown,
            JobState::Pending => JobPhase::Pending,
            JobState::Preparing => JobPhase::Preparing,
            JobState::Starting => JobPhase::Starting,
            JobState::Running => JobPhase::Running,
            JobState::Succeeded => JobPhase::Succeeded,
            JobState::Failed => JobPhase::Failed,
            JobState::Cancelled => JobPhase::Cancelled,
            JobState::Restarting => JobPhase::Restarting,
            // Only an attempt's record says Preempted; a job never does.
            JobState::Preempted => JobPhase::Unknown,
        }
    }

    fn to_proto(self) -> JobState {
        match self {
            JobPhase::Unknown => JobState::Unspecified,
            JobPhase::Pending => JobState::Pending,
            JobPhase::Preparing => JobState::Preparing,
            JobPhase::Starting => JobState::Starting,
            JobPhase::Running => JobState::Running,
            JobPhase::Succeeded => JobState::Succeeded,
            JobPhase::Failed => JobState::Failed,
            JobPhase::Cancelled => JobState::Cancelled,
            JobPhase::Restarting => JobState::Restarting,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            JobPhase::Unknown => "Unknown",
            JobPhase::Pending => "Pending",
            JobPhase::Preparing => "Preparing",
            JobPhase::Starting => "Starting",
            JobPhase::Running => "Running",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
            JobPhase::Restarting => "Restarting",
        }
    }

    /// An attempt is under way (or, for a pipeline, its stages).
    pub(super) fn is_active(self) -> bool {
        matches!(self, JobPhase::Preparing | JobPhase::Starting | JobPhase::Running)
    }

    pub(super) fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled)
    }
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A transition the job's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: cannot {transition} while {from}")]
pub(super) struct TransitionError {
    pub(super) job: String,
    pub(super) from: JobPhase,
    pub(super) transition: &'static str,
}

/// What the entry learnt from a process's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExitSeen {
    pub(super) node_rank: u32,
    pub(super) global_rank: Option<u32>,
}

pub(super) struct JobEntry {
    pub(super) job: Job,
    pub(super) spec: JobSpec,
    pub(super) seq: u64,
    pub(super) revision: Option<u64>,
    /// Preparation results of the current attempt, by node.
    pub(super) prepared: HashMap<String, PrepareResult>,
    /// The current attempt's tracing span (exported over OTLP when configured):
    /// opened at launch, an event per transition, closed when the attempt ends.
    pub(super) span: Option<tracing::Span>,
    /// Progress of the current attempt: hang and straggler detection (memory only).
    pub(super) progress: progress::AttemptProgress,
    /// A restart's checkpoint lookup in flight.
    pub(super) lookup: Option<restart::Lookup>,
    /// The checkpoint lookup of a preemption waiting for this job's next
    /// checkpoint (`job.checkpoint_wait`) before it stops it.
    pub(super) checkpoint_poll: super::preemption::CheckpointPoll,
    /// Nodes lost under this job whose fence deadline holds its next attempt
    /// back (memory only: after a controller restart the persisted
    /// `not_before_unix_ms` holds, unreleased).
    pub(super) fence_holds: Vec<FenceHold>,
    /// The restart backoff's part of `not_before_unix_ms`.
    backoff_until_unix_ms: i64,
    /// Inputs without `sha256` whose digest nodes of the current attempt
    /// wait for (memory only: a restarted controller places the job again).
    pub(super) awaited_digests: Vec<AwaitedDigest>,
}

/// An input without `sha256` that some nodes of an attempt read from the
/// source while the others wait for the digest they find
/// (`StageInput.awaits_digest`), to fetch it from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AwaitedDigest {
    pub(super) attempt: u32,
    /// The input's name.
    pub(super) item: String,
    /// The job's `user:`, whose content it is.
    pub(super) user: String,
    /// The nodes reading the source that have not failed it; the first to
    /// report a digest answers.
    pub(super) readers: Vec<String>,
    pub(super) waiting: Vec<String>,
}

/// A lost node's fence deadline holding a job's next attempt back, until its
/// ranks are surely gone, or shown gone by the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FenceHold {
    pub(super) node: String,
    /// When the node was declared lost.
    pub(super) lost_unix_ms: i64,
    /// When its ranks are surely gone (fence deadline, stop grace, slack).
    pub(super) until_unix_ms: i64,
}

impl JobEntry {
    /// A job read back from the store (`revision`): nothing of an attempt in
    /// memory yet. One that was being prepared is placed again, since the
    /// preparation results died with the controller that collected them.
    pub(super) fn from_store(mut job: Job, spec: JobSpec, seq: u64, revision: u64) -> Self {
        if JobPhase::from_proto(job.state) == JobPhase::Preparing {
            set_phase(&mut job, JobPhase::Pending);
            job.reason = "placing again: the controller restarted while the job was being prepared".into();
            job.plan = None;
            close_attempt(&mut job);
        }
        Self::new(job, spec, seq, Some(revision))
    }

    /// A job just submitted (by a client or by its pipeline): pending.
    pub(super) fn submitted(mut job: Job, spec: JobSpec, seq: u64) -> Self {
        set_phase(&mut job, JobPhase::Pending);
        job.reason = "waiting to be placed".into();
        Self::new(job, spec, seq, None)
    }

    fn new(mut job: Job, spec: JobSpec, seq: u64, revision: Option<u64>) -> Self {
        // Without its own, the record keeps its queue's max_run_time (set at submit).
        if let Some(limit) = spec.time_limit {
            job.time_limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
        }
        JobEntry {
            job,
            spec,
            seq,
            revision,
            prepared: HashMap::new(),
            span: None,
            progress: Default::default(),
            lookup: None,
            checkpoint_poll: Default::default(),
            fence_holds: Vec::new(),
            backoff_until_unix_ms: 0,
            awaited_digests: Vec::new(),
        }
    }

    /// Takes a newer version of the record written by someone else.
    pub(super) fn replace_record(&mut self, job: Job, revision: u64) {
        self.job = job;
        self.revision = Some(revision);
    }

    pub(super) fn phase(&self) -> JobPhase {
        JobPhase::from_proto(self.job.state)
    }
    pub(super) fn is_active(&self) -> bool {
        self.phase().is_active()
    }
    pub(super) fn is_terminal(&self) -> bool {
        self.phase().is_terminal()
    }
    /// The current attempt is over (finished, or failed with a restart to come).
    pub(super) fn is_over(&self) -> bool {
        self.is_terminal() || self.phase() == JobPhase::Restarting
    }
    /// Holds GPUs and its port: running, or over with processes still alive.
    pub(super) fn holds_resources(&self) -> bool {
        self.is_active() || (self.is_over() && self.job.live_processes > 0)
    }
    pub(super) fn plan(&self) -> Option<&GangPlan> {
        self.job.plan.as_ref()
    }
    pub(super) fn on_node(&self, node: &str) -> bool {
        self.plan().is_some_and(|p| p.nodes.iter().any(|a| a.node_name == node))
    }
    /// The node's rank in the current plan (0 for a node the plan lacks).
    pub(super) fn node_rank(&self, node: &str) -> u32 {
        self.plan().and_then(|p| p.nodes.iter().find(|a| a.node_name == node)).map(|a| a.node_rank).unwrap_or(0)
    }
    /// Every process of the attempt exited with code 0.
    pub(super) fn all_exited_cleanly(&self) -> bool {
        self.job.processes.iter().all(|p| p.phase == ProcessPhase::Exited as i32 && p.exit_code == Some(0))
    }

    fn refuse(&self, transition: &'static str) -> TransitionError {
        TransitionError { job: self.job.id.clone(), from: self.phase(), transition }
    }

    fn require(&self, transition: &'static str, allowed: impl Fn(JobPhase) -> bool) -> Result<(), TransitionError> {
        if allowed(self.phase()) { Ok(()) } else { Err(self.refuse(transition)) }
    }

    // ------------------------------------------------------------ transitions

    /// A pipeline runs from its submission: it holds no GPUs, its stages do.
    pub(super) fn start_pipeline(&mut self, stages: Vec<PipelineStage>) -> Result<(), TransitionError> {
        self.require("start the pipeline", |p| p == JobPhase::Pending)?;
        set_phase(&mut self.job, JobPhase::Running);
        self.job.reason = "starting its first stages".into();
        self.job.started_unix_ms = self.job.submitted_unix_ms;
        self.job.stages = stages;
        Ok(())
    }

    /// Opens a new attempt on `plan` for a pending job: the attempt number,
    /// its record and start time; nothing of the last attempt stays. The job
    /// stays pending until it is prepared or launched. Returns the attempt.
    pub(super) fn begin_attempt(&mut self, plan: GangPlan, nodes: Vec<String>) -> Result<u32, TransitionError> {
        self.require("begin an attempt", |p| p == JobPhase::Pending)?;
        let attempt = self.job.attempt + 1;
        let now = now_unix_ms();
        let job = &mut self.job;
        job.attempt = attempt;
        job.started_unix_ms = now;
        job.finished_unix_ms = 0;
        job.running_unix_ms = 0;
        job.output_dropped_bytes = 0;
        job.failure = None;
        job.processes.clear();
        job.live_processes = 0;
        job.preflight = None;
        job.staging.clear();
        job.datasets.clear();
        job.attempts.push(AttemptRecord {
            attempt,
            started_unix_ms: now,
            nodes,
            resumed_from: job.resume_from.clone(),
            master_port: plan.master_port,
            state: JobState::Starting as i32,
            ..AttemptRecord::default()
        });
        job.plan = Some(plan);
        self.prepared.clear();
        Ok(attempt)
    }

    /// The attempt's nodes run their checks before anything launches.
    pub(super) fn preparing(&mut self, reason: String) -> Result<(), TransitionError> {
        self.require("prepare", |p| p == JobPhase::Pending && self.job.plan.is_some())?;
        set_phase(&mut self.job, JobPhase::Preparing);
        self.job.reason = reason;
        Ok(())
    }

    /// Launch commands go out for `processes` (each `Launching` until its agent reports it started).
    pub(super) fn launching(&mut self, processes: Vec<ProcessStatus>, reason: String) -> Result<(), TransitionError> {
        self.require("launch", |p| matches!(p, JobPhase::Pending | JobPhase::Preparing) && self.job.plan.is_some())?;
        set_phase(&mut self.job, JobPhase::Starting);
        self.job.reason = reason;
        self.job.processes =
            processes.into_iter().map(|p| ProcessStatus { phase: ProcessPhase::Launching as i32, ..p }).collect();
        self.recount();
        Ok(())
    }

    /// A process reported it started; the job runs once every process has.
    /// Returns whether the job became `Running` now.
    pub(super) fn process_started(&mut self, node: &str, index: u32, pid: u32, started_unix_ms: i64) -> bool {
        self.process_running(node, index, pid, started_unix_ms);
        // Quick processes may have exited already.
        let has_started = |p: &ProcessStatus| {
            p.phase == ProcessPhase::Running as i32 || (p.phase == ProcessPhase::Exited as i32 && p.started_unix_ms > 0)
        };
        if self.phase() != JobPhase::Starting || !self.job.processes.iter().all(has_started) {
            return false;
        }
        set_phase(&mut self.job, JobPhase::Running);
        self.job.reason = "every process of the gang has started".into();
        self.job.running_unix_ms = now_unix_ms();
        true
    }

    /// A process an agent reports running (a start, or an adoption after a reconnect).
    pub(super) fn process_running(&mut self, node: &str, index: u32, pid: u32, started_unix_ms: i64) {
        if let Some(p) = self.process_mut(node, index) {
            p.phase = ProcessPhase::Running as i32;
            p.pid = pid;
            p.started_unix_ms = started_unix_ms;
        }
        self.recount();
    }

    /// A process counted lost that its node (back from a partition) still
    /// runs: it is live again, to be stopped. Returns whether it was lost.
    pub(super) fn process_revived(&mut self, node: &str, index: u32, pid: u32) -> bool {
        let Some(p) = self.process_mut(node, index).filter(|p| p.phase == ProcessPhase::Lost as i32) else {
            return false;
        };
        p.phase = ProcessPhase::Running as i32;
        p.pid = pid;
        self.recount();
        true
    }

    /// Records a live process's exit; `None` for an unknown process or one
    /// whose end is already known (an exit re-reported after a reconnect).
    /// Whether the exit ends the job is the caller's decision.
    pub(super) fn process_exited(&mut self, node: &str, index: u32, exited: &ProcessExited) -> Option<ExitSeen> {
        let node_rank = self.node_rank(node);
        let p = self.process_mut(node, index).filter(|p| is_live(p))?;
        p.phase = ProcessPhase::Exited as i32;
        p.exit_code = exited.exit_code;
        p.signal = exited.signal;
        p.stopped_by_agent = exited.stopped_by_agent;
        p.ended_unix_ms = exited.ended_unix_ms;
        let global_rank = p.global_rank;
        self.recount();
        Some(ExitSeen { node_rank, global_rank })
    }

    /// The agent could not start a process. Returns its node's rank.
    pub(super) fn process_spawn_failed(&mut self, node: &str, index: u32) -> u32 {
        if let Some(p) = self.process_mut(node, index) {
            p.phase = ProcessPhase::SpawnFailed as i32;
        }
        self.recount();
        self.node_rank(node)
    }

    /// Every live process of the attempt on `node` is lost (the node was
    /// lost, came back without them, or no longer reports them). Returns the
    /// node's rank.
    pub(super) fn mark_lost(&mut self, node: &str) -> u32 {
        for p in self.job.processes.iter_mut().filter(|p| p.node_name == node && is_live(p)) {
            p.phase = ProcessPhase::Lost as i32;
        }
        self.recount();
        self.node_rank(node)
    }

    /// The active attempt failed: the job is `Failed` (a restart may follow)
    /// and the attempt's record closed. Tearing the gang down is the caller's.
    pub(super) fn fail(&mut self, failure: Failure) -> Result<(), TransitionError> {
        self.require("fail", JobPhase::is_active)?;
        set_phase(&mut self.job, JobPhase::Failed);
        self.job.reason = failure.message.clone();
        self.job.failure = Some(failure);
        self.job.finished_unix_ms = now_unix_ms();
        close_attempt(&mut self.job);
        Ok(())
    }

    /// The active attempt (or pipeline) succeeded.
    pub(super) fn succeed(&mut self, reason: &str) -> Result<(), TransitionError> {
        self.require("succeed", JobPhase::is_active)?;
        set_phase(&mut self.job, JobPhase::Succeeded);
        self.job.reason = reason.into();
        self.job.finished_unix_ms = now_unix_ms();
        close_attempt(&mut self.job);
        Ok(())
    }

    /// Cancels a job that has not finished. Returns the phase it was
    /// cancelled in: an active one's gang is the caller's to stop, a
    /// restarting one's failed gang goes on being stopped.
    pub(super) fn cancel(&mut self, reason: String) -> Result<JobPhase, TransitionError> {
        let from = self.phase();
        self.require("cancel", |p| p == JobPhase::Pending || p == JobPhase::Restarting || p.is_active())?;
        set_phase(&mut self.job, JobPhase::Cancelled);
        self.job.reason = reason;
        self.job.finished_unix_ms = now_unix_ms();
        match from {
            JobPhase::Restarting => self.lookup = None,
            p if p.is_active() => close_attempt(&mut self.job),
            _ => {}
        }
        Ok(from)
    }

    /// A failed attempt is retried: no earlier than `not_before_unix_ms`
    /// (the backoff), and not before any earlier hold (a fence deadline).
    pub(super) fn restarting(&mut self, not_before_unix_ms: i64, reason: String) -> Result<(), TransitionError> {
        self.require("restart", |p| p == JobPhase::Failed)?;
        set_phase(&mut self.job, JobPhase::Restarting);
        self.job.finished_unix_ms = 0;
        self.backoff_until_unix_ms = not_before_unix_ms;
        self.hold_until(not_before_unix_ms);
        self.job.reason = reason;
        Ok(())
    }

    /// The failed gang is gone: the restarting job waits to be placed again.
    pub(super) fn requeue(&mut self, reason: String) -> Result<(), TransitionError> {
        self.require("queue the restart", |p| p == JobPhase::Restarting)?;
        set_phase(&mut self.job, JobPhase::Pending);
        self.job.reason = reason;
        Ok(())
    }

    /// A preempted attempt's cost, once its gang is gone and the checkpoint
    /// the next attempt resumes from is known: the last iteration it reported
    /// (`iteration`, when known) minus that checkpoint's (0 for a fresh start,
    /// when `checkpoints_known`).
    pub(super) fn count_lost_work(&mut self, iteration: Option<u64>, checkpoints_known: bool) {
        let resumed = match &self.job.resume_from {
            Some(c) => Some(c.iteration),
            None if checkpoints_known => Some(0),
            None => None,
        };
        let Some(record) = self.job.attempts.last_mut().filter(|a| a.state == JobState::Preempted as i32) else {
            return;
        };
        let Some(preemption) = record.preemption.as_mut() else { return };
        preemption.iteration = iteration;
        preemption.resumed_iteration = resumed;
        preemption.lost_iterations = iteration.zip(resumed).map(|(at, from)| at.saturating_sub(from));
    }

    /// `cohort resume`: a failed or cancelled job is placed again, resuming from `checkpoint`.
    pub(super) fn resume(&mut self, checkpoint: Checkpoint, reason: String) -> Result<(), TransitionError> {
        self.require("resume", |p| matches!(p, JobPhase::Failed | JobPhase::Cancelled))?;
        set_phase(&mut self.job, JobPhase::Pending);
        self.job.reason = reason;
        self.job.resume_from = Some(checkpoint);
        Ok(())
    }

    /// The active attempt is preempted: the job is `Restarting` (its gang is
    /// stopped, after being asked to save, then it is queued again), and the
    /// attempt's record says `Preempted`, which the restart budget does not count.
    pub(super) fn preempt(&mut self, preemption: Preemption, reason: String) -> Result<(), TransitionError> {
        self.require("preempt", JobPhase::is_active)?;
        set_phase(&mut self.job, JobPhase::Restarting);
        self.job.reason = reason;
        self.job.finished_unix_ms = now_unix_ms();
        close_attempt(&mut self.job);
        self.job.finished_unix_ms = 0;
        if let Some(record) = self.job.attempts.last_mut() {
            record.state = JobState::Preempted as i32;
            record.preemption = Some(preemption);
        }
        Ok(())
    }

    /// The last attempt was preempted (its record says so).
    pub(super) fn last_preemption(&self) -> Option<&Preemption> {
        self.job.attempts.last().filter(|a| a.state == JobState::Preempted as i32).and_then(|a| a.preemption.as_ref())
    }

    /// Its gang is being stopped for a preemption (or its checkpoint looked up before it is queued again).
    pub(super) fn preempting(&self) -> bool {
        self.phase() == JobPhase::Restarting && self.last_preemption().is_some()
    }

    /// How a stop of this attempt asks it to save first: a preempted job's `preempt:` signal and grace.
    pub(super) fn save_first(&self) -> Option<(String, std::time::Duration)> {
        let policy = self.spec.preempt.as_ref().filter(|_| self.preempting())?;
        Some((policy.signal.clone(), policy.grace))
    }

    /// Attempts that count against `restart.max_restarts`: all but the preempted ones.
    pub(super) fn attempts_counted(&self) -> usize {
        self.job.attempts.iter().filter(|a| a.state != JobState::Preempted as i32).count()
    }

    /// No new attempt before `unix_ms` (earlier holds still count).
    pub(super) fn hold_until(&mut self, unix_ms: i64) {
        self.job.not_before_unix_ms = self.job.not_before_unix_ms.max(unix_ms);
    }

    /// `node` was lost at `lost_unix_ms` under this job: no next attempt before
    /// its ranks are surely fenced, at `until_unix_ms`.
    pub(super) fn hold_for_fence(&mut self, node: &str, lost_unix_ms: i64, until_unix_ms: i64) {
        self.fence_holds.retain(|h| h.node != node);
        self.fence_holds.push(FenceHold { node: node.to_owned(), lost_unix_ms, until_unix_ms });
        self.hold_until(until_unix_ms);
    }

    /// `node` is back and runs none of this job's processes: its fence no
    /// longer holds the next attempt, which waits only for the backoff and
    /// the other lost nodes. True when a hold was released.
    pub(super) fn release_fence(&mut self, node: &str) -> bool {
        let before = self.fence_holds.len();
        self.fence_holds.retain(|h| h.node != node);
        if self.fence_holds.len() == before {
            return false;
        }
        let others = self.fence_holds.iter().map(|h| h.until_unix_ms).max().unwrap_or(0);
        self.job.not_before_unix_ms = self.backoff_until_unix_ms.max(others);
        true
    }

    fn process_mut(&mut self, node: &str, index: u32) -> Option<&mut ProcessStatus> {
        self.job.processes.iter_mut().find(|p| p.node_name == node && p.index == index)
    }

    fn recount(&mut self) {
        self.job.live_processes = self.job.processes.iter().filter(|p| is_live(p)).count() as u32;
    }
}

/// Launching or running: the process may still hold its GPUs.
pub(super) fn is_live(p: &ProcessStatus) -> bool {
    matches!(ProcessPhase::try_from(p.phase), Ok(ProcessPhase::Launching) | Ok(ProcessPhase::Running))
}

/// The one place a job's wire state is written.
fn set_phase(job: &mut Job, phase: JobPhase) {
    job.state = phase.to_proto() as i32;
}

/// Sets the current attempt's record from the job's terminal state.
fn close_attempt(job: &mut Job) {
    let (state, reason, finished) = (job.state, job.reason.clone(), job.finished_unix_ms);
    let failure = job.failure.clone();
    if let Some(record) = job.attempts.last_mut() {
        record.state = state;
        record.reason = reason;
        record.finished_unix_ms = finished;
        record.failure = failure;
    }
}

impl From<TransitionError> for crate::error::ControllerError {
    fn from(e: TransitionError) -> Self {
        crate::error::ControllerError::FailedPrecondition(e.to_string())
    }
}

#[cfg(test)]
mod tests;
