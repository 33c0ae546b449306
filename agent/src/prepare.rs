//! Everything a node does between placement and launch (preflight, proof that
//! shared paths are shared, staging, dataset checks) and the answers to the
//! controller's queries. Each command runs as its own task and answers on the
//! session's outbound queue, so a long staging never blocks the stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_proto::{
    AgentMessage, Checkpoint, CheckpointAnswer, DatasetSummary, EnvVar, FindCheckpointCommand, PreflightReport,
    PrepareCommand, PrepareResult, QueryResult, SharedPathCheck, StageDigestCommand, StageInput, StageProgress,
    StageStatus, StagedInput, SwiftArgcheckCommand, agent_message::Msg, query_result::Result as QueryAnswer,
};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::cache_keeper::CacheKeeper;
use crate::job_files::{AsJobUser, user_cache};
use crate::peer::{Fetched, Peers};
use crate::preflight::{self, Interpreter};
use crate::rank_user::RankUserPolicy;
use crate::stage::hub::HubModel;
use crate::stage::{StageItem, StageState, Stager};
use crate::supervisor::Outbound;

/// How long a reader node waits for the writer's marker to appear (network
/// file systems cache directory entries for a few seconds).
const MARKER_WAIT: Duration = Duration::from_secs(15);
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an input's "staged" progress, which nodes waiting for its digest
/// need, may wait for room in the outbound queue.
const FINISHED_SEND_WAIT: Duration = Duration::from_secs(5);
/// The variables by which the supervisor's sweep recognises a launch's processes.
const SWEPT_BY: &[&str] = &["COHORT_JOB_ID", "COHORT_ATTEMPT", "COHORT_NODE_NAME"];

#[derive(Clone)]
pub struct Preparer {
    pub node_name: String,
    /// The interpreter probed when a job names none.
    pub python: String,
    /// Node-level environment given to the probe (MEGATRON_LM_PATH, ...).
    pub node_env: Vec<(String, String)>,
    pub stager: std::sync::Arc<Stager>,
    pub out: mpsc::Sender<Outbound>,
    /// The latest registration-time report, re-sent on every new session.
    pub report: watch::Sender<Option<PreflightReport>>,
    /// Which users the job's interpreter may run as (the ranks' rule).
    pub rank_users: RankUserPolicy,
    /// The `cohort-agent` binary that runs an interpreter as another user
    /// (`preflight-as`); `/proc/self/exe` in the daemon.
    pub helper: PathBuf,
    /// Preparations in flight, by job and attempt; a stop of the job aborts
    /// them, and with them their helpers (staging, dataset check, probes).
    pub preparing: Arc<Mutex<HashMap<(String, u32), AbortHandle>>>,
    /// Inputs without `sha256` that a preparation waits for another node to
    /// read (`StageInput.awaits_digest`), by job, attempt and input name: the
    /// controller's `StageDigestCommand` lands here.
    pub digests: Arc<Mutex<HashMap<DigestKey, watch::Sender<Option<StageDigestCommand>>>>>,
    /// Pins what jobs staged and keeps the caches under `--cache-max`.
    pub cache_keeper: Arc<CacheKeeper>,
    /// The agent's `--work-dir`: a job's own directory is under `jobs/`.
    pub work_dir: PathBuf,
    /// The connection of the current session (None between sessions), for
    /// the calls a preparation makes itself (FetchSync).
    pub controller: watch::Sender<Option<tonic::transport::Channel>>,
    /// Staged content fetched from and served to other nodes (`crate::peer`).
    pub peers: Arc<Peers>,
}

/// A node's progress on one input of a job's attempt, for the controller.
fn stage_progress(job_id: &str, attempt: u32, status: StageStatus) -> Outbound {
    let msg = StageProgress { job_id: job_id.to_owned(), attempt, status: Some(status) };
    Outbound::Message(AgentMessage { msg: Some(Msg::StageProgress(msg)) })
}

