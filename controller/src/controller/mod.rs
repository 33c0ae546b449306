//! The controller's state: jobs, nodes and agent sessions, owned by one task
//! (`state_task`): gRPC handlers, agent sessions and the reconcile loop send
//! it synchronous commands and await their answers, so nothing is awaited
//! while the state is held. A change enqueues its record to the one ordered
//! writer (`StoreWriter`) inside its command, and a handler that promises
//! durability awaits the write after the answer, off the state task. The
//! reconcile loop (`reconcile`) converges the cluster on what the jobs want:
//! it marks silent nodes lost, places pending jobs, and keeps telling agents
//! to stop what no job wants any more (level-triggered, so a lost command is
//! re-sent).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::{
    ControllerMessage, Failure, Job, JobEvent, JobFile, JobRecord, Node, NodeInfo, NodeRecord, ProcessExited,
    ProcessStatus, QueryResult, RunningLaunch, StopCommand, controller_message::Command, now_unix_ms,
};
use cohort_shared::spec::{JobSpec, Workload};
use prost::Message;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tonic::Status;

use crate::error::ControllerError;
use crate::logs::LogHub;
use crate::metrics::MetricsHub;
use crate::planner::{self, NodeView, RenderInput};
use crate::store::{Durable, Expect, Store, StoreWriter};

pub type SessionSender = mpsc::UnboundedSender<Result<ControllerMessage, Status>>;
pub type WeakSessionSender = mpsc::WeakUnboundedSender<Result<ControllerMessage, Status>>;

/// `--node-ttl`'s default: a lost node is called lost within 3 s of its last
/// heartbeat (2.5 s of silence plus at most a 250 ms sweep tick).
pub const DEFAULT_NODE_TTL: Duration = Duration::from_millis(2500);
/// `--heartbeat-interval`'s default: five heartbeats fit in the TTL.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node silent for this long, in time this controller observed itself
    /// running on schedule, is lost (see `NodeEntry::sweep`).
    pub node_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// MASTER_PORT range; keep it outside the kernel's ephemeral range.
    pub master_ports: RangeInclusive<u16>,
    /// How often an unanswered stop is sent again.
    pub stop_resend: Duration,
    /// Sizes and rates clients may not exceed.
    pub limits: crate::limits::ApiLimits,
    /// What submit admits (`--max-submit-priority`, `--max-job-nodes`).
    pub admission: admission::AdmissionLimits,
    /// Which users a token's jobs may run as (`--allow-run-as`).
    pub run_as: crate::security::run_as::RunAsRules,
    /// The queues jobs wait in (`--queues`); one open queue by default.
    pub queues: crate::queues::Queues,
    /// How pending jobs are ordered and placed (`--scheduler`).
    pub scheduler: crate::queues::Scheduler,
    /// Finished jobs are deleted this long after they ended (`--retain-finished`); None: kept.
    pub retain_finished: Option<Duration>,
    /// How many nodes read a staged input's source at once when no node
    /// holds it yet; the others fetch from them (`--max-source-pulls`).
    pub max_source_pulls: usize,
    /// The node label that names a node's rack for staging
    /// (`--topology-label`, see `content::localize`); empty: none.
    pub topology_label: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            node_ttl: DEFAULT_NODE_TTL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            master_ports: 29500..=29999,
            stop_resend: Duration::from_secs(2),
            limits: crate::limits::ApiLimits::default(),
            admission: admission::AdmissionLimits::default(),
            run_as: crate::security::run_as::RunAsRules::default(),
            queues: crate::queues::Queues::default(),
            scheduler: crate::queues::Scheduler::default(),
            retain_finished: None,
            max_source_pulls: 1,
            topology_label: String::new(),
        }
    }
}

/// What a submitted job's record carries from its admission checks.
#[derive(Clone)]
struct AdmissionOutcome {
    time_limit_ms: i64,
    queue: String,
    after: Vec<cohort_proto::JobDependency>,
}

pub struct Controller {
    /// The only way to the state: a command run by the task that owns it.
    state: StateTask,
    store: Arc<dyn Store>,
    /// Every job and node record goes to the store through here, in order.
    writer: StoreWriter,
    /// What the load found wrong in the store (records quarantined or
    /// skipped), for `/healthz`.
    pub load_warnings: Vec<String>,
    pub config: ControllerConfig,
    wake: Notify,
    events: broadcast::Sender<JobEvent>,
    pub logs: LogHub,
    /// The archives of jobs' `sync:` directories, on this controller's disk.
    pub syncs: crate::sync_store::SyncStore,
    pub metrics: MetricsHub,
    /// Job files being checked now (see `checking`).
    checks: Arc<tokio::sync::Semaphore>,
}

/// What [`Controller::admit`] decided.
enum Admitted {
    /// A repeat of a stored submit: its job.
    Repeat(Box<Job>),
    /// A repeat of a submit being stored: look again once it is done.
    AfterFirst(tokio::sync::watch::Receiver<()>),
    /// A new job, its record and the counter queued for the store; `pending`
    /// closes when the submit is over (repeats wait for it).
    New { entry: Box<JobEntry>, stored: Durable, counter: Durable, pending: tokio::sync::watch::Sender<()> },
}

/// A submit whose record is on its way to the store.
struct PendingSubmit {
    /// Closed when the first submit is done, stored or not.
    done: tokio::sync::watch::Receiver<()>,
    /// Repeats of it waiting for that.
    repeats: usize,
}

impl PendingSubmit {
    /// For a submit (a job or an array) with `key`: while the first one with
    /// that key is being stored, what closes once it is done (the caller waits,
    /// then looks again); None when there is none. An entry whose first
    /// submit's caller went away is dropped.
    fn repeat_of(
        pending: &mut HashMap<(String, String), PendingSubmit>,
        key: &(String, String),
    ) -> Option<tokio::sync::watch::Receiver<()>> {
        let first = pending.get_mut(key)?;
        if first.done.has_changed().is_ok() {
            first.repeats += 1;
            return Some(first.done.clone());
        }
        pending.remove(key);
        None
    }

