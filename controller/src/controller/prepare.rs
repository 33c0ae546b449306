//! Between placement and launch: every node of the attempt runs preflight,
//! proves shared paths shared, checks datasets and stages inputs; the
//! controller launches only when every node is ready and they agree, and
//! otherwise refuses with the table. Also: training metrics, resume from the
//! newest checkpoint, `cohort doctor`, and queries answered by agents.

use std::collections::{BTreeMap, BTreeSet};

use cohort_proto::{
    DatasetSummary, MetricsBatch, PreflightReport, PreflightTable, PrepareResult, QueryResult, StageProgress,
    query_result::Result as QueryAnswer,
};
use cohort_shared::spec::DatasetPolicy;

use super::job_entry::AwaitedDigest;
use super::restart::skipped_note;
use super::swift_check;
use super::*;

/// Packages a megatron-sft launch needs on every node (transformer_engine only
/// where the job uses its layers: [`swift_check::needs_transformer_engine`]).
const REQUIRED_PACKAGES: &[&str] = &["python", "torch", "transformer_engine.pytorch", "megatron.core", "swift"];
/// The check that only jobs on transformer_engine's layers require.
const TRANSFORMER_ENGINE: &str = "transformer_engine.pytorch";
/// Checks whose values must agree across the nodes of a job.
const SAME_EVERYWHERE: &[&str] =
    &["python", "torch", "torch.cuda", "nccl", "transformer_engine", "flash_attn", "apex", "megatron.core", "swift"];
/// How long a query to an agent may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

impl Controller {
    /// What every node of the attempt must check before launch.
    pub(super) fn send_prepare(&self, state: &mut State, id: &str) {
        let Some(attempt) = state.jobs.get(id).map(|e| e.job.attempt) else { return };
        let marker = format!("{}-{}-{:08x}", id, attempt, rand::random::<u32>());
        let Some(mut launch_plan) = Self::launch_plan(state, id, Some(&marker)) else { return };
        self.add_content_peers(state, id, attempt, &mut launch_plan);
        for node in launch_plan.nodes {
            let Some(command) = node.prepare else { continue };
            let node_rank = command.node_rank;
            if !Self::send_command(state, &node.node_name, Command::Prepare(command)) {
                let message = format!("node {} dropped its stream while the job was being prepared", node.node_name);
                self.fail(
                    state,
                    id,
                    super::restart::with_cause(
                        Failure { node_name: node.node_name, node_rank, message, ..Failure::default() },
                        cohort_shared::failure::FailureCause::NodeLost,
                    ),
                );
                self.persist_job(state, id);
                return;
            }
        }
    }

    /// Names, in each input with a digest, the nodes each node of the
    /// attempt fetches it from (none: it reads the source), see `content`.
    /// Of an input without one (a directory, a file or a URL), the
    /// first `--max-source-pulls` nodes read the source and the others wait
    /// for the digest they find (`awaits_digest`, answered by
    /// [`Self::answer_digests`]), then fetch it from them and each other.
    fn add_content_peers(&self, state: &mut State, id: &str, attempt: u32, plan: &mut planner::LaunchPlan) {
        let gang: Vec<String> = plan.nodes.iter().map(|n| n.node_name.clone()).collect();
        let Some(first) = plan.nodes.iter().find_map(|n| n.prepare.as_ref()) else { return };
        let user = first.user.clone();
        let digests: Vec<String> =
            first.stage.iter().map(|s| s.sha256.trim().to_ascii_lowercase()).filter(|d| d.len() == 64).collect();
        let unpinned: Vec<String> =
            first.stage.iter().filter(|s| s.sha256.trim().is_empty()).map(|s| s.name.clone()).collect();
        for digest in digests {
            let peers = self.content_peers(state, (&user, &digest), &gang, (id, attempt));
            for node in &mut plan.nodes {
                let Some(command) = node.prepare.as_mut() else { continue };
                let peers = peers.get(&node.node_name).cloned().unwrap_or_default();
                for input in command.stage.iter_mut().filter(|s| s.sha256.trim().eq_ignore_ascii_case(&digest)) {
                    input.peers = peers.clone();
                }
            }
        }
        // Nodes that serve no peers read the source themselves.
        let serving: Vec<String> =
            gang.iter().filter(|n| state.nodes.get(*n).is_some_and(|n| n.peer_address().is_some())).cloned().collect();
        let readers: Vec<String> = serving.iter().take(self.config.max_source_pulls.max(1)).cloned().collect();
        let waiting: Vec<String> = serving.iter().skip(readers.len()).cloned().collect();
        let mut awaited = Vec::new();
        if !waiting.is_empty() {
            for item in unpinned {
                for node in plan.nodes.iter_mut().filter(|n| waiting.contains(&n.node_name)) {
                    let Some(command) = node.prepare.as_mut() else { continue };
                    command.stage.iter_mut().filter(|s| s.name == item).for_each(|s| s.awaits_digest = true);
                }
                let (readers, waiting) = (readers.clone(), waiting.clone());
                awaited.push(AwaitedDigest { attempt, item, user: user.clone(), readers, waiting });
            }
        }
        if let Some(entry) = state.jobs.get_mut(id) {
            entry.awaited_digests = awaited;
        }
    }