/// A job, its attempt and an input's name.
type DigestKey = (String, u32, String);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Preparer {
    /// Probes the node's default python once (at start-up) and keeps the report.
    pub async fn probe_at_startup(&self) {
        // As the user a job without `user:` runs as; the agent checked at start-up that it resolves.
        let identity = self.rank_users.check().ok();
        let python = Interpreter {
            python: &self.python,
            env: &self.node_env,
            identity: identity.as_ref(),
            helper: &self.helper,
            cwd: "/",
        };
        let report = preflight::probe_packages(&self.node_name, &python, PROBE_TIMEOUT).await;
        if !report.error.is_empty() {
            tracing::warn!(python = %self.python, error = %report.error, "preflight probe failed");
        } else {
            let broken: Vec<&str> = report.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
            tracing::info!(python = %self.python, missing = ?broken, "preflight probe done");
        }
        self.report.send_replace(Some(report.clone()));
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::Preflight(report)) })).await;
    }

    /// Runs [`Preparer::prepare`] as its own task, which [`Preparer::abort`] ends.
    pub fn spawn_prepare(&self, cmd: PrepareCommand) {
        let key = (cmd.job_id.clone(), cmd.attempt);
        // Registered before the task starts: the controller's digest for an
        // input may come before the task looks for it.
        let awaited: Vec<DigestKey> = cmd
            .stage
            .iter()
            .filter(|s| s.awaits_digest)
            .map(|s| (cmd.job_id.clone(), cmd.attempt, s.name.clone()))
            .collect();
        {
            let mut digests = lock(&self.digests);
            // An older attempt's waits are stale: dropped, they read the source.
            digests.retain(|(job, a, _), _| !(*job == cmd.job_id && *a < cmd.attempt));
            for key in &awaited {
                digests.insert(key.clone(), watch::channel(None).0);
            }
        }
        let preparer = self.clone();
        // Held while spawning: the task's own removal waits for its insertion.
        let mut preparing = lock(&self.preparing);
        let done = key.clone();
        let task = tokio::spawn(async move {
            preparer.prepare(cmd).await;
            lock(&preparer.preparing).remove(&done);
            let mut digests = lock(&preparer.digests);
            awaited.iter().for_each(|key| drop(digests.remove(key)));
        });
        preparing.insert(key, task.abort_handle());
    }

    /// The controller's answer for an input this node waits for (see
    /// [`Preparer::await_digests`]); one for no waiting preparation (it
    /// ended, or was aborted) is dropped.
    pub fn stage_digest(&self, digest: StageDigestCommand) {
        let key = (digest.job_id.clone(), digest.attempt, digest.item.clone());
        match lock(&self.digests).get(&key) {
            Some(waiting) => {
                waiting.send_replace(Some(digest));
            }
            None => tracing::debug!(job = %key.0, attempt = key.1, item = %key.2, "digest for no waiting preparation"),
        }
    }

    /// Ends the preparations of `job_id` up to `attempt` (the job was
    /// cancelled or failed elsewhere while this node was still preparing):
    /// dropping them kills their helpers, so a staging of a large model or a
    /// dataset check does not go on for a job that is over.
    pub fn abort(&self, job_id: &str, attempt: u32) {
        self.cache_keeper.unpin(job_id, attempt);
        lock(&self.digests).retain(|(job, a, _), _| !(job == job_id && *a <= attempt));
        lock(&self.preparing).retain(|(job, a), task| {
            let over = job == job_id && *a <= attempt;
            if over {
                tracing::info!(job = job_id, attempt = *a, "preparation aborted: the job is being stopped");
                task.abort();
            }
            !over
        });
    }

    pub async fn prepare(&self, mut cmd: PrepareCommand) {
        let mut result = PrepareResult { job_id: cmd.job_id.clone(), attempt: cmd.attempt, ..PrepareResult::default() };
        let mut report = PreflightReport { node_name: self.node_name.clone(), ..PreflightReport::default() };
        let identity = self.rank_users.resolve_blocking(&cmd.user).await;
        // The synced directory first: the probe, the check and the datasets run in it.
        if let (Ok(identity), Some(archive)) = (&identity, cmd.sync.clone()) {
            match self.sync_workdir(&cmd.job_id, &archive, identity).await {
                Ok(dir) => cmd.workdir = dir.to_string_lossy().into_owned(),
                Err(error) => {
                    result.error = error;
                    let _ =
                        self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::PrepareResult(result)) })).await;
                    return;
                }
            }
        }
        match &identity {
            Ok(identity) => {
                let python = if cmd.python.is_empty() { self.python.as_str() } else { cmd.python.as_str() };
                let env = self.job_env(&cmd.env);
                let python = Interpreter {
                    python,
                    env: &env,
                    identity: Some(identity),
                    helper: &self.helper,
                    cwd: &cmd.workdir,
                };
                let probe = async {
                    match cmd.probe_packages {
                        true => Some(preflight::probe_packages(&self.node_name, &python, PROBE_TIMEOUT).await),
                        false => None,
                    }
                };
                let argcheck = async {
                    match &cmd.swift_argcheck {
                        Some(check) => Some(preflight::swift_argcheck(&python, check, PROBE_TIMEOUT).await),
                        None => None,
                    }
                };
                let (probed, checked) = tokio::join!(probe, argcheck);
                if let Some(probed) = probed {
                    report = probed;
                }
                report.swift_argcheck = checked;
            }
            // The launch would be refused the same way: say it now, before anything runs.
            Err(e) => result.error = format!("preflight cannot run as the job's user: {e}"),
        }
        if !cmd.output_dir.is_empty() {
            report.checks.push(preflight::free_disk(Path::new(&cmd.output_dir)));
        }
        report.checks.push(preflight::shm_size());
        if cmd.node_rank == 0 && cmd.master_port > 0 {
            report.checks.push(preflight::port_free(cmd.master_port as u16));
        }
        for name in &cmd.interfaces {
            report.checks.push(preflight::interface(name));
        }
        result.preflight = Some(report);
        // Everything the job names is touched as the job's user, or not at all.
        if let Ok(identity) = &identity {
            let user = AsJobUser { identity, helper: &self.helper };
            result.shared_paths = self.check_shared(&cmd, user).await;
            result.datasets = self.check_datasets(&cmd, user).await;
            match self.stage(&cmd, user).await {
                Ok(staged) => result.staged = staged,
                Err(e) => result.error = e,
            }
        }
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::PrepareResult(result)) })).await;
    }

    /// Fetches the job's `sync:` archive from the controller and unpacks it,
    /// as the job's user, into the agent's directory for the job (where the
    /// launch starts the processes); returns that directory.
    async fn sync_workdir(
        &self,
        job_id: &str,
        archive: &cohort_proto::SyncArchive,
        identity: &crate::rank_user::RankIdentity,
    ) -> Result<PathBuf, String> {
        let dir = crate::supervisor::job_workdir(&self.work_dir, job_id, identity)
            .map_err(|e| format!("cannot make the job's directory for its sync archive: {e}"))?;
        let channel = self.controller.borrow().clone().ok_or_else(|| {
            "no connection to the controller to fetch the job's sync archive from; it is tried again with the next attempt"
                .to_owned()
        })?;
        let mut client =
            cohort_proto::agent_service_client::AgentServiceClient::new(channel).max_decoding_message_size(2 << 20);
        let request = cohort_proto::FetchSyncRequest { job_id: job_id.to_owned(), sha256: archive.sha256.clone() };
        let chunks = client
            .fetch_sync(request)
            .await
            .map_err(|status| format!("cannot fetch the job's sync archive: {}", status.message()))?
            .into_inner();
        use futures::StreamExt as _;
        let body: crate::job_files::BodyStream =
            Box::pin(chunks.map(|chunk| chunk.map(|c| c.data).map_err(|status| status.message().to_owned())));
        let started = std::time::Instant::now();
        let user = AsJobUser { identity, helper: &self.helper };
        let fresh = user.unpack_sync(&dir, archive, body).await.map_err(|e| e.to_string())?;
        tracing::info!(
            job = job_id,
            sha256 = %archive.sha256,
            bytes = archive.bytes,
            files = archive.files,
            fresh,
            elapsed = ?started.elapsed(),
            "sync archive in place"
        );
        Ok(dir)
    }

    /// The environment the job's interpreter gets for preflight: the job's
    /// processes' (the node's own when the controller sent none).
    fn job_env(&self, env: &[EnvVar]) -> Vec<(String, String)> {
        if env.is_empty() {
            return self.node_env.clone();
        }
        // Without the variables the launch sweep finds a job's processes by: a
        // probe is no rank, and another agent on this host must not kill it.
        env.iter().filter(|v| !SWEPT_BY.contains(&v.name.as_str())).map(|v| (v.name.clone(), v.value.clone())).collect()
    }

    /// `cohort plan --check`: the node's ms-swift on a command line, nothing prepared or launched.
    pub async fn check_swift_args(&self, command_id: u64, cmd: SwiftArgcheckCommand) {
        let mut answer = QueryResult { command_id, ..QueryResult::default() };
        match (self.rank_users.resolve_blocking(&cmd.user).await, &cmd.check) {
            (Ok(identity), Some(check)) => {
                let env = self.job_env(&cmd.env);
                let python = Interpreter {
                    python: if cmd.python.is_empty() { &self.python } else { &cmd.python },
                    env: &env,
                    identity: Some(&identity),
                    helper: &self.helper,
                    cwd: &cmd.workdir,
                };
                let result = preflight::swift_argcheck(&python, check, PROBE_TIMEOUT).await;
                answer.result = Some(QueryAnswer::SwiftArgcheck(result));
            }
            (Err(e), _) => answer.error = format!("cannot run as the job's user: {e}"),
            (Ok(_), None) => answer.error = "the request names no command line to check".into(),
        }
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(answer)) })).await;
    }

    /// Node rank 0 writes `marker` into each path; every other node must read it back.
    async fn check_shared(&self, cmd: &PrepareCommand, user: AsJobUser<'_>) -> Vec<SharedPathCheck> {
        let mut checks = Vec::new();
        for path in &cmd.shared_paths {
            let dir = Path::new(path);
            let file = dir.join(format!(".cohort-shared-check-{}", cmd.marker));
            let check = if cmd.node_rank == 0 {
                let written = user.write_marker(dir, &file, &cmd.marker).await;
                if written.is_ok() {
                    // Removed once the readers have had their time.
                    let (identity, helper) = (user.identity.clone(), user.helper.to_owned());
                    tokio::spawn(async move {
                        tokio::time::sleep(MARKER_WAIT * 2).await;
                        let user = AsJobUser { identity: &identity, helper: &helper };
                        if let Err(e) = user.remove_marker(&file).await {
                            tracing::warn!(error = %e, "shared-path marker left behind");
                        }
                    });
                }
                SharedPathCheck {
                    path: path.clone(),
                    writer: true,
                    ok: written.is_ok(),
                    detail: written.err().map(|e| e.to_string()).unwrap_or_default(),
                }
            } else {
                let read = user.read_marker(&file, &cmd.marker, MARKER_WAIT).await;
                SharedPathCheck {
                    path: path.clone(),
                    writer: false,
                    ok: read.is_ok(),
                    detail: read.err().map(|e| e.to_string()).unwrap_or_default(),
                }
            };
            checks.push(check);
        }
        checks
    }

    /// Node rank 0 checks every row of each dataset, as the job's user, in a
    /// helper with time and memory limits ([`crate::job_files`]).
    async fn check_datasets(&self, cmd: &PrepareCommand, user: AsJobUser<'_>) -> Vec<DatasetSummary> {
        if cmd.node_rank != 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for dataset in &cmd.datasets {
            let path = if dataset.starts_with('/') || cmd.workdir.is_empty() {
                PathBuf::from(dataset)
            } else {
                Path::new(&cmd.workdir).join(dataset)
            };
            let summary = match user.check_dataset(&path).await {
                Ok(report) => DatasetSummary {
                    path: dataset.clone(),
                    format: format!("{:?}", report.format),
                    rows: report.stats.rows as u64,
                    bad_rows: report.invalid_rows() as u64,
                    ok: report.is_ok(),
                    report: report.render(),
                },
                Err(e) => {
                    DatasetSummary { path: dataset.clone(), ok: false, report: e.to_string(), ..Default::default() }
                }
            };
            out.push(summary);
        }
        out
    }

    async fn stage(&self, cmd: &PrepareCommand, user: AsJobUser<'_>) -> Result<Vec<StagedInput>, String> {
        if cmd.stage.is_empty() {
            return Ok(Vec::new());
        }
        let mut items: Vec<StageItem> = cmd
            .stage
            .iter()
            .map(|s| {
                Ok(StageItem {
                    name: s.name.clone(),
                    source: s.source.clone(),
                    sha256: (!s.sha256.is_empty()).then(|| s.sha256.clone()),
                    model: hub_model(s)?,
                })
            })
            .collect::<Result<_, String>>()?;
        let cache = user_cache(self.stager.cache_dir(), user.identity);
        let mut from_peers: HashMap<String, Fetched> = HashMap::new();
        let mut announced = HashMap::new();
        // Inputs without a digest that another node reads come, once it knows
        // their digest, from it and the other waiting nodes, as inputs with one.
        let inputs = self.await_digests(cmd).await;
        if let Ok(cache) = &cache {
            // Inputs other nodes hold or stage now come from them (a
            // directory, a file or a URL alike); what they cannot serve is
            // read from the source below.
            let wanted = inputs.iter().filter(|s| !s.peers.is_empty() && !is_cached(cache, &s.sha256));
            let fetches = wanted.map(|s| {
                let digest = s.sha256.trim().to_ascii_lowercase();
                let report = move |bytes_done: u64, files_done: u32| {
                    let status = StageStatus {
                        node_name: self.node_name.clone(),
                        item: s.name.clone(),
                        bytes_done,
                        files_done,
                        state: "copying".into(),
                        detail: "from other nodes".into(),
                        ..StageStatus::default()
                    };
                    // Progress is advisory: dropped rather than waited for when the queue is full.
                    let _ = self.out.try_send(stage_progress(&cmd.job_id, cmd.attempt, status));
                };
                async move {
                    let fetched = self.peers.fetch(&cmd.user, user, cache, &digest, &s.peers, &report).await;
                    (s.name.clone(), fetched)
                }
            });
            for (name, fetched) in futures::future::join_all(fetches).await {
                match fetched {
                    Ok(fetched) => {
                        tracing::info!(job = %cmd.job_id, item = %name, bytes = fetched.bytes, pieces = fetched.pieces, "fetched from peers");
                        from_peers.insert(name, fetched);
                    }
                    Err(error) => {
                        tracing::warn!(job = %cmd.job_id, item = %name, %error, "peers could not serve it; reading the source")
                    }
                }
            }
            // A digest learnt from another node is this node's to check only
            // when the content came from peers or was here: otherwise the
            // source is read as for any input without a digest.
            for (item, input) in items.iter_mut().zip(&inputs) {
                if item.sha256.is_none()
                    && !input.sha256.is_empty()
                    && (from_peers.contains_key(&input.name) || is_cached(cache, &input.sha256))
                {
                    item.sha256 = Some(input.sha256.clone());
                }
            }
            // What is read from the source is offered to the peers file by file.
            let offered = cmd.stage.iter().filter(|s| s.sha256.trim().len() == 64);
            for s in offered.filter(|s| !from_peers.contains_key(&s.name) && !is_cached(cache, &s.sha256)) {
                let digest = s.sha256.trim().to_ascii_lowercase();
                if let Some(a) = self.peers.announce(cache, &digest) {
                    announced.insert(s.name.clone(), (a, digest));
                }
            }
        }
        let (tx, mut rx) = mpsc::channel::<crate::stage::StageProgress>(256);
        let out = self.out.clone();
        let (job_id, attempt, node) = (cmd.job_id.clone(), cmd.attempt, self.node_name.clone());
        // A large file is offered in pieces once they are hashed (read back as
        // the user, beside the copy), so that peers fetch and pass on its
        // pieces while it is still coming to them.
        let hash_as = match &cache {
            Ok(cache) => Some((user.identity.clone(), user.helper.to_owned(), cache.clone())),
            Err(_) => None,
        };
        // Dropped with the preparation (aborted: the job is being stopped),
        // it takes the piece hashing it runs, and the helpers, with it.
        let mut forward = crate::peer::AbortOnDrop(tokio::spawn(async move {
            let mut hashing = tokio::task::JoinSet::new();
            let hashers = Arc::new(tokio::sync::Semaphore::new(4));
            while let Some(p) = rx.recv().await {
                if let Some((a, _)) = announced.get(&p.item) {
                    a.announcer().read(p.bytes_done);
                }
                if let (Some(file), Some((a, digest))) = (&p.file, announced.get(&p.item)) {
                    let whole = cohort_proto::ContentFile {
                        path: file.path.clone(),
                        size: file.size,
                        sha256: file.sha256.clone(),
                        ..Default::default()
                    };
                    let announcer = a.announcer();
                    let piece_bytes = announcer.piece_bytes();
                    match &hash_as {
                        Some((identity, helper, cache)) if file.size > piece_bytes => {
                            let (identity, helper, cache, digest) =
                                (identity.clone(), helper.clone(), cache.clone(), digest.clone());
                            let hashers = hashers.clone();
                            hashing.spawn(async move {
                                let _slot = hashers.acquire_owned().await;
                                let user = AsJobUser { identity: &identity, helper: &helper };
                                let rel = std::path::Path::new(&whole.path);
                                match user.piece_digests(&cache, &digest, rel, piece_bytes, &whole.sha256).await {
                                    Ok(Some(digests)) => announcer.file(cohort_proto::ContentFile {
                                        piece_bytes,
                                        piece_sha256: digests,
                                        ..whole
                                    }),
                                    // Offered whole: peers fetch it in one piece.
                                    other => {
                                        if let Err(e) = other {
                                            tracing::warn!(file = %whole.path, error = %e, "cannot hash a file's pieces; peers fetch it whole");
                                        }
                                        announcer.file(whole);
                                    }
                                }
                            });
                        }
                        _ => announcer.file(whole),
                    }
                }
                let (state, detail) = match &p.state {
                    StageState::Checking => ("checking", String::new()),
                    StageState::Copying => ("copying", String::new()),
                    StageState::Verifying => ("verifying", String::new()),
                    StageState::Ready => ("ready", String::new()),
                    StageState::Cached => ("cached", String::new()),
                    StageState::Failed(e) => ("failed", e.clone()),
                };
                let status = StageStatus {
                    node_name: node.clone(),
                    item: p.item,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total.unwrap_or(0),
                    files_done: p.files_done,
                    files_total: p.files_total,
                    state: state.into(),
                    detail,
                    sha256: p.sha256.unwrap_or_default(),
                    path: p.path.unwrap_or_default(),
                    ..StageStatus::default()
                };
                let finished = !status.sha256.is_empty();
                let msg = stage_progress(&job_id, attempt, status);
                if finished {
                    // Other nodes may wait for this digest: worth a short wait for room
                    // (it also comes with the PrepareResult, after the rest of the preparation).
                    let _ = out.send_timeout(msg, FINISHED_SEND_WAIT).await;
                } else {
                    // Progress is advisory: drop it rather than wait when the queue is full.
                    let _ = out.try_send(msg);
                }
            }
            while hashing.join_next().await.is_some() {}
            announced
        }));
        let staging = self.cache_keeper.staging().await;
        let staged = user.stage(self.stager.cache_dir(), self.stager.parallel_files(), items, tx).await;
        if staged.is_err() {
            // Nothing to offer: the failure is not held up by hashing pieces of what was copied.
            forward.0.abort();
        }
        if let Ok(announced) = (&mut forward.0).await
            && let (Ok(staged), Ok(cache)) = (&staged, &cache)
        {
            // A file (or URL) read here is offered whole once complete, not
            // file by file: super-seeded from before its peers hear of it.
            let files = staged.iter().filter(|s| announced.contains_key(&s.name) && !s.from_cache);
            for s in files.filter(|s| s.path.file_name().is_none_or(|n| *n != *s.sha256)) {
                self.peers.seed_complete(user, cache, &s.sha256).await;
            }
            announced.into_values().for_each(|(a, _)| a.complete());
        }
        if let (Ok(staged), Ok(cache)) = (&staged, &cache) {
            // An input without a digest just read from its source: nodes
            // waiting for it fetch it from here now, super-seeded.
            let read_here = staged.iter().filter(|s| {
                let unpinned = cmd.stage.iter().any(|i| i.name == s.name && i.sha256.trim().is_empty());
                unpinned && !s.from_cache && !from_peers.contains_key(&s.name)
            });
            for s in read_here {
                self.peers.seed_complete(user, cache, &s.sha256).await;
            }
        }
        if let (Ok(staged), Ok(cache)) = (&staged, cache) {
            let digests = staged.iter().map(|s| s.sha256.clone()).collect();
            self.cache_keeper.pin(&cmd.job_id, cmd.attempt, cache.clone(), digests);
            drop(staging);
            self.cache_keeper.collect().await;
        }
        match staged {
            Ok(staged) => Ok(staged
                .into_iter()
                .map(|s| {
                    let fetched = from_peers.remove(&s.name).unwrap_or_default();
                    StagedInput {
                        path: s.path.display().to_string(),
                        sha256: s.sha256,
                        bytes: s.bytes,
                        // Fetched from peers just now is not "found in the cache".
                        from_cache: s.from_cache && fetched.bytes == 0,
                        error: String::new(),
                        hub_cache: s.hub_cache.map(|p| p.display().to_string()).unwrap_or_default(),
                        bytes_from_peers: fetched.bytes,
                        corrupt_peers: fetched.corrupt_peers,
                        name: s.name,
                    }
                })
                .collect()),
            Err(e) => Err(format!("staging failed: {e}")),
        }
    }

    /// Waits, for each input that another node of the attempt reads from the
    /// source (`awaits_digest`), for the digest that node found and the peers
    /// to fetch it from. Returns the job's inputs with what was learnt; an
    /// answer without a digest leaves the input to be read from the source.
    async fn await_digests(&self, cmd: &PrepareCommand) -> Vec<StageInput> {
        let waits = cmd.stage.iter().map(|s| async move {
            let mut input = s.clone();
            if !s.awaits_digest || !s.sha256.is_empty() {
                return input;
            }
            let key = (cmd.job_id.clone(), cmd.attempt, s.name.clone());
            let Some(mut answer) = lock(&self.digests).get(&key).map(watch::Sender::subscribe) else { return input };
            let status = StageStatus {
                node_name: self.node_name.clone(),
                item: s.name.clone(),
                state: "waiting".into(),
                detail: "for the node reading the source".into(),
                ..StageStatus::default()
            };
            // Progress is advisory: dropped rather than waited for when the queue is full.
            let _ = self.out.try_send(stage_progress(&cmd.job_id, cmd.attempt, status));
            // The sender goes only with the preparation (or a newer attempt): then read the source.
            if let Ok(found) = answer.wait_for(Option::is_some).await
                && let Some(found) = found.as_ref()
            {
                tracing::info!(job = %cmd.job_id, item = %s.name, sha256 = %found.sha256, peers = found.peers.len(), "digest found by another node");
                input.sha256 = found.sha256.clone();
                input.peers = found.peers.clone();
            }
            input
        });
        futures::future::join_all(waits).await
    }

    /// Searches as the job's user (`cmd.user`, else the node's rank-user),
    /// through the `files-as` helper: a save directory that links into a
    /// directory only root may write never gets its tracker rewritten by root.
    pub async fn find_checkpoint(&self, command_id: u64, cmd: FindCheckpointCommand) {
        let mut answer = QueryResult { command_id, ..QueryResult::default() };
        let directory = PathBuf::from(&cmd.directory);
        match self.rank_users.resolve_blocking(&cmd.user).await {
            Err(e) => answer.error = e.to_string(),
            Ok(identity) => {
                match (AsJobUser { identity: &identity, helper: &self.helper }).find_checkpoint(&directory).await {
                    Ok(found) => {
                        let checkpoint =
                            found.checkpoint.map(|(iteration, path, layout)| Checkpoint { iteration, path, layout });
                        answer.result =
                            Some(QueryAnswer::Checkpoint(CheckpointAnswer { checkpoint, skipped: found.skipped }));
                    }
                    Err(e) => answer.error = e.to_string(),
                }
            }
        }
        let _ = self.out.send(Outbound::Message(AgentMessage { msg: Some(Msg::QueryResult(answer)) })).await;
    }
}

/// Whether content `sha256` is in `cache` (a user's cache): a directory's
/// manifest, or a file's content directory, is there. Only names are looked
/// up, nothing read.
fn is_cached(cache: &Path, sha256: &str) -> bool {
    let hex = sha256.trim().to_ascii_lowercase();
    let content = cache.join("sha256");
    hex.len() == 64
        && (std::fs::symlink_metadata(content.join(format!("{hex}.manifest"))).is_ok()
            || std::fs::symlink_metadata(content.join(&hex)).is_ok())
}

/// The hub model of a stage input (None when it names none).
fn hub_model(input: &cohort_proto::StageInput) -> Result<Option<HubModel>, String> {
    if input.model.is_empty() {
        return Ok(None);
    }
    let layout = if input.layout.is_empty() { "modelscope" } else { input.layout.as_str() };
    let layout = cohort_shared::spec::HubLayout::parse(layout).ok_or_else(|| {
        format!("stage item {}: layout {:?} is neither modelscope nor huggingface", input.name, input.layout)
    })?;
    Ok(Some(HubModel { id: input.model.clone(), layout }))
}