    /// Records a new submit with `key` as being stored (when it has a request
    /// id: only those can be repeated); dropping the sender tells its repeats it is done.
    fn begin(
        pending: &mut HashMap<(String, String), PendingSubmit>,
        key: &(String, String),
    ) -> tokio::sync::watch::Sender<()> {
        let (done, first) = tokio::sync::watch::channel(());
        if !key.1.is_empty() {
            pending.insert(key.clone(), PendingSubmit { done: first, repeats: 0 });
        }
        done
    }
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
    /// Queries sent to agents, by command id, waiting for their answer.
    queries: HashMap<u64, tokio::sync::oneshot::Sender<QueryResult>>,
    /// Attempts whose whole output this controller has (it launched them, or
    /// fetched their files from the agents after taking over).
    logs_complete: HashSet<(String, u32)>,
    /// Event messages not yet published, by job, with when the first was
    /// held: a gang of N nodes sends N starts, and N exits when it is
    /// stopped, and every published event carries the whole job record, so
    /// these go out in batches.
    held_messages: HashMap<String, (Instant, Vec<String>)>,
    /// Lines of FetchLogs answers being collected, by command id.
    fetching: HashMap<u64, Vec<(String, cohort_proto::LogBatch)>>,
    /// Pipeline stages (job, stage) whose resolving task runs (pipeline.rs).
    pipeline_tasks: HashSet<(String, String)>,
    /// Conversions running now, recorded in the cache when their run succeeds.
    pending_conversions: HashMap<String, cohort_proto::ConversionCacheEntry>,
    /// Jobs by (submitter, SubmitJobRequest.request_id): a repeated submit returns the first job.
    submitted: HashMap<(String, String), String>,
    /// Jobs this controller deleted lately: a late store event or listing
    /// that still holds one does not bring it back. Kept for
    /// [`DELETED_MEMORY`].
    deleted_jobs: HashMap<String, Instant>,
    /// Submits whose record is on its way to the store, by the same key: a
    /// repeat waits for the first's outcome instead of making a second job.
    /// The sender side lives in the first submit and drops when it is done.
    pending_submits: HashMap<(String, String), PendingSubmit>,
    /// When the liveness sweep last ran (monotonic): a sweep much later than
    /// its tick means this controller was paused or starved, not the nodes.
    last_sweep: Option<Instant>,
    /// Each submitter's and queue's decayed GPU use, which orders jobs across
    /// queues and within a queue and priority; stored every few seconds.
    fair_share: crate::queues::FairShare,
    /// When the fair share was last written to the store, and whether jobs held GPUs then.
    fair_share_stored: Option<Instant>,
    fair_share_busy: bool,
    /// The queues in force: the store's (the admin API's), seeded from `--queues`.
    queues: Arc<crate::queues::Queues>,
    /// Which node holds which staged content (peer-to-peer staging).
    content: content::ContentTracker,
}

pub use cohort_proto::names::state_name;
pub use cohort_shared::metrics::describe_exit;

pub mod admission;
mod agents;
mod arrays;
mod checking;
mod content;
mod deleting;
mod dependencies;
mod job_entry;
mod node_caches;
mod node_entry;
mod pipeline;
mod preemption;
mod prepare;
mod progress;
mod queries;
mod queue_admin;
#[cfg(test)]
mod queue_scenarios;
mod reconcile;
#[cfg(test)]
mod rendered_commands;
mod restart;
#[cfg(test)]
mod scenarios;
mod stage_entry;
mod state_task;
mod swift_check;

use job_entry::{JobEntry, JobPhase, is_live};
use node_entry::{NodeEntry, NodePhase};
pub use pipeline::stage_state_name;
use state_task::StateTask;