    /// The peers each of `nodes` fetches content `key` (user, digest) from,
    /// recording them as staging it for `attempt`; a node without peers reads
    /// the source.
    fn content_peers(
        &self,
        state: &mut State,
        key: (&str, &str),
        nodes: &[String],
        attempt: (&str, u32),
    ) -> BTreeMap<String, Vec<cohort_proto::ContentPeer>> {
        let mut assigned = {
            let (all, jobs) = (&state.nodes, &state.jobs);
            let live = |n: &str| all.get(n).is_some_and(|n| n.peer_address().is_some());
            let current = |job: &str, attempt: u32| {
                jobs.get(job).is_some_and(|e| e.job.attempt == attempt && e.phase() == JobPhase::Preparing)
            };
            state.content.assign(key, nodes, attempt, self.config.max_source_pulls, live, current)
        };
        let label = self.config.topology_label.as_str();
        if !label.is_empty() {
            let rack = |node: &str| state.nodes.get(node)?.info.labels.get(label).filter(|v| !v.is_empty()).cloned();
            super::content::localize(&mut assigned, rack);
        }
        assigned
            .into_iter()
            .map(|(node, peers)| {
                let peers = peers
                    .iter()
                    .filter_map(|peer| {
                        let address = state.nodes.get(peer)?.peer_address()?;
                        Some(cohort_proto::ContentPeer { node_name: peer.clone(), address })
                    })
                    .collect();
                (node, peers)
            })
            .collect()
    }

