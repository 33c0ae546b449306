//! The controller's state: jobs, nodes and agent sessions, owned by one
//! `Controller` behind one lock. gRPC handlers call its methods; the reconcile
//! loop (`reconcile`) converges the cluster on what the jobs want: it marks
//! silent nodes lost, places pending jobs, and keeps telling agents to stop
//! what no job wants any more (level-triggered, so a lost command is re-sent).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::{
    ControllerMessage, Failure, GangPlan, Job, JobEvent, JobFile, JobRecord, JobState, LaunchCommand, Node, NodeInfo,
    NodeRecord, NodeState, ProcessExited, ProcessPhase, ProcessStatus, RunningLaunch, StopCommand,
    controller_message::Command, now_unix_ms,
};
use cohort_shared::spec::{JobSpec, Workload};
use prost::Message;
use tokio::sync::{Mutex, Notify, broadcast, mpsc};
use tokio::time::Instant;
use tonic::Status;

use crate::error::ControllerError;
use crate::logs::LogHub;
use crate::planner::{self, NodeView, RenderInput};
use crate::store::{Expect, Store};

pub type SessionSender = mpsc::UnboundedSender<Result<ControllerMessage, Status>>;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose heartbeats stop for this long is lost.
    pub node_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// MASTER_PORT range; keep it outside the kernel's ephemeral range.
    pub master_ports: RangeInclusive<u16>,
    /// How often an unanswered stop is sent again.
    pub stop_resend: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            node_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            master_ports: 29500..=29999,
            stop_resend: Duration::from_secs(2),
        }
    }
}

pub struct Controller {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    pub config: ControllerConfig,
    wake: Notify,
    events: broadcast::Sender<JobEvent>,
    pub logs: LogHub,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<String, JobEntry>,
    nodes: BTreeMap<String, NodeEntry>,
    next_seq: u64,
    next_command_id: u64,
    next_port: u16,
    /// When a stop for (node, job, attempt) was last sent.
    stops_sent: HashMap<(String, String, u32), Instant>,
}

struct JobEntry {
    job: Job,
    spec: JobSpec,
    seq: u64,
    revision: Option<u64>,
}

struct NodeEntry {
    info: NodeInfo,
    registered_unix_ms: i64,
    revision: Option<u64>,
    session: Option<(String, SessionSender)>,
    /// The session id handed out by the last Register.
    registered_session: Option<String>,
    last_seen: Instant,
    last_seen_unix_ms: i64,
    state: NodeState,
    /// Launches the agent last said it runs.
    reported: Vec<RunningLaunch>,
}

impl JobEntry {
    fn state(&self) -> JobState {
        JobState::try_from(self.job.state).unwrap_or(JobState::Unspecified)
    }
    fn is_active(&self) -> bool {
        matches!(self.state(), JobState::Starting | JobState::Running)
    }
    fn is_terminal(&self) -> bool {
        matches!(self.state(), JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
    /// Holds GPUs and its port: running, or finished with processes still alive.
    fn holds_resources(&self) -> bool {
        self.is_active() || (self.is_terminal() && self.job.live_processes > 0)
    }
    fn plan(&self) -> Option<&GangPlan> {
        self.job.plan.as_ref()
    }
    fn on_node(&self, node: &str) -> bool {
        self.plan().is_some_and(|p| p.nodes.iter().any(|a| a.node_name == node))
    }
}

fn is_live(p: &ProcessStatus) -> bool {
    matches!(ProcessPhase::try_from(p.phase), Ok(ProcessPhase::Launching) | Ok(ProcessPhase::Running))
}

fn recount(job: &mut Job) {
    job.live_processes = job.processes.iter().filter(|p| is_live(p)).count() as u32;
}

pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "Unknown",
        JobState::Pending => "Pending",
        JobState::Starting => "Starting",
        JobState::Running => "Running",
        JobState::Succeeded => "Succeeded",
        JobState::Failed => "Failed",
        JobState::Cancelled => "Cancelled",
    }
}

/// "code 3" or "signal 9 (SIGKILL)".
pub fn describe_exit(exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (exit_code, signal) {
        (_, Some(sig)) => match nix_signal_name(sig) {
            Some(name) => format!("signal {sig} ({name})"),
            None => format!("signal {sig}"),
        },
        (Some(code), None) => format!("code {code}"),
        (None, None) => "an unknown status".to_string(),
    }
}

fn nix_signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => return None,
    })
}