impl Controller {
    /// Loads jobs and nodes from the store. Stored nodes start `Disconnected`
    /// and get one TTL to reconnect before their jobs are failed. A record
    /// that cannot be decoded is moved under `quarantine/` and reported
    /// (`/healthz`, the log); the rest of the state loads.
    pub async fn load(store: Arc<dyn Store>, data_dir: &Path, config: ControllerConfig) -> anyhow::Result<Arc<Self>> {
        let mut state = State { next_port: *config.master_ports.start(), next_seq: 1, ..State::default() };
        let mut warnings = Vec::new();
        let mut revisions = HashMap::new();
        let (queues, seed) = queue_admin::load(store.as_ref(), &config.queues, &mut revisions, &mut warnings).await?;
        state.queues = Arc::new(queues);
        state.fair_share = queue_admin::load_fair_share(store.as_ref(), &mut revisions, &mut warnings).await?;
        for (key, v) in store.list("jobs/").await? {
            let record = match JobRecord::decode(v.value.as_slice()) {
                Ok(record) => record,
                Err(e) => {
                    warnings.push(quarantine(store.as_ref(), &key, v, &format!("undecodable job record: {e}")).await?);
                    continue;
                }
            };
            let Some(job) = &record.job else { continue };
            state.next_seq = state.next_seq.max(record.seq + 1);
            let id = job.id.clone();
            match entry_from_record(record, v.revision) {
                Ok(entry) => {
                    revisions.insert(key.clone(), v.revision);
                    state.insert_stored(entry);
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "stored job no longer parses; skipping it");
                    warnings.push(format!("store key {key}: the job file no longer parses ({e}); job {id} skipped"));
                }
            }
        }
        if let Some(last) = store.get(JOB_SEQ_KEY).await? {
            revisions.insert(JOB_SEQ_KEY.to_string(), last.revision);
            match std::str::from_utf8(&last.value).ok().and_then(|s| s.parse::<u64>().ok()) {
                Some(last) => state.next_seq = state.next_seq.max(last + 1),
                None => warnings.push(format!(
                    "store key {JOB_SEQ_KEY}: {:?} is not a number; job ids continue after the newest stored job",
                    String::from_utf8_lossy(&last.value)
                )),
            }
        }
        let now = Instant::now();
        for (key, v) in store.list("nodes/").await? {
            let record = match NodeRecord::decode(v.value.as_slice()) {
                Ok(record) => record,
                Err(e) => {
                    warnings.push(quarantine(store.as_ref(), &key, v, &format!("undecodable node record: {e}")).await?);
                    continue;
                }
            };
            let Some(node) = NodeEntry::from_store(record, v.revision, now, reconcile::stall_grace(&config)) else {
                continue;
            };
            revisions.insert(key.clone(), v.revision);
            state.nodes.insert(node.info.name.clone(), node);
        }
        tracing::info!(jobs = state.jobs.len(), nodes = state.nodes.len(), "loaded state from the store");
        let logs = LogHub::new(data_dir.join("logs"))?;
        let metrics = MetricsHub::new(data_dir.join("metrics"))?;
        let syncs = crate::sync_store::SyncStore::new(data_dir.join("sync"), config.limits.max_sync_bytes);
        let writer = StoreWriter::start(store.clone(), revisions);
        for queue in seed {
            // Awaited in the background: a failed seed is written again at the next start.
            drop(writer.write(queue_admin::queue_key(&queue.name), Some(queue.to_spec().encode_to_vec())));
        }
        Ok(Arc::new_cyclic(|controller| Self {
            state: StateTask::start(state, controller.clone()),
            writer,
            store,
            load_warnings: warnings,
            config,
            wake: Notify::new(),
            events: broadcast::channel(4096).0,
            logs,
            syncs,
            metrics,
            checks: checking::concurrent_checks(),
        }))
    }

    // ---------------------------------------------------------------- jobs API

    /// Parses and validates a job file the controller made itself (a
    /// pipeline's stage); files from clients go through `check_file`.
    fn parse(&self, file: &JobFile) -> Result<JobSpec, ControllerError> {
        checking::parse_job_file(file, self.config.limits.max_job_file_bytes)
    }

    /// Admits a job file: parsed, within the caller's priority cap and the
    /// cluster's size, and not a repeat of an earlier submit (`request_id`).
    pub async fn submit(
        &self,
        file: JobFile,
        options: admission::SubmitOptions,
    ) -> Result<(Job, Vec<String>), ControllerError> {
        let spec = self.check_file(&file).await?;
        self.check_sync(&spec, &file)?;
        let warnings: Vec<String> = spec.warnings().iter().map(|w| format!("{}: {}", w.field, w.message)).collect();
        admission::check_request_id(&options.request_id)?;
        if spec.array.is_some() {
            return self.submit_array(file, spec, options, warnings).await;
        }
        let repeat_key = (file.submitted_by.clone(), options.request_id.clone());
        let (mut entry, stored, counter, _pending) = loop {
            let (spec, file, options, key) = (spec.clone(), file.clone(), options.clone(), repeat_key.clone());
            match self.state.call(move |state, ctl| ctl.admit(state, spec, file, &options, key)).await? {
                Admitted::Repeat(first) => return Ok((*first, warnings)),
                // Returns once the first submit has finished, stored or not; then look again.
                Admitted::AfterFirst(mut first) => {
                    let _ = first.changed().await;
                }
                Admitted::New { entry, stored, counter, pending } => break (entry, stored, counter, pending),
            }
        };
        let id = entry.job.id.clone();
        let stored = stored.wait().await;
        if let Err(e) = counter.wait().await {
            tracing::warn!(job = %id, error = %e, "the job counter could not be stored; the job record holds its seq");
        }
        let revision = match stored {
            Ok(revision) => revision,
            Err(e) => {
                // Not stored, so not a job: nothing of it stays behind.
                tracing::warn!(job = %id, error = %e, "submit refused: the job could not be stored");
                self.state.call(move |state, _| state.pending_submits.remove(&repeat_key)).await;
                return Err(e.into());
            }
        };
        entry.revision = Some(revision);
        let job = self
            .state
            .call(move |state, ctl| {
                state.pending_submits.remove(&repeat_key);
                let id = entry.job.id.clone();
                state.jobs.insert(id.clone(), *entry);
                if !repeat_key.1.is_empty() {
                    state.submitted.insert(repeat_key, id.clone());
                }
                ctl.publish(state, &id, "submitted");
                tracing::info!(job = %id, "job submitted");
                Self::resolve(state, &id).map(|e| e.job.clone())
            })
            .await?;
        self.wake.notify_one();
        Ok((job, warnings))
    }

    /// A job file with `sync:` names an archive its submitter uploaded; one
    /// without names none.
    fn check_sync(&self, spec: &JobSpec, file: &JobFile) -> Result<(), ControllerError> {
        match (&spec.sync, &file.sync) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(ControllerError::InvalidRequest(
                "JobFile.sync names an archive, but the job file has no `sync:`; leave JobFile.sync empty".into(),
            )),
            (Some(sync), None) => Err(ControllerError::InvalidRequest(format!(
                "the job file syncs {:?} (`sync:`): upload that directory first (UploadSync) and name the archive \
                 in JobFile.sync; `cohort submit` does both",
                sync.dir
            ))),
            (Some(_), Some(archive)) if !self.syncs.has(&file.submitted_by, &archive.sha256) => {
                Err(ControllerError::FailedPrecondition(format!(
                    "the sync archive {} is not on this controller under the submitting user: upload it (UploadSync) \
                     with the same token just before the submit",
                    archive.sha256
                )))
            }
            (Some(_), Some(_)) => Ok(()),
        }
    }

    /// The user whose upload `job_id`'s sync archive `sha256` is, once the
    /// caller's node (None: not checked, `--insecure`) is placed in its
    /// current attempt.
    pub async fn sync_owner(
        &self,
        job_id: &str,
        node: Option<String>,
        sha256: &str,
    ) -> Result<String, ControllerError> {
        let (job_id, sha256) = (job_id.to_owned(), sha256.to_owned());
        self.state
            .call(move |state, _| {
                let entry = state.jobs.get(&job_id).ok_or_else(|| ControllerError::JobNotFound(job_id.clone()))?;
                let file = entry.job.file.as_ref();
                if file.and_then(|f| f.sync.as_ref()).is_none_or(|s| s.sha256 != sha256) {
                    return Err(ControllerError::InvalidRequest(format!("job {job_id} syncs no archive {sha256}")));
                }
                if let Some(node) = node
                    && !entry.on_node(&node)
                {
                    return Err(ControllerError::PermissionDenied(format!(
                        "node {node} is not placed in job {job_id}'s current attempt: it may not fetch its files"
                    )));
                }
                Ok(file.map(|f| f.submitted_by.clone()).unwrap_or_default())
            })
            .await
    }

    /// Removes sync archives no stored job names, an hour after their upload.
    pub async fn collect_syncs(&self) {
        let referenced = self
            .state
            .call(|state, _| {
                state
                    .jobs
                    .values()
                    .filter_map(|e| e.job.file.as_ref())
                    .filter_map(|f| f.sync.as_ref().map(|s| (f.submitted_by.clone(), s.sha256.clone())))
                    .collect::<std::collections::HashSet<_>>()
            })
            .await;
        let removed = self.syncs.collect(&referenced, crate::sync_store::UNREFERENCED_FOR);
        if removed > 0 {
            tracing::info!(removed, "sync archives no job names removed");
        }
    }

    /// Decides a submit on the state: a repeat of a stored submit gets its
    /// job, a repeat of one being stored waits for it, a new job's records
    /// are queued for the store (it joins the state once they are stored).
    fn admit(
        &self,
        state: &mut State,
        spec: JobSpec,
        file: JobFile,
        options: &admission::SubmitOptions,
        repeat_key: (String, String),
    ) -> Result<Admitted, ControllerError> {
        if let Some(first) = PendingSubmit::repeat_of(&mut state.pending_submits, &repeat_key) {
            return Ok(Admitted::AfterFirst(first));
        }
        if !options.request_id.is_empty()
            && let Some(id) = state.submitted.get(&repeat_key)
        {
            let first =
                state.jobs.get(id).map(|e| e.job.clone()).ok_or_else(|| ControllerError::JobNotFound(id.clone()))?;
            admission::check_same_file(&options.request_id, &first, &file)?;
            tracing::info!(job = %first.id, request_id = %options.request_id, "repeated submit: returning the first job");
            return Ok(Admitted::Repeat(Box::new(first)));
        }
        let admitted = self.admission_checks(state, &spec, options)?;
        let seq = state.next_seq;
        state.next_seq += 1;
        let id = format!("{}-{}", spec.name, seq);
        let job = Self::new_record(&spec, id.clone(), file, options, admitted);
        let stages = match &spec.workload {
            Workload::Pipeline(pipeline) => Some(pipeline::initial_stages(pipeline)),
            _ => None,
        };
        let mut entry = JobEntry::submitted(job, spec, seq);
        if let Some(stages) = stages {
            entry.start_pipeline(stages)?;
        }
        // The job joins the state only once its record is stored, so nothing
        // acts on a job that a failed write leaves unsubmitted. Its record
        // goes first: a stored record's seq keeps the id taken even if the
        // counter's write fails.
        let record = JobRecord { job: Some(entry.job.clone()), seq: entry.seq };
        let stored = self.writer.write(format!("jobs/{id}"), Some(record.encode_to_vec()));
        let counter = self.writer.write(JOB_SEQ_KEY.into(), Some(seq.to_string().into_bytes()));
        let pending = PendingSubmit::begin(&mut state.pending_submits, &repeat_key);
        Ok(Admitted::New { entry: Box::new(entry), stored, counter, pending })
    }

    /// What admits a job besides its file: the caller's priority cap and
    /// run-as rules, the cluster's size, its queue and its dependencies.
    /// Returns what its record carries: the time limit, the queue and its
    /// dependencies as ids.
    fn admission_checks(
        &self,
        state: &State,
        spec: &JobSpec,
        options: &admission::SubmitOptions,
    ) -> Result<AdmissionOutcome, ControllerError> {
        admission::check_priority(spec, options.max_priority)?;
        if let Some(identity) = &options.run_as_bound {
            self.config.run_as.check(&spec.name, identity, spec.user.as_deref().unwrap_or(""))?;
        }
        admission::check_fits(spec, state, &self.config.admission)?;
        let after = dependencies::resolve(state, spec)?;
        let queue = state
            .queues
            .admit(
                &spec.name,
                spec.queue.as_deref(),
                spec.nodes * spec.gpus_per_node,
                spec.time_limit,
                options.run_as_bound.as_deref(),
            )
            .map_err(|refusal| match refusal {
                crate::queues::QueueRefusal::Invalid(m) => ControllerError::InvalidRequest(m),
                crate::queues::QueueRefusal::Forbidden(m) => ControllerError::PermissionDenied(m),
            })?;
        let time_limit_ms =
            queue.time_limit(spec.time_limit).map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
        Ok(AdmissionOutcome { time_limit_ms, queue: queue.name.clone(), after })
    }

    /// A new job's record, Pending once it enters the state.
    fn new_record(
        spec: &JobSpec,
        id: String,
        file: JobFile,
        options: &admission::SubmitOptions,
        admitted: AdmissionOutcome,
    ) -> Job {
        Job {
            id,
            name: spec.name.clone(),
            kind: pipeline::kind_name(spec).into(),
            nodes: spec.nodes,
            gpus_per_node: spec.gpus_per_node,
            priority: spec.priority,
            submitted_unix_ms: now_unix_ms(),
            file: Some(file),
            secret_env: spec.secret_env.iter().cloned().collect(),
            request_id: options.request_id.clone(),
            time_limit_ms: admitted.time_limit_ms,
            queue: admitted.queue,
            after: admitted.after,
            ..Job::default()
        }
    }

    /// `cohort plan`: the file checked, its placement on the cluster now, and
    /// with `check` its ms-swift arguments checked on the nodes; secret env
    /// values hidden.
    pub async fn plan(&self, file: JobFile, check: bool) -> cohort_proto::PlanJobResponse {
        let spec = match self.check_file(&file).await {
            Ok(spec) => spec,
            Err(e) => return Self::problems(e),
        };
        let secret: Vec<String> = spec.secret_env.iter().cloned().collect();
        let mut response = self.plan_spec(&spec, &file).await;
        if check && response.problems.is_empty() {
            response.checks = self.check_swift_args(&spec).await;
        }
        if let Some(plan) = response.plan.as_mut() {
            crate::secrets::redact_plan(plan, &secret);
        }
        response
    }

    /// A plan answer that holds only why the file was refused.
    fn problems(error: ControllerError) -> cohort_proto::PlanJobResponse {
        use cohort_proto::{PlanJobResponse, SpecProblem};
        let problems = match error {
            ControllerError::InvalidSpec(errors) => errors
                .issues
                .iter()
                .map(|i| SpecProblem {
                    field: i.field.clone(),
                    line: i.line.unwrap_or(0) as u32,
                    message: i.message.clone(),
                })
                .collect(),
            other => vec![SpecProblem { field: String::new(), line: 0, message: other.to_string() }],
        };
        PlanJobResponse { problems, ..PlanJobResponse::default() }
    }

    /// The placement of a checked job on the cluster as it is now.
    async fn plan_spec(&self, spec: &JobSpec, file: &JobFile) -> cohort_proto::PlanJobResponse {
        use cohort_proto::PlanJobResponse;
        let mut response = PlanJobResponse {
            warnings: spec.warnings().iter().map(|w| format!("{}: {}", w.field, w.message)).collect(),
            memory_estimate_gib: spec.memory_estimate_gib(),
            ..PlanJobResponse::default()
        };
        if let Workload::MegatronSft(m) = &spec.workload {
            response.parallel_layout = m.layout(spec.nodes, spec.gpus_per_node).to_string();
        }
        if let Workload::Pipeline(p) = &spec.workload {
            // A pipeline is placed stage by stage as each starts: its plan is each stage's command.
            match self.plan_stages(p, &spec.name, file) {
                Ok(stages) => response.stages = stages,
                Err(problems) => response.problems = problems,
            }
            return response;
        }
        let spec = spec.clone();
        self.state.call(move |state, ctl| Self::place_now(state, &spec, &ctl.config, response)).await
    }

    /// [`Self::plan_spec`] on the state: where the job would go now.
    fn place_now(
        state: &State,
        spec: &JobSpec,
        config: &ControllerConfig,
        mut response: cohort_proto::PlanJobResponse,
    ) -> cohort_proto::PlanJobResponse {
        let views = Self::node_views(state);
        match planner::place(spec, &views, &[]) {
            Ok(placement) => {
                // Every port leased: the launch would wait; the plan shows where the search starts.
                let (lo, hi) = (*config.master_ports.start(), *config.master_ports.end());
                let port = Self::peek_port(state, config).unwrap_or(state.next_port.clamp(lo, hi));
                let workdir = spec.workdir.clone();
                // What the first attempt runs (e.g. a megatron-sft job's save on its preemption signal).
                response.plan = Some(planner::render(
                    &planner::attempt_spec(spec, None),
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
        // The nodes it would run on (unplaced: every Ready node).
        let placed: Vec<&str> =
            response.plan.iter().flat_map(|p| p.nodes.iter().map(|n| n.node_name.as_str())).collect();
        let work_dirs: Vec<(&str, &str)> = state
            .nodes
            .values()
            .filter(|n| {
                if placed.is_empty() { n.phase() == NodePhase::Ready } else { placed.contains(&n.info.name.as_str()) }
            })
            .map(|n| (n.info.name.as_str(), n.info.work_dir.as_str()))
            .collect();
        name_work_dirs(&mut response.warnings, &work_dirs);
        if prepare::required_packages(spec).is_empty() {
            return response;
        }
        // Those nodes as their agents found them at start-up.
        let reports: Vec<cohort_proto::PreflightReport> = state
            .nodes
            .values()
            .filter(|n| {
                if placed.is_empty() { n.phase() == NodePhase::Ready } else { placed.contains(&n.info.name.as_str()) }
            })
            .filter_map(|n| n.preflight.clone())
            .collect();
        response.node_problems = prepare::startup_refusals(spec, &reports);
        response
    }

    fn resolve<'a>(state: &'a State, job_ref: &str) -> Result<&'a JobEntry, ControllerError> {
        if let Some(entry) = state.jobs.get(job_ref) {
            return Ok(entry);
        }
        // An array's id is not a job (nor the name of one).
        if let Some(first) = Self::array_elements(state, job_ref).first() {
            return Err(ControllerError::InvalidRequest(format!(
                "{job_ref} is a job array: name one of its jobs, e.g. {first}; `cohort jobs --array {job_ref}` \
                 lists them, `cohort cancel {job_ref}` cancels them all"
            )));
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
        self.read_through(job_ref).await;
        let job_ref = job_ref.to_string();
        self.state.call(move |state, _| Ok(Self::resolve(state, &job_ref)?.job.clone())).await
    }

    /// A job id this controller does not hold but the store does: a submit
    /// answered by the previous leader (or this process's previous term)
    /// after this one loaded the store. Taken from the store before the
    /// request is answered, so a job id a client was given is never "no job".
    pub(super) async fn read_through(&self, job_ref: &str) {
        let (id, probe) = (job_ref.to_string(), job_ref.to_string());
        let known = self.state.call(move |state, _| Self::resolve(state, &probe).is_ok()).await;
        if known || id.is_empty() || id.contains('/') {
            return;
        }
        let key = format!("jobs/{id}");
        match self.store.get(&key).await {
            Ok(Some(v)) => self.stored_job(&key, &v.value, v.revision).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(job = %id, error = %e, "cannot look the job up in the store"),
        }
    }

    pub async fn list(&self, active_only: bool) -> Vec<Job> {
        self.state
            .call(move |state, _| {
                let mut jobs: Vec<&JobEntry> = state
                    .jobs
                    .values()
                    .filter(|e| !active_only || !e.is_terminal() || e.job.live_processes > 0)
                    .collect();
                jobs.sort_by_key(|e| e.seq);
                jobs.into_iter().map(|e| e.job.clone()).collect()
            })
            .await
    }

    /// The job now and a receiver of its later events.
    pub async fn watch(&self, job_ref: &str) -> Result<(Job, broadcast::Receiver<JobEvent>), ControllerError> {
        self.read_through(job_ref).await;
        let job_ref = job_ref.to_string();
        // Subscribed on the state task: no event of a later change is missed.
        self.state
            .call(move |state, ctl| Ok((Self::resolve(state, &job_ref)?.job.clone(), ctl.events.subscribe())))
            .await
    }

    /// The job `cancel` would act on: the job, or an array's first element
    /// (every element has the array's submitter).
    pub async fn cancel_target(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let job_ref = job_ref.to_string();
        self.state
            .call(move |state, _| {
                let first = if state.jobs.contains_key(&job_ref) {
                    None
                } else {
                    Self::array_elements(state, &job_ref).into_iter().next()
                };
                Ok(Self::resolve(state, first.as_deref().unwrap_or(&job_ref))?.job.clone())
            })
            .await
    }

    /// Cancels a job, or every element of a job array (answering with the first).
    pub async fn cancel(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let array_ref = job_ref.to_string();
        let elements = self
            .state
            .call(move |state, _| {
                if state.jobs.contains_key(&array_ref) { Vec::new() } else { Self::array_elements(state, &array_ref) }
            })
            .await;
        if elements.is_empty() {
            return self.cancel_one(job_ref).await;
        }
        for id in &elements[1..] {
            self.cancel_one(id).await?;
        }
        self.cancel_one(&elements[0]).await
    }

    async fn cancel_one(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let job_ref = job_ref.to_string();
        let (id, stored) = self
            .state
            .call(move |state, ctl| {
                let id = Self::resolve(state, &job_ref)?.job.id.clone();
                let Some(entry) = state.jobs.get_mut(&id) else { return Err(ControllerError::JobNotFound(id)) };
                let reason = match entry.phase() {
                    JobPhase::Pending => "cancelled before it was placed",
                    // The failed attempt's gang may still be stopping; it goes on being stopped.
                    JobPhase::Restarting => "cancelled by the user while restarting",
                    _ => "cancelled by the user; stopping every process",
                };
                // A job that has ended is answered as it is.
                let Ok(from) = entry.cancel(reason.into()) else { return Ok((id, Durable::nothing())) };
                if from.is_active() {
                    ctl.teardown(state, &id, "cancelled");
                }
                let stored = ctl.persist_job(state, &id);
                ctl.publish(state, &id, "cancelled");
                tracing::info!(job = %id, "job cancelled");
                ctl.wake.notify_one();
                Ok((id, stored))
            })
            .await?;
        stored.wait().await?;
        self.get(&id).await
    }

    pub async fn nodes(&self) -> Vec<Node> {
        self.state.call(|state, _| Self::node_table(state)).await
    }

    fn node_table(state: &State) -> Vec<Node> {
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
                let jobs_here = !jobs.is_empty();
                gpus.sort_unstable();
                Node {
                    info: Some(n.info.clone()),
                    state: n.phase().to_proto() as i32,
                    last_heartbeat_unix_ms: n.last_seen_unix_ms,
                    allocated_gpus: gpus,
                    jobs,
                    registered_unix_ms: n.registered_unix_ms,
                    preflight: n.preflight.clone(),
                    telemetry: n.telemetry.clone(),
                    cordoned: n.cordoned,
                    // Drained once its jobs are gone: then merely cordoned.
                    draining: n.draining && jobs_here,
                    fence_deadline_unix_ms: if n.is_connected() { 0 } else { reconcile::fence_deadline(Some(n)) },
                }
            })
            .collect()
    }

    /// Cordon (no new work), drain (cordon, Draining until its jobs end) or uncordon a node.
    pub async fn set_schedulable(&self, node: &str, cordon: bool, drain: bool) -> Result<Node, ControllerError> {
        let name = node.to_string();
        let stored = self
            .state
            .call(move |state, ctl| {
                let node = name.as_str();
                let entry = state.nodes.get_mut(node).ok_or_else(|| unknown_node(node))?;
                entry.cordoned = cordon;
                entry.draining = drain;
                tracing::info!(node, cordon, drain, "node scheduling changed");
                let stored = ctl.persist_node(state, node);
                ctl.wake.notify_one();
                Ok::<_, ControllerError>(stored)
            })
            .await?;
        stored.wait().await?;
        self.node(node).await
    }

    /// Declares a GPU healthy again: forgotten by the controller, reset on the agent.
    pub async fn clear_gpu(&self, node: &str, index: u32) -> Result<Node, ControllerError> {
        let name = node.to_string();
        let stored = self
            .state
            .call(move |state, ctl| {
                let node = name.as_str();
                let entry = state.nodes.get_mut(node).ok_or_else(|| unknown_node(node))?;
                if !entry.info.gpus.iter().any(|g| g.index == index) {
                    return Err(ControllerError::InvalidRequest(format!("node {node} has no GPU {index}")));
                }
                entry.unhealthy_gpus.remove(&index);
                for t in entry.telemetry.iter_mut().filter(|t| t.index == index) {
                    t.health = None;
                }
                tracing::info!(node, gpu = index, "GPU cleared by an operator");
                let stored = ctl.persist_node(state, node);
                Self::send_command(state, node, Command::ClearGpu(cohort_proto::ClearGpuCommand { index }));
                ctl.wake.notify_one();
                Ok(stored)
            })
            .await?;
        stored.wait().await?;
        self.node(node).await
    }

    async fn node(&self, name: &str) -> Result<Node, ControllerError> {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.info.as_ref().is_some_and(|i| i.name == name))
            .ok_or_else(|| unknown_node(name))
    }

    // ------------------------------------------------------------ persistence

    /// Whether the store can be written now.
    pub fn store_health(&self) -> crate::store::StoreHealth {
        self.store.health()
    }

    /// Queues the job's record for the store, behind every change queued
    /// before; the caller awaits the answer after its state command, off the state task.
    fn persist_job(&self, state: &mut State, id: &str) -> Durable {
        let Some(entry) = state.jobs.get(id) else { return Durable::nothing() };
        let record = JobRecord { job: Some(entry.job.clone()), seq: entry.seq };
        self.writer.write(format!("jobs/{id}"), Some(record.encode_to_vec()))
    }

    /// Queues the node's record for the store, like [`Self::persist_job`].
    fn persist_node(&self, state: &mut State, name: &str) -> Durable {
        let Some(node) = state.nodes.get(name) else { return Durable::nothing() };
        self.writer.write(format!("nodes/{name}"), Some(node.record().encode_to_vec()))
    }

    /// Returns once every change made before this call is stored (or failed).
    pub async fn flush_store(&self) {
        self.writer.flush().await;
    }

    /// Stops writing to the store (leadership lost): queued writes fail.
    pub fn stop_writes(&self) {
        self.writer.close();
    }

    /// Holds a message for the job's next batch, and publishes the batch once
    /// its first message is [`HOLD_FOR`] old.
    fn hold_message(&self, state: &mut State, id: &str, message: String) {
        let held = state.held_messages.entry(id.to_string()).or_insert_with(|| (Instant::now(), Vec::new()));
        held.1.push(message);
        if held.0.elapsed() >= HOLD_FOR {
            self.flush_held(state, id, None);
        }
    }

    /// Publishes the job's held messages (followed by `message`, when given)
    /// as one event; with nothing held, just `message`.
    fn flush_held(&self, state: &mut State, id: &str, message: Option<&str>) {
        let mut lines = state.held_messages.remove(id).map(|(_, lines)| lines).unwrap_or_default();
        lines.extend(message.map(str::to_string));
        if !lines.is_empty() {
            self.publish(state, id, &batch_message(&lines));
        }
    }

    /// Publishes every batch of held messages older than [`HOLD_FOR`].
    fn flush_old_held(&self, state: &mut State) {
        let due: Vec<String> = state
            .held_messages
            .iter()
            .filter(|(_, (since, _))| since.elapsed() >= HOLD_FOR)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.flush_held(state, &id, None);
        }
    }

    fn publish(&self, state: &State, id: &str, message: &str) {
        if let Some(entry) = state.jobs.get(id) {
            if let Some(span) = &entry.span {
                span.in_scope(
                    || tracing::info!(state = state_name(entry.job.state), reason = %entry.job.reason, "{message}"),
                );
            }
            let _ = self.events.send(JobEvent {
                unix_ms: now_unix_ms(),
                job: Some(entry.job.clone()),
                message: message.into(),
            });
        }
    }
}