    /// A node that reads inputs without `sha256` for the nodes waiting on
    /// them reported (`outcome` of an input: nothing yet, its digest, or
    /// `None`: it failed it): each waiting node is sent the digest it found
    /// and the peers to fetch it from (that node, which now holds it, and the
    /// other waiting nodes). When every reader of an input failed it, the
    /// waiting nodes are told to read the source themselves (an empty digest).
    fn answer_digests(
        &self,
        state: &mut State,
        (id, attempt): (&str, u32),
        node: &str,
        outcome: impl Fn(&str) -> Option<Option<String>>,
    ) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        let mut answers = Vec::new();
        entry.awaited_digests.retain_mut(|awaited| {
            if awaited.attempt != attempt || !awaited.readers.iter().any(|r| r == node) {
                return true;
            }
            let digest = match outcome(&awaited.item) {
                None => return true,
                Some(Some(digest)) if super::node_caches::is_hex_digest(&digest) => digest,
                Some(_) => {
                    awaited.readers.retain(|r| r != node);
                    if !awaited.readers.is_empty() {
                        return true; // Another reader may still find it.
                    }
                    String::new()
                }
            };
            answers.push((awaited.clone(), digest));
            false
        });
        for (awaited, digest) in answers {
            let mut peers = BTreeMap::new();
            if !digest.is_empty() {
                state.content.held(node, &awaited.user, &digest);
                peers = self.content_peers(state, (&awaited.user, &digest), &awaited.waiting, (id, awaited.attempt));
            }
            tracing::info!(job = %id, item = %awaited.item, %node, sha256 = %digest, waiting = awaited.waiting.len(), "digest of an input without sha256 found");
            for waiting in &awaited.waiting {
                let command = cohort_proto::StageDigestCommand {
                    job_id: id.to_owned(),
                    attempt: awaited.attempt,
                    item: awaited.item.clone(),
                    sha256: digest.clone(),
                    peers: peers.get(waiting).cloned().unwrap_or_default(),
                };
                // A node whose stream dropped is lost to the attempt anyway.
                Self::send_command(state, waiting, Command::StageDigest(command));
            }
        }
    }

    pub async fn prepare_result(&self, node: &str, result: PrepareResult) {
        let node = node.to_string();
        self.state.call(move |state, ctl| ctl.prepared(state, &node, result)).await
    }

    /// [`Self::prepare_result`] on the state: the last node's result launches or refuses the attempt.
    fn prepared(&self, state: &mut State, node: &str, result: PrepareResult) {
        let id = result.job_id.clone();
        let Some(entry) = state.jobs.get_mut(&id) else { return };
        if entry.job.attempt != result.attempt || entry.phase() != JobPhase::Preparing || !entry.on_node(node) {
            return;
        }
        state.content.prepared(node, (&id, result.attempt), &result.staged);
        let staged = |item: &str| {
            let found = result.staged.iter().find(|s| s.name == item && s.error.is_empty());
            Some(found.map(|s| s.sha256.clone()))
        };
        self.answer_digests(state, (&id, result.attempt), node, staged);
        let Some(entry) = state.jobs.get_mut(&id) else { return };
        // The staged paths become the node's COHORT_STAGED_* variables at launch (planner::launch_plan).
        for staged in &result.staged {
            let status = cohort_proto::StageStatus {
                node_name: node.into(),
                item: staged.name.clone(),
                bytes_done: staged.bytes,
                bytes_total: staged.bytes,
                state: if staged.from_cache { "cached".into() } else { "ready".into() },
                path: staged.path.clone(),
                hub_cache: staged.hub_cache.clone(),
                bytes_from_peers: staged.bytes_from_peers,
                corrupt_peers: staged.corrupt_peers.clone(),
                sha256: staged.sha256.clone(),
                ..Default::default()
            };
            upsert_stage(&mut entry.job, status);
        }
        entry.job.datasets.extend(result.datasets.iter().cloned());
        entry.prepared.insert(node.to_string(), result);
        let expected = entry.plan().map(|p| p.nodes.len()).unwrap_or(0);
        let done = entry.prepared.len() >= expected;
        let message = format!("node {node} prepared ({}/{expected})", entry.prepared.len());
        if done {
            let problems = evaluate(entry);
            let reports: Vec<PreflightReport> = entry
                .plan()
                .map(|p| {
                    p.nodes
                        .iter()
                        .filter_map(|a| entry.prepared.get(&a.node_name))
                        .filter_map(|r| r.preflight.clone())
                        .collect()
                })
                .unwrap_or_default();
            entry.job.preflight = Some(PreflightTable { nodes: reports, problems: problems.clone() });
            if problems.is_empty() {
                if let Err(e) = self.send_launch(state, &id) {
                    tracing::error!(job = %id, error = %e, "launch after preparation failed");
                }
            } else {
                let more = if problems.len() > 1 {
                    format!(" (and {} more: `cohort status`)", problems.len() - 1)
                } else {
                    String::new()
                };
                let message = format!("refused before launch: {}{more}", problems[0]);
                let failure = super::restart::with_cause(
                    Failure { message, decisive_lines: problems.clone(), ..Failure::default() },
                    cohort_shared::failure::FailureCause::PreflightFailed,
                );
                self.fail(state, &id, failure);
                self.persist_job(state, &id);
            }
        }
        self.publish(state, &id, &message);
        self.wake.notify_one();
    }

    /// A node's progress on one input (as the node's session names it).
    pub async fn stage_progress(&self, node: &str, progress: StageProgress) {
        let node = node.to_owned();
        self.state
            .call(move |state, ctl| {
                let Some(entry) = state.jobs.get_mut(&progress.job_id) else { return };
                if entry.job.attempt != progress.attempt || !entry.on_node(&node) {
                    return;
                }
                if let Some(mut status) = progress.status {
                    status.node_name = node.clone();
                    let item = status.item.clone();
                    if status.state == "waiting"
                        && let Some(awaited) = entry.awaited_digests.iter().find(|a| a.item == item)
                    {
                        status.detail = format!("for {} to read the source", awaited.readers.join(", "));
                    }
                    let outcome = match status.state.as_str() {
                        "ready" | "cached" => Some(Some(status.sha256.clone())),
                        "failed" => Some(None),
                        _ => None,
                    };
                    upsert_stage(&mut entry.job, status);
                    if let Some(outcome) = outcome {
                        let attempt = (progress.job_id.as_str(), progress.attempt);
                        ctl.answer_digests(
                            state,
                            attempt,
                            &node,
                            |i| if i == item { Some(outcome.clone()) } else { None },
                        );
                    }
                    ctl.publish(state, &progress.job_id, "staging");
                }
            })
            .await
    }

    pub async fn node_preflight(&self, node: &str, report: PreflightReport) {
        let node = node.to_string();
        self.state
            .call(move |state, _| {
                if let Some(entry) = state.nodes.get_mut(&node) {
                    entry.preflight = Some(report);
                }
            })
            .await
    }

    pub async fn metrics(&self, batch: MetricsBatch) {
        let points = batch.points.clone();
        let newest = self.metrics.append(&batch.job_id, batch.attempt, batch.points).await;
        let (job_id, attempt) = (batch.job_id, batch.attempt);
        self.state
            .call(move |state, ctl| {
                if let Some(entry) = state.jobs.get_mut(&job_id) {
                    for point in &points {
                        Self::iteration_seen(entry, attempt, point);
                    }
                }
                if let (Some(newest), Some(entry)) = (newest, state.jobs.get_mut(&job_id)) {
                    entry.job.progress = Some(newest);
                    ctl.publish(state, &job_id, "metrics");
                }
            })
            .await
    }

    /// Every Ready node's last preflight report, with what disagrees.
    pub async fn doctor(&self) -> PreflightTable {
        self.state.call(|state, _| Self::preflight_table(state)).await
    }

    fn preflight_table(state: &State) -> PreflightTable {
        let reports: Vec<PreflightReport> = state
            .nodes
            .values()
            .filter(|n| n.phase() == NodePhase::Ready)
            .map(|n| {
                n.preflight.clone().unwrap_or_else(|| PreflightReport {
                    node_name: n.info.name.clone(),
                    error: "no report yet (the probe runs at agent start-up)".into(),
                    ..Default::default()
                })
            })
            .collect();
        let problems = doctor_problems(&reports);
        PreflightTable { nodes: reports, problems }
    }

    /// Starts a new attempt of a finished job from the newest complete
    /// checkpoint in its checkpoint directory (a megatron-sft job's output
    /// directory, a command job's `checkpoints:`), found by an agent. Refused
    /// while the last attempt's processes are still being stopped: the new
    /// attempt would be placed on GPUs they still hold.
    pub async fn resume(&self, job_ref: &str) -> Result<Job, ControllerError> {
        let job_ref = job_ref.to_string();
        let (id, node, directory, rx) = self
            .state
            .call(move |state, ctl| {
                let entry = Self::resolve(state, &job_ref)?;
                let id = entry.job.id.clone();
                if matches!(entry.spec.workload, Workload::Pipeline(_)) {
                    return Err(ControllerError::FailedPrecondition(format!(
                        "job {id} is a pipeline; resume the stage job that failed (`{id}.<stage>`)"
                    )));
                }
                if !matches!(entry.phase(), JobPhase::Failed | JobPhase::Cancelled) {
                    return Err(ControllerError::FailedPrecondition(format!(
                        "job {id} is {}; only a Failed or Cancelled job can be resumed",
                        state_name(entry.job.state)
                    )));
                }
                if entry.job.live_processes > 0 {
                    return Err(ControllerError::FailedPrecondition(format!(
                        "job {id}'s last attempt still has {} process(es) being stopped; resume it once they are \
                         gone (`cohort cancel {id} --wait` returns then)",
                        entry.job.live_processes
                    )));
                }
                let Some(directory) = planner::checkpoint_dir(&entry.spec) else {
                    let fix = match entry.spec.workload {
                        Workload::Command(_) => "a command job declares `checkpoints: /shared/dir` to be resumed",
                        _ => "give megatron.save (or output_dir) as an absolute path",
                    };
                    return Err(ControllerError::FailedPrecondition(format!(
                        "job {id} names no absolute directory to look for checkpoints in: {fix}"
                    )));
                };
                let Some((rx, node)) = ctl.find_checkpoint(state, &id) else {
                    return Err(ControllerError::FailedPrecondition(format!(
                        "no node is connected to look for checkpoints in {directory}"
                    )));
                };
                Ok((id, node, directory, rx))
            })
            .await?;
        let answer =
            super::queries::answer_of(&node, rx, QUERY_TIMEOUT).await.map_err(ControllerError::FailedPrecondition)?;
        let (checkpoint, skipped) = match answer {
            Some(QueryAnswer::Checkpoint(c)) => (c.checkpoint, c.skipped),
            Some(QueryAnswer::Path(_) | QueryAnswer::SwiftArgcheck(_) | QueryAnswer::Cache(_)) | None => {
                (None, Vec::new())
            }
        };
        let Some(checkpoint) = checkpoint else {
            return Err(ControllerError::FailedPrecondition(format!(
                "no complete checkpoint in {directory} (looked on {node}){}",
                skipped_note(&skipped)
            )));
        };

        let (id, stored) = self
            .state
            .call(move |state, ctl| {
                let Some(entry) = state.jobs.get_mut(&id) else { return Err(ControllerError::JobNotFound(id)) };
                if !matches!(entry.phase(), JobPhase::Failed | JobPhase::Cancelled) || entry.job.live_processes > 0 {
                    return Err(ControllerError::FailedPrecondition(format!("job {id} changed state meanwhile")));
                }
                let reason = format!(
                    "resuming from iteration {} ({}){}",
                    checkpoint.iteration,
                    checkpoint.path,
                    skipped_note(&skipped)
                );
                entry.resume(checkpoint, reason)?;
                let stored = ctl.persist_job(state, &id);
                ctl.publish(state, &id, "resume requested");
                tracing::info!(job = %id, "resume requested");
                ctl.wake.notify_one();
                Ok((id, stored))
            })
            .await?;
        stored.wait().await?;
        self.get(&id).await
    }

    /// Makes sure the hub holds the current attempt's whole output: a leader
    /// that took over mid-run fetches the agents' output files once.
    pub async fn ensure_log_history(&self, job_ref: &str) {
        let job_ref = job_ref.to_string();
        let asked = self
            .state
            .call(move |state, _| {
                let mut waits = Vec::new();
                let entry = Self::resolve(state, &job_ref).ok()?;
                let (id, attempt) = (entry.job.id.clone(), entry.job.attempt);
                if attempt == 0 || state.logs_complete.contains(&(id.clone(), attempt)) {
                    return None;
                }
                let nodes: Vec<(String, u32)> = entry
                    .plan()
                    .map(|p| p.nodes.iter().map(|a| (a.node_name.clone(), a.node_rank)).collect())
                    .unwrap_or_default();
                for (node, _) in &nodes {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let command_id = state.next_command_id;
                    state.queries.insert(command_id, tx);
                    state.fetching.insert(command_id, Vec::new());
                    let fetch = cohort_proto::FetchLogsCommand { job_id: id.clone(), attempt, max_lines_per_file: 0 };
                    if Self::send_command(state, node, Command::FetchLogs(fetch)) {
                        waits.push((command_id, rx));
                    } else {
                        state.queries.remove(&command_id);
                        state.fetching.remove(&command_id);
                    }
                }
                if waits.len() < nodes.len() {
                    tracing::warn!(job = %id, "some nodes are not connected: their earlier output is missing");
                }
                Some((id, attempt, nodes.into_iter().collect::<HashMap<String, u32>>(), waits))
            })
            .await;
        let Some((id, attempt, ranks, waits)) = asked else { return };
        let created: Vec<u64> = waits.iter().map(|(id, _)| *id).collect();
        let mut answered = Vec::new();
        for (command_id, rx) in waits {
            if let Ok(Ok(result)) = tokio::time::timeout(QUERY_TIMEOUT / 6, rx).await {
                if !result.error.is_empty() {
                    tracing::warn!(job = %id, error = %result.error, "fetching output failed on a node");
                }
                answered.push(command_id);
            }
        }
        let done = (id.clone(), attempt);
        let lines = self
            .state
            .call(move |state, _| {
                let mut lines = Vec::new();
                for command_id in answered {
                    for (node, batch) in state.fetching.remove(&command_id).unwrap_or_default() {
                        let rank = ranks.get(&node).copied().unwrap_or(0);
                        lines.extend(batch.lines.into_iter().map(|l| (node.clone(), rank, l)));
                    }
                }
                for command_id in created {
                    state.fetching.remove(&command_id);
                    state.queries.remove(&command_id);
                }
                state.logs_complete.insert(done);
                lines
            })
            .await;
        tracing::info!(job = %id, attempt, lines = lines.len(), "output history fetched from the agents");
        self.logs.replace_attempt(&id, attempt, lines).await;
    }

    /// Lines of a FetchLogs answer.
    pub async fn fetched_lines(&self, node: &str, batch: cohort_proto::LogBatch) {
        let node = node.to_string();
        self.state
            .call(move |state, _| {
                if let Some(buffer) = state.fetching.get_mut(&batch.fetch_command_id) {
                    buffer.push((node, batch));
                }
            })
            .await
    }

    pub async fn query_result(&self, result: QueryResult) {
        self.state
            .call(move |state, _| {
                if let Some(tx) = state.queries.remove(&result.command_id) {
                    let _ = tx.send(result);
                }
            })
            .await
    }
}