impl Controller {
    /// Loads jobs and nodes from the store. Stored nodes start `Disconnected`
    /// and get one TTL to reconnect before their jobs are failed.
    pub async fn load(store: Arc<dyn Store>, data_dir: &Path, config: ControllerConfig) -> anyhow::Result<Arc<Self>> {
        let mut state = State { next_port: *config.master_ports.start(), next_seq: 1, ..State::default() };
        for (key, v) in store.list("jobs/").await? {
            let record = JobRecord::decode(v.value.as_slice())
                .map_err(|e| anyhow::anyhow!("store key {key}: undecodable job record: {e}"))?;
            let Some(job) = record.job else { continue };
            let file = job.file.clone().unwrap_or_default();
            let spec = match JobSpec::from_yaml(&file.yaml, &file.source_name) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "stored job no longer parses; skipping it");
                    continue;
                }
            };
            state.next_seq = state.next_seq.max(record.seq + 1);
            state.jobs.insert(job.id.clone(), JobEntry { job, spec, seq: record.seq, revision: Some(v.revision) });
        }
        let now = Instant::now();
        for (key, v) in store.list("nodes/").await? {
            let record = NodeRecord::decode(v.value.as_slice())
                .map_err(|e| anyhow::anyhow!("store key {key}: undecodable node record: {e}"))?;
            let Some(info) = record.info else { continue };
            state.nodes.insert(
                info.name.clone(),
                NodeEntry {
                    info,
                    registered_unix_ms: record.registered_unix_ms,
                    revision: Some(v.revision),
                    session: None,
                    registered_session: None,
                    last_seen: now,
                    last_seen_unix_ms: 0,
                    state: NodeState::Disconnected,
                    reported: Vec::new(),
                },
            );
        }
        tracing::info!(jobs = state.jobs.len(), nodes = state.nodes.len(), "loaded state from the store");
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            store,
            config,
            wake: Notify::new(),
            events: broadcast::channel(4096).0,
            logs: LogHub::new(data_dir.join("logs"))?,
        }))
    }

    // ---------------------------------------------------------------- jobs API

    /// Parses and validates a job file; resolves a relative `workdir`.
    fn parse(file: &JobFile) -> Result<JobSpec, ControllerError> {
        if file.yaml.len() > 1 << 20 {
            return Err(ControllerError::InvalidRequest(format!(
                "job file {} is {} bytes; the limit is 1 MiB",
                file.source_name,
                file.yaml.len()
            )));
        }
        let source = if file.source_name.is_empty() { "<job>" } else { file.source_name.as_str() };
        let mut spec = JobSpec::from_yaml(&file.yaml, source)?;
        if let Some(dir) = spec.workdir.as_deref()
            && !dir.starts_with('/')
        {
            if file.base_dir.is_empty() {
                return Err(ControllerError::InvalidRequest(format!(
                    "job file {source}: workdir {dir:?} is relative but no base directory was sent; use an absolute path"
                )));
            }
            spec.workdir = Some(normalize(&Path::new(&file.base_dir).join(dir)));
        }
        Ok(spec)
    }

    pub async fn submit(&self, file: JobFile) -> Result<(Job, Vec<String>), ControllerError> {
        let spec = Self::parse(&file)?;
        let warnings: Vec<String> = spec.warnings().iter().map(|w| format!("{}: {}", w.field, w.message)).collect();
        let mut state = self.state.lock().await;
        let seq = state.next_seq;
        state.next_seq += 1;
        let id = format!("{}-{}", spec.name, seq);
        let job = Job {
            id: id.clone(),
            name: spec.name.clone(),
            kind: match spec.workload {
                Workload::Command(_) => "command".into(),
                Workload::MegatronSft(_) => "megatron-sft".into(),
            },
            state: JobState::Pending as i32,
            reason: "waiting to be placed".into(),
            nodes: spec.nodes,
            gpus_per_node: spec.gpus_per_node,
            priority: spec.priority,
            submitted_unix_ms: now_unix_ms(),
            file: Some(file),
            ..Job::default()
        };
        state.jobs.insert(id.clone(), JobEntry { job, spec, seq, revision: None });
        self.persist_job(&mut state, &id).await?;
        self.publish(&state, &id, "submitted");
        tracing::info!(job = %id, "job submitted");
        drop(state);
        self.wake.notify_one();
        let job = self.get(&id).await?;
        Ok((job, warnings))
    }

    pub async fn plan(&self, file: JobFile) -> cohort_proto::PlanJobResponse {
        use cohort_proto::{PlanJobResponse, SpecProblem};
        let spec = match Self::parse(&file) {
            Ok(spec) => spec,
            Err(ControllerError::InvalidSpec(errors)) => {
                return PlanJobResponse {
                    problems: errors
                        .issues
                        .iter()
                        .map(|i| SpecProblem {
                            field: i.field.clone(),
                            line: i.line.unwrap_or(0) as u32,
                            message: i.message.clone(),
                        })
                        .collect(),
                    ..PlanJobResponse::default()
                };
            }
            Err(other) => {
                return PlanJobResponse {
                    problems: vec![SpecProblem { field: String::new(), line: 0, message: other.to_string() }],
                    ..PlanJobResponse::default()
                };
            }
        };
        let mut response = PlanJobResponse {
            warnings: spec.warnings().iter().map(|w| format!("{}: {}", w.field, w.message)).collect(),
            memory_estimate_gib: spec.memory_estimate_gib(),
            ..PlanJobResponse::default()
        };
        if let Workload::MegatronSft(m) = &spec.workload {
            response.parallel_layout = m.layout(spec.nodes, spec.gpus_per_node).to_string();
        }
        let state = self.state.lock().await;
        let views = Self::node_views(&state);
        match planner::place(&spec, &views) {
            Ok(placement) => {
                let port = Self::peek_port(&state, &self.config);
                let workdir = spec.workdir.clone();
                response.plan = Some(planner::render(
                    &spec,
                    &placement,
                    &views,
                    &RenderInput {
                        job_id: &format!("{}-<id>", spec.name),
                        attempt: 1,
                        master_port: port,
                        workdir: workdir.as_deref(),
                    },
                ));
            }
            Err(e) => response.placement_error = e.to_string(),
        }
        response
    }

    fn resolve<'a>(state: &'a State, job_ref: &str) -> Result<&'a JobEntry, ControllerError> {
        if let Some(entry) = state.jobs.get(job_ref) {
            return Ok(entry);
        }
        // A bare name means the newest job of that name.
        state
            .jobs
            .values()
            .filter(|e| e.job.name == job_ref)
            .max_by_key(|e| e.seq)
            .ok_or_else(|| ControllerError::JobNotFound(job_ref.to_string()))
    }

    pub async fn get(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let state = self.state.lock().await;
        Ok(Self::resolve(&state, job_ref)?.job.clone())
    }

    pub async fn list(&self, active_only: bool) -> Vec<Job> {
        let state = self.state.lock().await;
        let mut jobs: Vec<&JobEntry> =
            state.jobs.values().filter(|e| !active_only || !e.is_terminal() || e.job.live_processes > 0).collect();
        jobs.sort_by_key(|e| e.seq);
        jobs.into_iter().map(|e| e.job.clone()).collect()
    }

    /// The job now and a receiver of its later events.
    pub async fn watch(&self, job_ref: &str) -> Result<(Job, broadcast::Receiver<JobEvent>), ControllerError> {
        let state = self.state.lock().await;
        let job = Self::resolve(&state, job_ref)?.job.clone();
        Ok((job, self.events.subscribe()))
    }

    pub async fn cancel(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let mut state = self.state.lock().await;
        let id = Self::resolve(&state, job_ref)?.job.id.clone();
        let Some(entry) = state.jobs.get_mut(&id) else { return Err(ControllerError::JobNotFound(id)) };
        match entry.state() {
            JobState::Pending => {
                entry.job.state = JobState::Cancelled as i32;
                entry.job.reason = "cancelled before it was placed".into();
                entry.job.finished_unix_ms = now_unix_ms();
            }
            JobState::Starting | JobState::Running => {
                entry.job.state = JobState::Cancelled as i32;
                entry.job.reason = "cancelled by the user; stopping every process".into();
                entry.job.finished_unix_ms = now_unix_ms();
                self.teardown(&mut state, &id, "cancelled");
            }
            _ => return Ok(entry.job.clone()),
        }
        self.persist_job(&mut state, &id).await?;
        self.publish(&state, &id, "cancelled");
        tracing::info!(job = %id, "job cancelled");
        drop(state);
        self.wake.notify_one();
        self.get(&id).await
    }

    pub async fn nodes(&self) -> Vec<Node> {
        let state = self.state.lock().await;
        let mut allocated: HashMap<&str, (Vec<u32>, Vec<String>)> = HashMap::new();
        for entry in state.jobs.values().filter(|e| e.holds_resources()) {
            for a in entry.plan().map(|p| p.nodes.as_slice()).unwrap_or_default() {
                let slot = allocated.entry(a.node_name.as_str()).or_default();
                slot.0.extend(&a.gpu_indices);
                slot.1.push(entry.job.id.clone());
            }
        }
        state
            .nodes
            .values()
            .map(|n| {
                let (mut gpus, jobs) = allocated.remove(n.info.name.as_str()).unwrap_or_default();
                gpus.sort_unstable();
                Node {
                    info: Some(n.info.clone()),
                    state: n.state as i32,
                    last_heartbeat_unix_ms: n.last_seen_unix_ms,
                    allocated_gpus: gpus,
                    jobs,
                    registered_unix_ms: n.registered_unix_ms,
                }
            })
            .collect()
    }

    // --------------------------------------------------------------- agent API

    pub async fn register(
        &self,
        req: cohort_proto::RegisterRequest,
    ) -> Result<cohort_proto::RegisterResponse, ControllerError> {
        let info =
            req.node.ok_or_else(|| ControllerError::InvalidRequest("RegisterRequest.node is required".into()))?;
        validate_node(&info)?;
        let session_id = format!("{:016x}", rand::random::<u64>());
        let mut state = self.state.lock().await;
        let name = info.name.clone();
        let now = Instant::now();
        let changed = match state.nodes.get_mut(&name) {
            Some(node) => {
                let changed = node.info != info;
                node.info = info;
                node.registered_session = Some(session_id.clone());
                node.last_seen = now;
                node.last_seen_unix_ms = now_unix_ms();
                node.state = NodeState::Ready;
                node.reported = req.running.clone();
                changed
            }
            None => {
                state.nodes.insert(
                    name.clone(),
                    NodeEntry {
                        info,
                        registered_unix_ms: now_unix_ms(),
                        revision: None,
                        session: None,
                        registered_session: Some(session_id.clone()),
                        last_seen: now,
                        last_seen_unix_ms: now_unix_ms(),
                        state: NodeState::Ready,
                        reported: req.running.clone(),
                    },
                );
                true
            }
        };
        if changed {
            self.persist_node(&mut state, &name).await?;
        }
        self.adopt(&mut state, &name, &req.running).await?;
        tracing::info!(node = %name, running = req.running.len(), "node registered");
        drop(state);
        self.wake.notify_one();
        Ok(cohort_proto::RegisterResponse {
            session_id,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u32,
        })
    }

    /// Reconciles what a (re)registering agent runs with what the jobs expect:
    /// exits it saw while disconnected are applied; processes it no longer has
    /// fail their job; the rest is adopted.
    async fn adopt(&self, state: &mut State, node: &str, running: &[RunningLaunch]) -> Result<(), ControllerError> {
        let ids: Vec<String> =
            state.jobs.values().filter(|e| e.is_active() && e.on_node(node)).map(|e| e.job.id.clone()).collect();
        for id in ids {
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            let attempt = entry.job.attempt;
            let report = running.iter().find(|l| l.job_id == id && l.attempt == attempt);
            let mut exits = Vec::new();
            let mut vanished = false;
            for p in entry.job.processes.iter_mut().filter(|p| p.node_name == node && is_live(p)) {
                match report.and_then(|r| r.processes.iter().find(|rp| rp.index == p.index)) {
                    Some(rp) => match &rp.exited {
                        Some(exited) => exits.push((p.index, *exited)),
                        None => {
                            p.phase = ProcessPhase::Running as i32;
                            p.pid = rp.pid;
                            p.started_unix_ms = rp.started_unix_ms;
                        }
                    },
                    // Launch sent but never started there, or the agent lost it.
                    None if p.phase == ProcessPhase::Launching as i32 && report.is_none() => vanished = true,
                    None => vanished = true,
                }
            }
            for (index, exited) in exits {
                self.apply_exit(state, &id, node, index, exited);
            }
            if vanished {
                let entry = state.jobs.get_mut(&id);
                if let Some(entry) = entry.filter(|e| e.is_active()) {
                    let node_rank = entry
                        .plan()
                        .and_then(|p| p.nodes.iter().find(|a| a.node_name == node))
                        .map(|a| a.node_rank)
                        .unwrap_or(0);
                    for p in entry.job.processes.iter_mut().filter(|p| p.node_name == node && is_live(p)) {
                        p.phase = ProcessPhase::Lost as i32;
                    }
                    let message = format!("node {node} came back without the job's processes");
                    self.fail(state, &id, Failure { node_name: node.into(), node_rank, message, ..Failure::default() });
                }
            }
            self.persist_job(state, &id).await?;
        }
        Ok(())
    }

    /// Binds a stream to the node that registered with `session_id`.
    pub async fn attach(&self, node: &str, session_id: &str, tx: SessionSender) -> Result<(), ControllerError> {
        let mut state = self.state.lock().await;
        let entry =
            state.nodes.get_mut(node).filter(|n| n.registered_session.as_deref() == Some(session_id)).ok_or_else(
                || {
                    ControllerError::FailedPrecondition(format!(
                        "node {node:?} has no registration with session {session_id:?}: call Register first"
                    ))
                },
            )?;
        entry.session = Some((session_id.to_string(), tx));
        entry.last_seen = Instant::now();
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    pub async fn detach(&self, node: &str, session_id: &str) {
        let mut state = self.state.lock().await;
        if let Some(entry) = state.nodes.get_mut(node)
            && entry.session.as_ref().is_some_and(|(id, _)| id == session_id)
        {
            entry.session = None;
            tracing::warn!(node, "agent stream closed; the node is lost unless it reconnects within the TTL");
        }
    }

    /// Drops every agent session (on shutdown); agents reconnect elsewhere or later.
    pub async fn close_sessions(&self) {
        let mut state = self.state.lock().await;
        for node in state.nodes.values_mut() {
            node.session = None;
        }
    }

    pub async fn heartbeat(&self, node: &str, hb: cohort_proto::Heartbeat) {
        let mut state = self.state.lock().await;
        if let Some(entry) = state.nodes.get_mut(node) {
            entry.last_seen = Instant::now();
            entry.last_seen_unix_ms = now_unix_ms();
            if entry.state != NodeState::Ready {
                tracing::info!(node, "node is Ready again");
            }
            entry.state = NodeState::Ready;
            entry.reported = hb.running;
        }
    }

    pub async fn process_event(&self, node: &str, event: cohort_proto::ProcessEvent) {
        use cohort_proto::process_event::Event;
        let mut state = self.state.lock().await;
        let id = event.job_id.clone();
        let Some(entry) = state.jobs.get_mut(&id) else { return };
        if entry.job.attempt != event.attempt {
            return;
        }
        let message = match event.event {
            Some(Event::Started(started)) => {
                if let Some(p) = entry.job.processes.iter_mut().find(|p| p.node_name == node && p.index == event.index)
                {
                    p.phase = ProcessPhase::Running as i32;
                    p.pid = started.pid;
                    p.started_unix_ms = started.started_unix_ms;
                }
                if entry.state() == JobState::Starting
                    && entry.job.processes.iter().all(|p| p.phase == ProcessPhase::Running as i32)
                {
                    entry.job.state = JobState::Running as i32;
                    entry.job.reason = "every process of the gang has started".into();
                    entry.job.running_unix_ms = now_unix_ms();
                    tracing::info!(job = %id, "job running");
                }
                format!("process {} on node {node} started (pid {})", event.index, started.pid)
            }
            Some(Event::Exited(exited)) => {
                self.apply_exit(&mut state, &id, node, event.index, exited);
                format!(
                    "process {} on node {node} exited with {}",
                    event.index,
                    describe_exit(exited.exit_code, exited.signal)
                )
            }
            Some(Event::SpawnFailed(error)) => {
                let node_rank = entry
                    .plan()
                    .and_then(|p| p.nodes.iter().find(|a| a.node_name == node))
                    .map(|a| a.node_rank)
                    .unwrap_or(0);
                if let Some(p) = entry.job.processes.iter_mut().find(|p| p.node_name == node && p.index == event.index)
                {
                    p.phase = ProcessPhase::SpawnFailed as i32;
                }
                recount(&mut entry.job);
                let message = format!("could not start process {} on node {node}: {error}", event.index);
                if entry.is_active() {
                    self.fail(
                        &mut state,
                        &id,
                        Failure {
                            node_name: node.into(),
                            node_rank,
                            process_index: event.index,
                            message: message.clone(),
                            ..Failure::default()
                        },
                    );
                }
                message
            }
            None => return,
        };
        if let Err(e) = self.persist_job(&mut state, &id).await {
            tracing::error!(job = %id, error = %e, "could not persist job");
        }
        self.publish(&state, &id, &message);
        drop(state);
        self.wake.notify_one();
    }

    pub async fn command_ack(&self, node: &str, ack: cohort_proto::CommandAck) {
        if !ack.ok {
            tracing::warn!(node, command = ack.command_id, error = %ack.error, "agent refused a command");
        }
    }

    /// The rank of `node` in a job's plan, for log lines.
    pub async fn node_rank(&self, job_id: &str, node: &str) -> u32 {
        let state = self.state.lock().await;
        state
            .jobs
            .get(job_id)
            .and_then(|e| e.plan())
            .and_then(|p| p.nodes.iter().find(|a| a.node_name == node))
            .map(|a| a.node_rank)
            .unwrap_or(0)
    }

    // ------------------------------------------------------------ transitions

    fn apply_exit(&self, state: &mut State, id: &str, node: &str, index: u32, exited: ProcessExited) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        let node_rank =
            entry.plan().and_then(|p| p.nodes.iter().find(|a| a.node_name == node)).map(|a| a.node_rank).unwrap_or(0);
        let Some(p) = entry.job.processes.iter_mut().find(|p| p.node_name == node && p.index == index) else { return };
        p.phase = ProcessPhase::Exited as i32;
        p.exit_code = exited.exit_code;
        p.signal = exited.signal;
        p.stopped_by_agent = exited.stopped_by_agent;
        p.ended_unix_ms = exited.ended_unix_ms;
        let global_rank = p.global_rank;
        recount(&mut entry.job);
        if !entry.is_active() {
            return;
        }
        let clean = exited.exit_code == Some(0) && exited.signal.is_none();
        if !clean {
            let who = match global_rank {
                Some(rank) => format!("rank {rank} (process {index})"),
                None => format!("process {index}"),
            };
            let how = if exited.stopped_by_agent {
                "was stopped by its agent".to_string()
            } else {
                format!("exited with {}", describe_exit(exited.exit_code, exited.signal))
            };
            let message = format!("node {node} (node rank {node_rank}): {who} {how}");
            self.fail(
                state,
                id,
                Failure {
                    node_name: node.into(),
                    node_rank,
                    process_index: index,
                    exit_code: exited.exit_code,
                    signal: exited.signal,
                    message,
                },
            );
        } else if entry.job.processes.iter().all(|p| p.phase == ProcessPhase::Exited as i32 && p.exit_code == Some(0)) {
            entry.job.state = JobState::Succeeded as i32;
            entry.job.reason = "every process exited with code 0".into();
            entry.job.finished_unix_ms = now_unix_ms();
            tracing::info!(job = %id, "job succeeded");
        }
    }

    /// Fails an active job and tears its gang down everywhere.
    fn fail(&self, state: &mut State, id: &str, failure: Failure) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        if !entry.is_active() {
            return;
        }
        tracing::warn!(job = %id, cause = %failure.message, "job failed; stopping the gang");
        entry.job.state = JobState::Failed as i32;
        entry.job.reason = failure.message.clone();
        entry.job.failure = Some(failure);
        entry.job.finished_unix_ms = now_unix_ms();
        self.teardown(state, id, "gang failure");
    }

    /// Sends a stop to every connected node of the job that still has live processes.
    fn teardown(&self, state: &mut State, id: &str, reason: &str) {
        let Some(entry) = state.jobs.get(id) else { return };
        let attempt = entry.job.attempt;
        let grace = entry.spec.stop_grace;
        let nodes: HashSet<String> =
            entry.job.processes.iter().filter(|p| is_live(p)).map(|p| p.node_name.clone()).collect();
        for node in nodes {
            Self::send_stop(state, &node, id, attempt, grace, reason);
        }
    }

    fn send_stop(state: &mut State, node: &str, job_id: &str, attempt: u32, grace: Duration, reason: &str) {
        let command_id = state.next_command_id;
        state.next_command_id += 1;
        let Some((_, tx)) = state.nodes.get(node).and_then(|n| n.session.as_ref()) else { return };
        let msg = ControllerMessage {
            command_id,
            command: Some(Command::Stop(StopCommand {
                job_id: job_id.into(),
                attempt,
                grace_ms: grace.as_millis() as u32,
                reason: reason.into(),
            })),
        };
        if tx.send(Ok(msg)).is_ok() {
            state.stops_sent.insert((node.into(), job_id.into(), attempt), Instant::now());
        }
    }

    // -------------------------------------------------------------- reconcile

    /// Runs the reconcile loop until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.reconcile().await {
                tracing::error!(error = %e, "reconcile failed; retrying on the next tick");
            }
        }
    }

    pub async fn reconcile(&self) -> Result<(), ControllerError> {
        let mut state = self.state.lock().await;
        self.expire_nodes(&mut state).await?;
        self.schedule(&mut state).await?;
        self.resend_stops(&mut state);
        Ok(())
    }

    async fn expire_nodes(&self, state: &mut State) -> Result<(), ControllerError> {
        let now = Instant::now();
        let ttl = self.config.node_ttl;
        let mut lost = Vec::new();
        for node in state.nodes.values_mut() {
            if node.state != NodeState::Lost && now.duration_since(node.last_seen) > ttl {
                tracing::warn!(node = %node.info.name, ttl = ?ttl, "no heartbeat within the TTL; node lost");
                node.state = NodeState::Lost;
                node.session = None;
                lost.push(node.info.name.clone());
            }
        }
        for node in lost {
            let ids: Vec<String> = state
                .jobs
                .values()
                .filter(|e| e.job.processes.iter().any(|p| p.node_name == node && is_live(p)))
                .map(|e| e.job.id.clone())
                .collect();
            for id in ids {
                let Some(entry) = state.jobs.get_mut(&id) else { continue };
                let node_rank = entry
                    .plan()
                    .and_then(|p| p.nodes.iter().find(|a| a.node_name == node))
                    .map(|a| a.node_rank)
                    .unwrap_or(0);
                for p in entry.job.processes.iter_mut().filter(|p| p.node_name == node && is_live(p)) {
                    p.phase = ProcessPhase::Lost as i32;
                }
                recount(&mut entry.job);
                let message = format!(
                    "node {node} (node rank {node_rank}) lost: no heartbeat for {}",
                    humantime::format_duration(ttl)
                );
                self.fail(
                    state,
                    &id,
                    Failure { node_name: node.clone(), node_rank, message: message.clone(), ..Failure::default() },
                );
                self.persist_job(state, &id).await?;
                self.publish(state, &id, &message);
            }
        }
        Ok(())
    }

    fn node_views(state: &State) -> Vec<NodeView> {
        let mut used: HashMap<&str, HashSet<u32>> = HashMap::new();
        for entry in state.jobs.values().filter(|e| e.holds_resources()) {
            for a in entry.plan().map(|p| p.nodes.as_slice()).unwrap_or_default() {
                used.entry(a.node_name.as_str()).or_default().extend(&a.gpu_indices);
            }
        }
        state
            .nodes
            .values()
            .map(|n| {
                let taken = used.get(n.info.name.as_str());
                let free_gpus: Vec<u32> =
                    n.info.gpus.iter().map(|g| g.index).filter(|i| taken.is_none_or(|t| !t.contains(i))).collect();
                let unavailable = match (n.state, &n.session) {
                    (NodeState::Ready, Some(_)) => None,
                    (NodeState::Lost, _) => Some("lost".to_string()),
                    _ => Some("not connected".to_string()),
                };
                NodeView {
                    name: n.info.name.clone(),
                    address: n.info.advertise_addr.clone(),
                    labels: n.info.labels.clone(),
                    free_gpus,
                    total_gpus: n.info.gpus.len() as u32,
                    unavailable,
                    node_env: n.info.node_env.clone(),
                }
            })
            .collect()
    }

    fn used_ports(state: &State) -> HashSet<u16> {
        state
            .jobs
            .values()
            .filter(|e| e.holds_resources())
            .filter_map(|e| e.plan().map(|p| p.master_port as u16))
            .collect()
    }

    /// The next free MASTER_PORT, round-robin through the range so that a port
    /// just released (maybe in TIME_WAIT) is reused last.
    fn peek_port(state: &State, config: &ControllerConfig) -> u16 {
        let used = Self::used_ports(state);
        let (lo, hi) = (*config.master_ports.start(), *config.master_ports.end());
        let span = (hi - lo) as u32 + 1;
        let start = state.next_port.clamp(lo, hi);
        (0..span).map(|i| lo + (((start - lo) as u32 + i) % span) as u16).find(|p| !used.contains(p)).unwrap_or(start)
    }

    /// Places pending jobs in priority order, then submission order. A job
    /// that does not fit blocks the ones behind it (no backfill), so big jobs
    /// are not starved by small ones.
    async fn schedule(&self, state: &mut State) -> Result<(), ControllerError> {
        let mut pending: Vec<(i32, u64, String)> = state
            .jobs
            .values()
            .filter(|e| e.state() == JobState::Pending)
            .map(|e| (-e.job.priority, e.seq, e.job.id.clone()))
            .collect();
        pending.sort();
        for (_, _, id) in pending {
            let views = Self::node_views(state);
            let Some(entry) = state.jobs.get(&id) else { continue };
            let placement = match planner::place(&entry.spec, &views) {
                Ok(p) => p,
                Err(e) => {
                    let reason = if e.never_fits {
                        format!("cannot fit this cluster even when idle: {e}")
                    } else {
                        format!("waiting for free GPUs: {e}")
                    };
                    if let Some(entry) = state.jobs.get_mut(&id)
                        && entry.job.reason != reason
                    {
                        entry.job.reason = reason;
                        self.publish(state, &id, "pending");
                    }
                    break;
                }
            };
            if Self::used_ports(state).len()
                > (self.config.master_ports.end() - self.config.master_ports.start()) as usize
            {
                tracing::warn!(job = %id, "every MASTER_PORT of the range is leased; waiting");
                break;
            }
            let port = Self::peek_port(state, &self.config);
            state.next_port = port.saturating_add(1);
            self.launch(state, &id, &placement, &views, port).await?;
        }
        Ok(())
    }

    async fn launch(
        &self,
        state: &mut State,
        id: &str,
        placement: &planner::Placement,
        views: &[NodeView],
        port: u16,
    ) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let attempt = entry.job.attempt + 1;
        let plan = planner::render(
            &entry.spec,
            placement,
            views,
            &RenderInput { job_id: id, attempt, master_port: port, workdir: entry.spec.workdir.as_deref() },
        );
        entry.job.attempt = attempt;
        entry.job.state = JobState::Starting as i32;
        entry.job.reason =
            format!("launching on {}", placement.nodes.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "));
        entry.job.started_unix_ms = now_unix_ms();
        entry.job.processes = plan
            .nodes
            .iter()
            .flat_map(|a| {
                a.processes.iter().map(|p| ProcessStatus {
                    node_name: a.node_name.clone(),
                    node_rank: a.node_rank,
                    index: p.index,
                    global_rank: p.global_rank,
                    phase: ProcessPhase::Launching as i32,
                    ..ProcessStatus::default()
                })
            })
            .collect();
        recount(&mut entry.job);
        entry.job.plan = Some(plan.clone());
        let grace = entry.spec.stop_grace;
        // Persist before sending: a controller that dies here restarts knowing
        // the attempt exists, and reconciles what the agents report.
        self.persist_job(state, id).await?;
        tracing::info!(job = %id, attempt, port, "launching");
        let mut unreachable = None;
        for a in &plan.nodes {
            let command_id = state.next_command_id;
            state.next_command_id += 1;
            let msg = ControllerMessage {
                command_id,
                command: Some(Command::Launch(LaunchCommand {
                    job_id: id.into(),
                    attempt,
                    node_rank: a.node_rank,
                    workdir: a.workdir.clone(),
                    stop_grace_ms: grace.as_millis() as u32,
                    processes: a.processes.clone(),
                })),
            };
            let sent = state
                .nodes
                .get(&a.node_name)
                .and_then(|n| n.session.as_ref())
                .is_some_and(|(_, tx)| tx.send(Ok(msg)).is_ok());
            if !sent {
                unreachable = Some((a.node_name.clone(), a.node_rank));
                break;
            }
        }
        if let Some((node, node_rank)) = unreachable {
            if let Some(entry) = state.jobs.get_mut(id) {
                for p in entry.job.processes.iter_mut().filter(|p| p.node_name == node) {
                    p.phase = ProcessPhase::Lost as i32;
                }
                recount(&mut entry.job);
            }
            let message = format!("node {node} dropped its stream while the job was launched");
            self.fail(state, id, Failure { node_name: node, node_rank, message, ..Failure::default() });
            self.persist_job(state, id).await?;
        }
        self.publish(state, id, "launching");
        Ok(())
    }

    /// Level-triggered teardown: every live process of a finished job, and
    /// every launch an agent reports that no job wants, gets a stop, again
    /// every `stop_resend` until it is gone.
    fn resend_stops(&self, state: &mut State) {
        let now = Instant::now();
        let resend = self.config.stop_resend;
        let mut wanted_stops: Vec<(String, String, u32, Duration)> = Vec::new();
        for entry in state.jobs.values().filter(|e| e.is_terminal() && e.job.live_processes > 0) {
            let nodes: HashSet<&str> =
                entry.job.processes.iter().filter(|p| is_live(p)).map(|p| p.node_name.as_str()).collect();
            for node in nodes {
                wanted_stops.push((node.into(), entry.job.id.clone(), entry.job.attempt, entry.spec.stop_grace));
            }
        }
        for node in state.nodes.values().filter(|n| n.session.is_some()) {
            for launch in &node.reported {
                let wanted = state
                    .jobs
                    .get(&launch.job_id)
                    .is_some_and(|e| e.is_active() && e.job.attempt == launch.attempt && e.on_node(&node.info.name));
                if !wanted && launch.processes.iter().any(|p| p.exited.is_none()) {
                    let grace =
                        state.jobs.get(&launch.job_id).map(|e| e.spec.stop_grace).unwrap_or(Duration::from_secs(10));
                    wanted_stops.push((node.info.name.clone(), launch.job_id.clone(), launch.attempt, grace));
                }
            }
        }
        for (node, job, attempt, grace) in wanted_stops {
            let key = (node.clone(), job.clone(), attempt);
            if state.stops_sent.get(&key).is_some_and(|t| now.duration_since(*t) < resend) {
                continue;
            }
            tracing::debug!(node = %node, job = %job, attempt, "sending stop");
            Self::send_stop(state, &node, &job, attempt, grace, "not wanted by the controller");
        }
        state.stops_sent.retain(|_, t| now.duration_since(*t) < resend * 10);
    }

    // ------------------------------------------------------------ persistence

    async fn persist_job(&self, state: &mut State, id: &str) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let record = JobRecord { job: Some(entry.job.clone()), seq: entry.seq };
        let expect = entry.revision.map(Expect::Revision).unwrap_or(Expect::Absent);
        let revision = self.store.put(&format!("jobs/{id}"), record.encode_to_vec(), expect).await?;
        entry.revision = Some(revision);
        Ok(())
    }

    async fn persist_node(&self, state: &mut State, name: &str) -> Result<(), ControllerError> {
        let Some(node) = state.nodes.get_mut(name) else { return Ok(()) };
        let record = NodeRecord { info: Some(node.info.clone()), registered_unix_ms: node.registered_unix_ms };
        let expect = node.revision.map(Expect::Revision).unwrap_or(Expect::Absent);
        let revision = self.store.put(&format!("nodes/{name}"), record.encode_to_vec(), expect).await?;
        node.revision = Some(revision);
        Ok(())
    }

    fn publish(&self, state: &State, id: &str, message: &str) {
        if let Some(entry) = state.jobs.get(id) {
            let _ = self.events.send(JobEvent {
                unix_ms: now_unix_ms(),
                job: Some(entry.job.clone()),
                message: message.into(),
            });
        }
    }
}

/// `a/b/../c` -> `a/c` without touching the file system (the path is on the nodes).
fn normalize(path: &Path) -> String {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

fn validate_node(info: &NodeInfo) -> Result<(), ControllerError> {
    let name_ok = !info.name.is_empty()
        && info.name.len() <= 63
        && info.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !name_ok {
        return Err(ControllerError::InvalidRequest(format!(
            "node name {:?} must be 1-63 characters of letters, digits, '-', '.', '_'",
            info.name
        )));
    }
    if info.advertise_addr.parse::<std::net::IpAddr>().is_err() {
        return Err(ControllerError::InvalidRequest(format!(
            "node {}: advertise address {:?} is not an IP address",
            info.name, info.advertise_addr
        )));
    }
    let mut seen = HashSet::new();
    for gpu in &info.gpus {
        if !seen.insert(gpu.index) {
            return Err(ControllerError::InvalidRequest(format!(
                "node {}: GPU index {} listed twice",
                info.name, gpu.index
            )));
        }
    }
    Ok(())
}