/// The last job sequence number handed out (decimal text): ids are never reused.
const JOB_SEQ_KEY: &str = "counters/job-seq";

/// Moves an undecodable record to `quarantine/<key>` so that the rest of the
/// state loads; returns the warning that names it.
async fn quarantine(
    store: &dyn Store,
    key: &str,
    value: crate::store::Versioned,
    problem: &str,
) -> Result<String, crate::store::StoreError> {
    let aside = format!("quarantine/{key}");
    store.put(&aside, value.value, Expect::Any).await?;
    store.delete(key, Expect::Revision(value.revision)).await?;
    tracing::error!(key, moved_to = %aside, problem, "a stored record cannot be read; moved it aside");
    Ok(format!("store key {key}: {problem}; moved to {aside}, the rest of the state loaded"))
}

/// How long batched event messages are held to go out as one event.
const HOLD_FOR: Duration = Duration::from_millis(50);

/// Node names for a reason or a log field: all of them when few, else the
/// first three, the last and the count. Every log line of an attempt carries
/// this, and a 1,024-node list is 9 KB.
/// A warning about a path resolved in the per-job directory gets the real
/// `--work-dir` of the nodes the job would run on: "/srv/cohort on node0, node1".
fn name_work_dirs(warnings: &mut [String], nodes: &[(&str, &str)]) {
    let mut by_dir: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, dir) in nodes.iter().filter(|(_, dir)| !dir.is_empty()) {
        by_dir.entry(dir).or_default().push(node);
    }
    if by_dir.is_empty() {
        return;
    }
    let dirs: Vec<String> = by_dir.iter().map(|(dir, nodes)| format!("{dir} on {}", node_list(nodes))).collect();
    for warning in warnings.iter_mut().filter(|w| w.contains("<agent --work-dir>/jobs/<job id>/workdir/")) {
        warning.push_str(&format!(" (<agent --work-dir> of the nodes it would run on: {})", dirs.join("; ")));
    }
}