fn upsert_stage(job: &mut Job, status: cohort_proto::StageStatus) {
    match job.staging.iter_mut().find(|s| s.node_name == status.node_name && s.item == status.item) {
        Some(existing) => {
            let path = if status.path.is_empty() { existing.path.clone() } else { status.path.clone() };
            let hub_cache =
                if status.hub_cache.is_empty() { existing.hub_cache.clone() } else { status.hub_cache.clone() };
            *existing = cohort_proto::StageStatus { path, hub_cache, ..status };
        }
        None => job.staging.push(status),
    }
}

/// Everything that refuses the launch, one line each.
fn evaluate(entry: &JobEntry) -> Vec<String> {
    let Some(plan) = entry.plan() else { return vec!["the attempt has no plan".into()] };
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    for a in &plan.nodes {
        let Some(result) = entry.prepared.get(&a.node_name) else { continue };
        if !result.error.is_empty() {
            problems.push(format!("node {}: {}", a.node_name, result.error));
        }
        if let Some(report) = &result.preflight {
            reports.push(report.clone());
        }
        let writer = plan.nodes.first().map(|a| a.node_name.as_str()).unwrap_or_default();
        for check in result.shared_paths.iter().filter(|c| !c.ok) {
            if check.writer {
                problems.push(format!(
                    "shared path {}: node {} could not write its marker: {}",
                    check.path, a.node_name, check.detail
                ));
            } else {
                problems.push(format!(
                    "shared path {} is not shared: node {} cannot see the marker node {writer} wrote ({})",
                    check.path, a.node_name, check.detail
                ));
            }
        }
        for dataset in result.datasets.iter().filter(|d| !d.ok) {
            // `warn` goes on with the valid rows (ms-swift drops the others), if there are any.
            let refused = match entry.spec.dataset_policy {
                DatasetPolicy::Fail => true,
                DatasetPolicy::Warn => dataset.rows <= dataset.bad_rows,
            };
            if refused {
                problems.push(format!("dataset {}: {}", dataset.path, first_dataset_problem(dataset)));
            }
        }
    }
    problems.extend(differing_inputs(plan, entry));
    problems.extend(compare_reports(&reports, &required_packages(&entry.spec)));
    problems.extend(swift_check::refusals(&reports));
    problems
}

/// Inputs the nodes staged with different content: without `sha256:` each
/// node reads the source itself, and a source that changed while they read
/// it, or that is not the same on every node (a node-local path, a mount
/// that lags), would give the ranks different files under the same name.
fn differing_inputs(plan: &cohort_proto::GangPlan, entry: &JobEntry) -> Vec<String> {
    // Input name → digest → the nodes that staged that content.
    let mut staged: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for a in &plan.nodes {
        let Some(result) = entry.prepared.get(&a.node_name) else { continue };
        for input in result.staged.iter().filter(|s| s.error.is_empty() && !s.sha256.is_empty()) {
            staged.entry(&input.name).or_default().entry(&input.sha256).or_default().push(&a.node_name);
        }
    }
    staged
        .into_iter()
        .filter(|(_, digests)| digests.len() > 1)
        .map(|(name, digests)| {
            let found: Vec<String> = digests
                .iter()
                .map(|(digest, nodes)| format!("{} on {}", digest.get(..12).unwrap_or(digest), nodes.join(", ")))
                .collect();
            format!(
                "stage input {name} is not the same content on every node ({}): its source changed while the \
                 nodes read it, or differs between them; make it the same everywhere and pin it with `sha256:`",
                found.join("; ")
            )
        })
        .collect()
}