fn node_list<S: AsRef<str>>(nodes: &[S]) -> String {
    const SHOWN: usize = 8;
    let names = |nodes: &[S]| nodes.iter().map(|n| n.as_ref()).collect::<Vec<_>>().join(", ");
    match nodes {
        [first @ .., last] if nodes.len() > SHOWN => {
            format!("{}, ..., {} ({} nodes)", names(&first[..3]), last.as_ref(), nodes.len())
        }
        _ => names(nodes),
    }
}

/// One event message for several: all of them when few, else the first and
/// last two around a count (a 1,024-node gang's starts make one line).
fn batch_message(lines: &[String]) -> String {
    const SHOWN: usize = 4;
    if lines.len() <= SHOWN {
        return lines.join("; ");
    }
    format!(
        "{}; {}; ... {} more ...; {}; {}",
        lines[0],
        lines[1],
        lines.len() - SHOWN,
        lines[lines.len() - 2],
        lines[lines.len() - 1]
    )
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

/// How long a deleted job's id is remembered: far longer than a store
/// event or a listing can lag behind the delete.
const DELETED_MEMORY: Duration = Duration::from_secs(600);

/// A stored job record as an entry, its spec parsed again from its file;
/// Err: why the file no longer parses. The record must hold a job.
fn entry_from_record(record: JobRecord, revision: u64) -> Result<JobEntry, String> {
    let job = record.job.unwrap_or_default();
    let file = job.file.clone().unwrap_or_default();
    let mut spec = JobSpec::from_yaml(&file.yaml, &file.source_name).map_err(|e| e.to_string())?;
    crate::security::run_as::apply_default_user(&mut spec, &file);
    Ok(JobEntry::from_store(job, spec, record.seq, revision))
}

impl State {
    /// A job read from the store joins the state: its seq is not handed out
    /// again, and a submit repeating its request id gets it.
    fn insert_stored(&mut self, entry: JobEntry) {
        self.next_seq = self.next_seq.max(entry.seq + 1);
        let job = &entry.job;
        if !job.request_id.is_empty() {
            let submitter = job.file.as_ref().map(|f| f.submitted_by.clone()).unwrap_or_default();
            self.submitted.insert((submitter, job.request_id.clone()), job.id.clone());
        }
        self.jobs.insert(job.id.clone(), entry);
    }
}

/// The answer to a request naming a node the controller does not know.
fn unknown_node(name: &str) -> ControllerError {
    ControllerError::InvalidRequest(format!("no node {name:?}: `cohort nodes` lists the known nodes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn undecodable_records_are_quarantined_and_ids_continue_after_the_stored_counter() {
        #![allow(clippy::unwrap_used)]
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::EmbeddedStore::open(dir.path()).unwrap());
        let garbage = vec![0xffu8; 12];
        store.put("jobs/broken-3", garbage.clone(), Expect::Any).await.unwrap();
        store.put("nodes/broken", garbage.clone(), Expect::Any).await.unwrap();
        // A job whose record was lost after its id was handed out: the id is still taken.
        store.put(JOB_SEQ_KEY, b"41".to_vec(), Expect::Any).await.unwrap();

        let controller = Controller::load(store.clone(), dir.path(), ControllerConfig::default()).await.unwrap();
        assert_eq!(controller.load_warnings.len(), 2, "{:?}", controller.load_warnings);
        assert!(controller.load_warnings[0].starts_with("store key jobs/broken-3: undecodable job record"));
        assert!(controller.load_warnings[1].contains("moved to quarantine/nodes/broken"));
        assert_eq!(store.get("quarantine/jobs/broken-3").await.unwrap().unwrap().value, garbage);
        assert_eq!(store.get("jobs/broken-3").await.unwrap(), None);
        assert_eq!(store.get("nodes/broken").await.unwrap(), None);

        let file = JobFile {
            yaml: "name: next\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: ['true']\n".into(),
            source_name: "next.yaml".into(),
            ..JobFile::default()
        };
        let (job, _) = controller.submit(file, admission::SubmitOptions::default()).await.unwrap();
        assert_eq!(job.id, "next-42");
        assert_eq!(store.get(JOB_SEQ_KEY).await.unwrap().unwrap().value, b"42");
    }

    #[test]
    fn a_batch_of_starts_is_one_line_with_the_ends_and_a_count() {
        let lines: Vec<String> = (0..1024).map(|i| format!("process 0 on node n{i} started")).collect();
        let message = batch_message(&lines);
        assert_eq!(
            message,
            "process 0 on node n0 started; process 0 on node n1 started; ... 1020 more ...; \
             process 0 on node n1022 started; process 0 on node n1023 started"
        );
        assert_eq!(batch_message(&lines[..3]), lines[..3].join("; "));
        assert_eq!(batch_message(&lines[..1]), lines[0]);
    }

    #[test]
    fn a_long_node_list_is_its_ends_and_a_count() {
        let nodes: Vec<String> = (0..1024).map(|i| format!("n{i}")).collect();
        assert_eq!(node_list(&nodes), "n0, n1, n2, ..., n1023 (1024 nodes)");
        assert_eq!(node_list(&nodes[..8]), "n0, n1, n2, n3, n4, n5, n6, n7");
        assert_eq!(node_list(&nodes[..9]), "n0, n1, n2, ..., n8 (9 nodes)");
        assert_eq!(node_list::<String>(&[]), "");
    }

    #[test]
    fn a_new_attempt_waits_for_the_fence_the_grace_and_the_slack() {
        #![allow(clippy::unwrap_used)]
        let record = NodeRecord {
            info: Some(NodeInfo { name: "n1".into(), fence_after_ms: 4_000, ..NodeInfo::default() }),
            ..NodeRecord::default()
        };
        let mut node = NodeEntry::from_store(record, 1, Instant::now(), Duration::ZERO).unwrap();
        node.last_seen_unix_ms = 1_000_000;
        assert_eq!(reconcile::fence_deadline(Some(&node)), 1_004_000);
        // The ranks get SIGTERM at the deadline and SIGKILL `grace` later.
        let gone = reconcile::ranks_fenced_by(Some(&node), Duration::from_secs(2));
        assert_eq!(gone, 1_004_000 + 2_000 + 1_500);
        assert_eq!(reconcile::ranks_fenced_by(None, Duration::from_secs(2)), 0);
    }
}