/// The packages preflight requires of every node of the job.
pub(super) fn required_packages(spec: &JobSpec) -> Vec<&'static str> {
    if !matches!(spec.workload, Workload::MegatronSft(_)) {
        Vec::new()
    } else if swift_check::needs_transformer_engine(spec) {
        REQUIRED_PACKAGES.to_vec()
    } else {
        REQUIRED_PACKAGES.iter().copied().filter(|p| *p != TRANSFORMER_ENGINE).collect()
    }
}

/// Variables of a job's `env` that change what its interpreter imports: with
/// one of them (or its own `python:`), a node's start-up probe (the agent's
/// `--python`, the node's environment) says nothing about the job's.
const IMPORT_ENV: &[&str] = &["PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "PATH", "LD_LIBRARY_PATH"];

/// What the nodes' start-up reports already say preflight would refuse of
/// `spec` (for `cohort plan`: the launch's own probe would say it again);
/// nothing for a job whose interpreter or import path is its own.
pub(super) fn startup_refusals(spec: &JobSpec, reports: &[PreflightReport]) -> Vec<String> {
    let required = required_packages(spec);
    let own_imports = spec.python.is_some() || spec.env.keys().any(|k| IMPORT_ENV.contains(&k.as_str()));
    if required.is_empty() || own_imports {
        return Vec::new();
    }
    compare_reports(reports, &required)
        .into_iter()
        .map(|p| format!("{p} (the node's start-up probe; preflight would refuse the launch)"))
        .collect()
}

/// `cohort doctor`'s problems: every failed check, and what differs.
fn doctor_problems(reports: &[PreflightReport]) -> Vec<String> {
    let failed: BTreeSet<&str> =
        reports.iter().flat_map(|r| r.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str())).collect();
    compare_reports(reports, &failed.into_iter().collect::<Vec<_>>())
}

fn first_dataset_problem(d: &DatasetSummary) -> String {
    if d.bad_rows > 0 {
        let first = d.report.lines().find(|l| l.trim_start().starts_with(&d.path)).map(str::trim).unwrap_or_default();
        format!("{} bad row(s) of {} (dataset_policy: fail), first: {first}", d.bad_rows, d.rows)
    } else {
        // The report names the dataset itself ("dataset X: cannot open: ..."); the caller names it once.
        let line = d.report.lines().next().unwrap_or("unreadable");
        line.strip_prefix(&format!("dataset {}: ", d.path)).unwrap_or(line).to_string()
    }
}

/// Failed `required` checks and values that differ between nodes.
fn compare_reports(reports: &[PreflightReport], required: &[&str]) -> Vec<String> {
    let require_packages = !required.is_empty();
    let mut problems = Vec::new();
    for report in reports {
        if !report.error.is_empty() && (require_packages || !report.checks.is_empty()) {
            problems.push(format!("node {}: {}", report.node_name, report.error));
        }
        for check in report.checks.iter().filter(|c| !c.ok) {
            let system = matches!(check.name.as_str(), "disk" | "master_port") || check.name.starts_with("interface:");
            if required.contains(&check.name.as_str()) || system {
                let detail = if check.detail.is_empty() { "missing".to_string() } else { check.detail.clone() };
                problems.push(format!("node {}: {}: {detail}", report.node_name, check.name));
            }
        }
    }
    for name in SAME_EVERYWHERE.iter().chain(&["transformer_engine.pytorch"]) {
        // Importable on some nodes, broken on others: the nodes run different code.
        let (working, broken): (Vec<&PreflightReport>, Vec<&PreflightReport>) = reports
            .iter()
            .filter(|r| r.checks.iter().any(|c| c.name == *name))
            .partition(|r| r.checks.iter().any(|c| c.name == *name && c.ok));
        if !working.is_empty() && !broken.is_empty() {
            let detail = broken
                .iter()
                .filter_map(|r| r.checks.iter().find(|c| c.name == *name))
                .map(|c| c.detail.as_str())
                .find(|d| !d.is_empty())
                .unwrap_or("missing");
            let names =
                |rs: &[&PreflightReport]| rs.iter().map(|r| r.node_name.as_str()).collect::<Vec<_>>().join(", ");
            let line = format!("{name} works on {} but not on {}: {detail}", names(&working), names(&broken));
            if !problems.contains(&line) {
                problems.push(line);
            }
        }
    }
    for name in SAME_EVERYWHERE {
        let values: Vec<(String, String)> = reports
            .iter()
            .filter_map(|r| {
                r.checks.iter().find(|c| c.name == *name && c.ok).map(|c| (r.node_name.clone(), c.value.clone()))
            })
            .collect();
        let distinct: BTreeSet<&str> = values.iter().map(|(_, v)| v.as_str()).collect();
        if distinct.len() > 1 {
            let list: Vec<String> = values.iter().map(|(n, v)| format!("{n} {v}")).collect();
            problems.push(format!("{name} differs between nodes: {}", list.join(", ")));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cohort_proto::PreflightCheck;

    #[test]
    fn an_unreadable_dataset_is_named_once() {
        let d = DatasetSummary {
            path: "data/train.jsonl".into(),
            report: "dataset data/train.jsonl: cannot open: No such file or directory (os error 2)\nmore".into(),
            ..Default::default()
        };
        assert_eq!(first_dataset_problem(&d), "cannot open: No such file or directory (os error 2)");
    }

    #[test]
    fn a_check_failed_on_every_node_is_a_problem_for_doctor_and_plan() {
        let broken = |node: &str| report(node, &[("python", "3.12", true), ("torch", "", false), ("swift", "", false)]);
        let reports = [broken("n0"), broken("n1")];
        // The nodes agree, yet nothing megatron needs is there.
        assert!(compare_reports(&reports, &[]).is_empty());
        let doctor = doctor_problems(&reports);
        assert_eq!(doctor.len(), 4, "{doctor:?}");
        assert!(doctor.iter().any(|p| p.starts_with("node n1: torch")), "{doctor:?}");
        assert!(doctor_problems(&[report("n0", &[("python", "3.12", true)])]).is_empty());

        let sft = JobSpec::from_yaml(
            "name: a\nkind: megatron-sft\nnodes: 2\ngpus_per_node: 1\nmegatron:\n  swift_version: 3\n  load: m\n",
            "job.yaml",
        )
        .unwrap();
        let refusals = startup_refusals(&sft, &reports);
        assert!(refusals.iter().any(|p| p.starts_with("node n0: torch") && p.contains("preflight would refuse")));
        let command = JobSpec::from_yaml("name: c\nkind: command\nnodes: 1\ncommand: ['true']\n", "job.yaml").unwrap();
        assert!(startup_refusals(&command, &reports).is_empty(), "a command job needs no Python stack");
        // Found on a GPU: a job that brings its own import path (deploy/swift-smoke.sh's
        // PYTHONPATH) was refused by `cohort plan` for what the node's default lacks.
        for own in ["env: {PYTHONPATH: /opt/overlay}\n", "python: /opt/venv/bin/python3\n"] {
            let yaml = format!(
                "name: a\nkind: megatron-sft\nnodes: 2\ngpus_per_node: 1\n{own}megatron:\n  swift_version: 3\n  load: m\n"
            );
            let spec = JobSpec::from_yaml(&yaml, "job.yaml").unwrap();
            assert!(startup_refusals(&spec, &reports).is_empty(), "{own}");
        }
    }

    fn report(node: &str, checks: &[(&str, &str, bool)]) -> PreflightReport {
        PreflightReport {
            node_name: node.into(),
            checks: checks
                .iter()
                .map(|(n, v, ok)| PreflightCheck {
                    name: (*n).into(),
                    value: (*v).into(),
                    ok: *ok,
                    detail: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn versions_must_agree_and_required_imports_must_work() {
        let good =
            [("python", "3.12.3", true), ("torch", "2.11.0", true), ("transformer_engine.pytorch", "importable", true)];
        let a = report("a", &[good[0], good[1], good[2], ("megatron.core", "0.15", true), ("swift", "3.12.6", true)]);
        let b = report(
            "b",
            &[
                good[0],
                ("torch", "2.10.0", true),
                ("transformer_engine.pytorch", "", false),
                ("megatron.core", "0.15", true),
                ("swift", "3.12.6", true),
            ],
        );
        let problems = compare_reports(&[a.clone(), b.clone()], REQUIRED_PACKAGES);
        assert!(problems.iter().any(|p| p == "torch differs between nodes: a 2.11.0, b 2.10.0"), "{problems:?}");
        assert!(problems.iter().any(|p| p == "node b: transformer_engine.pytorch: missing"), "{problems:?}");
        assert!(
            problems.iter().any(|p| p == "transformer_engine.pytorch works on a but not on b: missing"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 3);
        // Without package requirements (doctor), the disagreement alone is still reported.
        assert_eq!(compare_reports(&[a.clone(), b], &[]).len(), 2);
        // The same package problems do not refuse a job that needs no packages.
        assert!(compare_reports(&[a.clone(), a], &[]).is_empty());
    }

    #[test]
    fn a_taken_port_or_missing_interface_refuses_any_job() {
        let r = report("a", &[("master_port", "29500", false), ("interface:ib0", "", false), ("apex", "", false)]);
        let problems = compare_reports(&[r], &[]);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
