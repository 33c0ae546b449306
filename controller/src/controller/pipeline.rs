//! Pipeline jobs: the stages of a `kind: pipeline` job run in dependency
//! order, each stage as one or two jobs of its own ("runs", ids
//! `<pipeline>.<stage>[.before|.after]`) that go through the ordinary path:
//! placement, preparation, gang launch, supervision. This module only watches
//! the runs (level-triggered, every reconcile pass), starts the stages whose
//! dependencies have succeeded, and ends the pipeline when a stage fails or
//! every stage is done. A run inherits the pipeline's `restart` policy, so a
//! stage counts as failed only once its run is finally Failed: after its
//! restart policy has given up.
//!
//! Work that needs an agent (the model digest of a to_mcore stage, the newest
//! checkpoint of a megatron-sft stage, the result files for the report) runs
//! in a task per stage; the stage shows `Resolving` meanwhile, and a
//! controller that restarts starts the task again.

use cohort_proto::{
    ConversionCacheEntry, EnvVar, InspectPathCommand, PipelineReport, PipelineStage, QueryResult, SpecProblem,
    StagePlan, StageRunPlan, StageState, query_result::Result as QueryAnswer,
};
use cohort_shared::pipeline::report::{Report, pair, read_answers, read_scores, score_rows};
use cohort_shared::pipeline::{Resolved, conversion_key, document_yaml};
use cohort_shared::spec::stages::{PipelineSpec, StepKind};

use super::stage_entry::StageTransitions;
use super::*;

/// How long a question to an agent may take (a model digest reads every byte).
const ASK_TIMEOUT: Duration = Duration::from_secs(600);
/// The pseudo-stage of the report task.
const REPORT_TASK: &str = "#report";

fn stage_state(stage: &PipelineStage) -> StageState {
    StageState::try_from(stage.state).unwrap_or(StageState::Unspecified)
}

fn stage_done(stage: &PipelineStage) -> bool {
    matches!(stage_state(stage), StageState::Succeeded | StageState::Cached)
}

pub use cohort_proto::names::stage_state_name;

/// The stages of a freshly submitted pipeline, all waiting.
pub(super) fn initial_stages(spec: &PipelineSpec) -> Vec<PipelineStage> {
    spec.stages
        .iter()
        .map(|s| PipelineStage {
            name: s.name.clone(),
            kind: s.kind.name().to_string(),
            depends_on: s.depends_on.clone(),
            state: StageState::Waiting as i32,
            reason: if s.depends_on.is_empty() {
                "starting".into()
            } else {
                format!("waiting for {}", s.depends_on.join(", "))
            },
            ..PipelineStage::default()
        })
        .collect()
}

/// What a stage task found.
enum TaskOutcome {
    /// Start the stage's runs with this output path (and cache key).
    Start {
        output: String,
        cache_key: String,
        model: String,
        model_digest: String,
        layout: (u32, u32),
    },
    /// A cached conversion: the stage is done without running.
    Cached {
        output: String,
        cache_key: String,
    },
    /// The megatron-sft stage's newest checkpoint.
    Checkpoint(String),
    /// The report is stored.
    Report,
    Failed(String),
}

/// What `cohort plan` shows of a job id that does not exist yet.
const PLAN_JOB_ID: &str = "<job id>";

/// `${stages.NAME.FIELD}` as `cohort plan` shows it: `<stage NAME: FIELD>`.
fn plan_placeholder(text: &str, names: &[&str]) -> String {
    let mut shown = text.to_owned();
    for name in names {
        for field in ["output", "checkpoint"] {
            shown = shown.replace(&format!("${{stages.{name}.{field}}}"), &format!("<stage {name}: {field}>"));
        }
    }
    shown
}

impl Controller {
    /// The stages of a valid pipeline as `cohort plan` shows them: each run's command line and
    /// the environment that matters, rendered by the same code that starts the stage, with what
    /// earlier stages produce as placeholders. A run that cannot be rendered or does not
    /// validate is a problem of its stage.
    pub(super) fn plan_stages(
        &self,
        spec: &PipelineSpec,
        pipeline_name: &str,
        file: &JobFile,
    ) -> Result<Vec<StagePlan>, Vec<SpecProblem>> {
        let names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
        // Each reference resolves to its own text: the run validates as the stage did when the
        // pipeline was checked, and the text becomes a placeholder when shown.
        let mut refs = Resolved::default();
        for name in &names {
            refs.outputs.insert((*name).to_owned(), format!("${{stages.{name}.output}}"));
            refs.checkpoints.insert((*name).to_owned(), format!("${{stages.{name}.checkpoint}}"));
        }
        let mut problems = Vec::new();
        let mut plans = Vec::new();
        for stage in spec.order() {
            let index = spec.stages.iter().position(|s| s.name == stage.name).unwrap_or_default();
            let mut problem = |message: String| {
                problems.push(SpecProblem { field: format!("stages[{index}]"), line: 0, message });
            };
            let mut own = refs.clone();
            let output = match (&spec.conversion_cache, stage.kind, stage.raw.contains_key("output")) {
                // As `look_up_conversion` names it; the key needs the model's digest from a node.
                (Some(cache), StepKind::ToMcore, false) => format!("{}/<cache key>", cache.trim_end_matches('/')),
                _ => match spec.stage_output(stage, PLAN_JOB_ID, &refs) {
                    Ok(output) => output,
                    Err(e) => {
                        problem(e.to_string());
                        continue;
                    }
                },
            };
            own.outputs.insert(stage.name.clone(), output);
            let runs = match spec.runs(stage, pipeline_name, &own) {
                Ok(runs) => runs,
                Err(e) => {
                    problem(e.to_string());
                    continue;
                }
            };
            let mut plan = StagePlan {
                name: stage.name.clone(),
                kind: stage.kind.name().to_owned(),
                depends_on: stage.depends_on.clone(),
                runs: Vec::new(),
            };
            for run in runs {
                let run_file = JobFile {
                    yaml: document_yaml(&run.document),
                    source_name: format!("{}#stages.{}", file.source_name, stage.name),
                    base_dir: file.base_dir.clone(),
                    submitted_by: file.submitted_by.clone(),
                    default_user: file.default_user.clone(),
                    // Pipelines sync nothing (`sync:` is refused there).
                    sync: None,
                };
                let run_spec = match self.parse(&run_file) {
                    Ok(run_spec) => run_spec,
                    Err(e) => {
                        problem(format!("its job does not validate: {e}"));
                        continue;
                    }
                };
                let (argv, _) = planner::command_line(&run_spec);
                let mut env = vec![
                    EnvVar { name: "NNODES".into(), value: run_spec.nodes.to_string() },
                    EnvVar { name: "NPROC_PER_NODE".into(), value: planner::nproc_per_node(&run_spec).to_string() },
                ];
                env.extend(
                    run_spec
                        .env
                        .iter()
                        .map(|(name, value)| EnvVar { name: name.clone(), value: plan_placeholder(value, &names) }),
                );
                plan.runs.push(StageRunPlan {
                    part: run.part.suffix().to_owned(),
                    nodes: run_spec.nodes,
                    gpus_per_node: run_spec.gpus_per_node,
                    argv: argv.iter().map(|arg| plan_placeholder(arg, &names)).collect(),
                    env,
                });
            }
            plans.push(plan);
        }
        if problems.is_empty() { Ok(plans) } else { Err(problems) }
    }

    /// One pass over every pipeline that is not finished.
    pub(super) async fn advance_pipelines(&self) {
        let conversions = self
            .state
            .call(|state, ctl| {
                let mut conversions = Vec::new();
                let ids: Vec<String> = state
                    .jobs
                    .values()
                    .filter(|e| e.spec.is_pipeline())
                    .filter(|e| {
                        !e.is_terminal() || e.job.stages.iter().any(|s| stage_state(s) == StageState::Running)
                    })
                    .map(|e| e.job.id.clone())
                    .collect();
                for id in ids {
                    if let Err(e) = ctl.advance_pipeline(state, &id, &mut conversions) {
                        tracing::error!(job = %id, error = %e, "advancing the pipeline failed; retrying on the next pass");
                    }
                }
                conversions
            })
            .await;
        // The cache is not the state: its entries are written here, off the state task.
        for entry in conversions {
            if let Err(e) = self.store.put(&format!("cache/{}", entry.key), entry.encode_to_vec(), Expect::Any).await {
                tracing::warn!(key = %entry.key, error = %e, "could not record the conversion in the cache");
            } else {
                tracing::info!(job = %entry.created_by, key = %entry.key, path = %entry.path, "conversion cached");
            }
        }
    }

    /// Moves one pipeline on; the conversions its stages finished go to `conversions`.
    fn advance_pipeline(
        self: &Arc<Self>,
        state: &mut State,
        id: &str,
        conversions: &mut Vec<ConversionCacheEntry>,
    ) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get(id) else { return Ok(()) };
        let Workload::Pipeline(spec) = entry.spec.workload.clone() else { return Ok(()) };
        let parent_terminal = entry.is_terminal();
        let mut stages = entry.job.stages.clone();

        let mut failed = Self::settle_running_stages(state, id, &spec, &mut stages, conversions);
        if let Some(stage) = stages.iter().find(|s| stage_state(s) == StageState::Failed)
            && failed.is_none()
        {
            failed = Some(format!("stage {} failed: {}", stage.name, stage.reason));
        }
        if parent_terminal || failed.is_some() {
            self.stop_stages(state, &mut stages, parent_terminal)?;
        } else {
            self.start_ready_stages(state, id, &spec, &mut stages)?;
        }
        self.conclude_pipeline(state, id, stages, parent_terminal, failed)
    }

    /// Runs that ended decide their stage; returns why the pipeline fails, if a run failed.
    fn settle_running_stages(
        state: &mut State,
        id: &str,
        spec: &PipelineSpec,
        stages: &mut [PipelineStage],
        conversions: &mut Vec<ConversionCacheEntry>,
    ) -> Option<String> {
        let mut failed: Option<String> = None;
        for stage in stages.iter_mut().filter(|s| stage_state(s) == StageState::Running) {
            let runs: Vec<(String, JobPhase, String)> = stage
                .runs
                .iter()
                .map(|run| {
                    let (state, reason) = state
                        .jobs
                        .get(run)
                        .map(|e| (e.phase(), e.job.reason.clone()))
                        .unwrap_or((JobPhase::Failed, "its job record is gone".into()));
                    (run.clone(), state, reason)
                })
                .collect();
            if let Some((run, job_state, reason)) =
                runs.iter().find(|(_, s, _)| matches!(s, JobPhase::Failed | JobPhase::Cancelled))
            {
                stage.failed(format!("{run} {}: {reason}", job_state.name().to_lowercase()));
                failed.get_or_insert_with(|| format!("stage {} failed: {}", stage.name, stage.reason));
            } else if runs.iter().all(|(_, s, _)| *s == JobPhase::Succeeded) {
                let needs_checkpoint =
                    stage.kind == StepKind::MegatronSft.name() && spec.checkpoint_needed(&stage.name);
                if needs_checkpoint {
                    stage.resolving("finding its newest complete checkpoint");
                } else {
                    stage.succeeded();
                    if !stage.cache_key.is_empty() {
                        conversions.push(Self::conversion_done(state, id, spec, stage));
                    }
                }
            }
        }
        failed
    }

    /// The pipeline stops: stages not started are skipped, running ones cancelled.
    fn stop_stages(
        &self,
        state: &mut State,
        stages: &mut [PipelineStage],
        parent_terminal: bool,
    ) -> Result<(), ControllerError> {
        for stage in stages.iter_mut() {
            match stage_state(stage) {
                StageState::Waiting | StageState::Resolving => {
                    stage.skipped(if parent_terminal { "the pipeline ended" } else { "an earlier stage failed" });
                }
                StageState::Running => {
                    for run in stage.runs.clone() {
                        self.cancel_run(state, &run, "the pipeline stopped")?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Stages whose dependencies are done start (or resolve first); the others say what they wait for.
    fn start_ready_stages(
        self: &Arc<Self>,
        state: &mut State,
        id: &str,
        spec: &PipelineSpec,
        stages: &mut [PipelineStage],
    ) -> Result<(), ControllerError> {
        let done: Vec<String> = stages.iter().filter(|s| stage_done(s)).map(|s| s.name.clone()).collect();
        for index in 0..stages.len() {
            let stage = &stages[index];
            let ready = stage.depends_on.iter().all(|d| done.contains(d));
            match stage_state(stage) {
                StageState::Waiting if ready => {
                    let Some(stage_spec) = spec.stage(&stage.name) else { continue };
                    if stage_spec.kind == StepKind::ToMcore && spec.conversion_cache.is_some() {
                        stages[index].resolving("looking for the converted checkpoint in the conversion cache");
                    } else {
                        let output = spec.stage_output(stage_spec, id, &resolved(stages)).unwrap_or_default();
                        self.start_stage(state, id, spec, stages, index, output, String::new())?;
                    }
                }
                StageState::Waiting => {
                    let missing: Vec<&str> =
                        stage.depends_on.iter().filter(|d| !done.contains(d)).map(String::as_str).collect();
                    stages[index].reason = format!("waiting for {}", missing.join(", "));
                }
                _ => {}
            }
        }
        for stage in stages.iter().filter(|s| stage_state(s) == StageState::Resolving) {
            self.spawn_task(state, id, &stage.name);
        }
        Ok(())
    }

    /// Writes what changed, then ends the pipeline when its stages are done.
    fn conclude_pipeline(
        self: &Arc<Self>,
        state: &mut State,
        id: &str,
        stages: Vec<PipelineStage>,
        parent_terminal: bool,
        failed: Option<String>,
    ) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let changed = entry.job.stages != stages;
        entry.job.stages = stages;
        let all_done = entry.job.stages.iter().all(stage_done);
        let needs_report = entry.job.stages.iter().any(|s| s.kind == "infer" || s.kind == "eval");
        let mut message = None;
        if !parent_terminal {
            if let Some(reason) = failed {
                entry.fail(Failure { message: reason.clone(), ..Failure::default() })?;
                tracing::warn!(job = %id, reason = %reason, "pipeline failed");
                message = Some(reason);
            } else if all_done && (!needs_report || entry.job.report_ready) {
                entry.succeed("every stage succeeded")?;
                tracing::info!(job = %id, "pipeline succeeded");
                message = Some("pipeline succeeded".to_string());
            } else if all_done {
                entry.job.reason = "writing the report".into();
                self.spawn_task(state, id, REPORT_TASK);
            } else {
                let running: Vec<&str> = entry
                    .job
                    .stages
                    .iter()
                    .filter(|s| matches!(stage_state(s), StageState::Running | StageState::Resolving))
                    .map(|s| s.name.as_str())
                    .collect();
                if !running.is_empty() {
                    entry.job.reason = format!("running stage {}", running.join(", "));
                }
            }
        }
        if changed || message.is_some() {
            self.persist_job(state, id);
            self.publish(state, id, message.as_deref().unwrap_or("stages changed"));
        }
        Ok(())
    }

    /// Submits a stage's runs as jobs of their own.
    #[allow(clippy::too_many_arguments)]
    fn start_stage(
        &self,
        state: &mut State,
        pipeline_id: &str,
        spec: &PipelineSpec,
        stages: &mut [PipelineStage],
        index: usize,
        output: String,
        cache_key: String,
    ) -> Result<(), ControllerError> {
        let Some(stage_spec) = spec.stage(&stages[index].name) else { return Ok(()) };
        let Some(parent) = state.jobs.get(pipeline_id) else { return Ok(()) };
        let (name, file) = (parent.job.name.clone(), parent.job.file.clone().unwrap_or_default());
        let mut refs = resolved(stages);
        refs.outputs.insert(stage_spec.name.clone(), output.clone());
        let stage = &mut stages[index];
        stage.output = output;
        stage.cache_key = cache_key;
        let runs = match spec.runs(stage_spec, &name, &refs) {
            Ok(runs) => runs,
            Err(e) => {
                stage.failed(e.to_string());
                return Ok(());
            }
        };
        let mut children = Vec::new();
        for run in runs {
            let suffix = run.part.suffix();
            let child_id = if suffix.is_empty() {
                format!("{pipeline_id}.{}", stage.name)
            } else {
                format!("{pipeline_id}.{}.{suffix}", stage.name)
            };
            let child_file = JobFile {
                yaml: document_yaml(&run.document),
                source_name: format!("{}#stages.{}", file.source_name, stage.name),
                base_dir: file.base_dir.clone(),
                // A stage's runs belong to whoever submitted the pipeline.
                submitted_by: file.submitted_by.clone(),
                default_user: file.default_user.clone(),
                sync: None,
            };
            let child_spec = match self.parse(&child_file) {
                Ok(spec) => spec,
                Err(e) => {
                    stage.failed(format!("its job does not validate: {e}"));
                    return Ok(());
                }
            };
            children.push((child_id, child_file, child_spec, run.result_path.unwrap_or_default()));
        }
        stage.running(
            children.iter().map(|(id, ..)| id.clone()).collect(),
            children.iter().map(|(.., path)| path.clone()).collect(),
        );
        let stage_name = stage.name.clone();
        for (child_id, child_file, child_spec, _) in children {
            if state.jobs.contains_key(&child_id) {
                continue; // submitted before a controller restart
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let job = Job {
                id: child_id.clone(),
                name: child_spec.name.clone(),
                kind: kind_name(&child_spec).into(),
                nodes: child_spec.nodes,
                gpus_per_node: child_spec.gpus_per_node,
                priority: child_spec.priority,
                submitted_unix_ms: now_unix_ms(),
                file: Some(child_file),
                pipeline_id: pipeline_id.to_string(),
                pipeline_stage: stage_name.clone(),
                secret_env: child_spec.secret_env.iter().cloned().collect(),
                ..Job::default()
            };
            state.jobs.insert(child_id.clone(), JobEntry::submitted(job, child_spec, seq));
            // Queued: a failed write is retried with the run's next change.
            self.persist_job(state, &child_id);
            self.publish(state, &child_id, "submitted by its pipeline");
            tracing::info!(pipeline = %pipeline_id, stage = %stage_name, job = %child_id, "stage run submitted");
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Cancels a run of a stopped pipeline (as `cohort cancel` would).
    fn cancel_run(&self, state: &mut State, id: &str, reason: &str) -> Result<(), ControllerError> {
        let Some(entry) = state.jobs.get_mut(id) else { return Ok(()) };
        let why = match entry.phase() {
            JobPhase::Pending => format!("{reason} before it was placed"),
            p if p.is_active() => format!("{reason}; stopping every process"),
            // A restarting run is left to its restart (as before the state machine).
            _ => return Ok(()),
        };
        if entry.cancel(why)?.is_active() {
            self.teardown(state, id, reason);
        }
        self.persist_job(state, id);
        self.publish(state, id, "cancelled by its pipeline");
        Ok(())
    }

    /// Starts the task of a resolving stage (or the report), once.
    fn spawn_task(self: &Arc<Self>, state: &mut State, id: &str, stage: &str) {
        let key = (id.to_string(), stage.to_string());
        if !state.pipeline_tasks.insert(key.clone()) {
            return;
        }
        let controller = self.clone();
        tokio::spawn(async move {
            let outcome = controller.run_task(&key.0, &key.1).await;
            controller
                .state
                .call(move |state, ctl| {
                    ctl.finish_task(state, &key.0, &key.1, outcome);
                    state.pipeline_tasks.remove(&key);
                    ctl.wake.notify_one();
                })
                .await;
        });
    }

    async fn run_task(&self, id: &str, stage: &str) -> TaskOutcome {
        let job_id = id.to_string();
        let found = self
            .state
            .call(move |state, _| {
                let Some(entry) = state.jobs.get(&job_id) else { return Err("the job is gone") };
                let Workload::Pipeline(spec) = entry.spec.workload.clone() else { return Err("not a pipeline") };
                let user = entry.spec.user.clone().unwrap_or_default();
                Ok((spec, entry.job.stages.clone(), entry.spec.node_selector.clone(), user))
            })
            .await;
        let (spec, stages, selector, user) = match found {
            Ok(found) => found,
            Err(why) => return TaskOutcome::Failed(why.into()),
        };
        if stage == REPORT_TASK {
            return match self.write_report(id, &stages, &selector, &user).await {
                Ok(()) => TaskOutcome::Report,
                Err(e) => TaskOutcome::Failed(format!("the report could not be written: {e}")),
            };
        }
        let Some(record) = stages.iter().find(|s| s.name == stage) else {
            return TaskOutcome::Failed("no such stage".into());
        };
        let Some(stage_spec) = spec.stage(stage) else { return TaskOutcome::Failed("no such stage".into()) };
        match stage_spec.kind {
            StepKind::MegatronSft => {
                let find = cohort_proto::FindCheckpointCommand { directory: record.output.clone(), user };
                match self.ask(&selector, Command::FindCheckpoint(find)).await {
                    Ok(QueryResult { result: Some(QueryAnswer::Checkpoint(c)), .. }) => match c.checkpoint {
                        Some(checkpoint) => TaskOutcome::Checkpoint(checkpoint.path),
                        None => TaskOutcome::Failed(format!(
                            "no complete checkpoint in {}{}",
                            record.output,
                            super::restart::skipped_note(&c.skipped)
                        )),
                    },
                    Ok(other) => TaskOutcome::Failed(format!("finding the checkpoint: {}", other.error)),
                    Err(e) => TaskOutcome::Failed(format!("finding the checkpoint: {e}")),
                }
            }
            StepKind::ToMcore => self.look_up_conversion(id, &spec, stage_spec, &selector, &user).await,
            _ => TaskOutcome::Failed("nothing to resolve".into()),
        }
    }

    /// The cache key of a to_mcore stage, and the cached checkpoint if it is still there.
    async fn look_up_conversion(
        &self,
        id: &str,
        spec: &PipelineSpec,
        stage: &cohort_shared::spec::stages::PipelineStage,
        selector: &BTreeMap<String, String>,
        user: &str,
    ) -> TaskOutcome {
        let Some(cache_dir) = spec.conversion_cache.clone() else {
            return TaskOutcome::Failed("no conversion cache".into());
        };
        let model = spec.conversion_source(stage).unwrap_or_default();
        let digest = if model.starts_with('/') {
            let inspect =
                InspectPathCommand { path: model.clone(), digest: true, user: user.to_owned(), ..Default::default() };
            match self.ask(selector, Command::InspectPath(inspect)).await {
                Ok(QueryResult { result: Some(QueryAnswer::Path(p)), .. }) if p.exists => p.digest,
                Ok(QueryResult { result: Some(QueryAnswer::Path(_)), .. }) => {
                    return TaskOutcome::Failed(format!("the model {model} does not exist on the nodes"));
                }
                Ok(other) => return TaskOutcome::Failed(format!("digesting {model}: {}", other.error)),
                Err(e) => return TaskOutcome::Failed(format!("digesting {model}: {e}")),
            }
        } else {
            // A hub id: its name and revision are all there is to key on.
            format!("hub:{model}")
        };
        let layout = spec.conversion_layout(stage);
        let key = conversion_key(&digest, layout.0, layout.1, spec.swift_version);
        if let Ok(Some(stored)) = self.store.get(&format!("cache/{key}")).await
            && let Ok(mut entry) = ConversionCacheEntry::decode(stored.value.as_slice())
        {
            let inspect = InspectPathCommand { path: entry.path.clone(), user: user.to_owned(), ..Default::default() };
            let still_there = matches!(
                self.ask(selector, Command::InspectPath(inspect)).await,
                Ok(QueryResult { result: Some(QueryAnswer::Path(p)), .. }) if p.exists
            );
            if still_there {
                entry.hits += 1;
                entry.last_used_unix_ms = now_unix_ms();
                let _ = self
                    .store
                    .put(&format!("cache/{key}"), entry.encode_to_vec(), Expect::Revision(stored.revision))
                    .await;
                tracing::info!(job = %id, key = %key, path = %entry.path, "conversion cache hit");
                return TaskOutcome::Cached { output: entry.path, cache_key: key };
            }
            tracing::warn!(key = %key, path = %entry.path, "cached conversion is gone from the nodes; converting again");
            let _ = self.store.delete(&format!("cache/{key}"), Expect::Any).await;
        }
        let output = format!("{}/{key}", cache_dir.trim_end_matches('/'));
        TaskOutcome::Start { output, cache_key: key, model, model_digest: digest, layout }
    }

    /// A resolving stage's (or the report's) task ended with `outcome`.
    fn finish_task(self: &Arc<Self>, state: &mut State, id: &str, stage: &str, outcome: TaskOutcome) {
        let Some(entry) = state.jobs.get(id) else { return };
        let Workload::Pipeline(spec) = entry.spec.workload.clone() else { return };
        let mut stages = entry.job.stages.clone();
        let index = stages.iter().position(|s| s.name == stage);
        let resolving = index.is_some_and(|i| stage_state(&stages[i]) == StageState::Resolving);
        match outcome {
            TaskOutcome::Report => {
                if let Some(entry) = state.jobs.get_mut(id) {
                    entry.job.report_ready = true;
                }
            }
            TaskOutcome::Failed(reason) if stage == REPORT_TASK => {
                if let Some(entry) = state.jobs.get_mut(id)
                    && entry.is_active()
                    && let Err(e) = entry.fail(Failure { message: reason, ..Failure::default() })
                {
                    tracing::error!(error = %e, "the pipeline's report failed");
                }
            }
            _ if !resolving => return, // the pipeline moved on meanwhile
            TaskOutcome::Failed(reason) => {
                if let Some(i) = index {
                    stages[i].failed(reason);
                }
            }
            TaskOutcome::Checkpoint(path) => {
                if let Some(i) = index {
                    stages[i].checkpoint = path;
                    stages[i].succeeded();
                }
            }
            TaskOutcome::Cached { output, cache_key } => {
                if let Some(i) = index {
                    stages[i].cached(output, cache_key, "converted checkpoint found in the conversion cache");
                }
            }
            TaskOutcome::Start { output, cache_key, model, model_digest, layout } => {
                if let Some(i) = index {
                    state.pending_conversions.insert(
                        cache_key.clone(),
                        ConversionCacheEntry {
                            key: cache_key.clone(),
                            model,
                            model_digest,
                            tensor_model_parallel_size: layout.0,
                            pipeline_model_parallel_size: layout.1,
                            swift_version: u32::from(spec.swift_version.major()),
                            path: output.clone(),
                            created_by: id.to_string(),
                            ..ConversionCacheEntry::default()
                        },
                    );
                    if let Err(e) = self.start_stage(state, id, &spec, &mut stages, i, output, cache_key) {
                        tracing::error!(job = %id, error = %e, "starting the stage failed");
                    }
                }
            }
        }
        if let Some(entry) = state.jobs.get_mut(id) {
            entry.job.stages = stages;
        }
        self.persist_job(state, id);
        self.publish(state, id, "stages changed");
    }

    /// A to_mcore run succeeded: its output becomes a cache entry (stored by the caller, off the state).
    fn conversion_done(
        state: &mut State,
        id: &str,
        spec: &PipelineSpec,
        stage: &PipelineStage,
    ) -> ConversionCacheEntry {
        let mut entry = state.pending_conversions.remove(&stage.cache_key).unwrap_or_else(|| ConversionCacheEntry {
            key: stage.cache_key.clone(),
            path: stage.output.clone(),
            swift_version: u32::from(spec.swift_version.major()),
            created_by: id.to_string(),
            ..ConversionCacheEntry::default()
        });
        entry.created_unix_ms = now_unix_ms();
        entry.last_used_unix_ms = entry.created_unix_ms;
        entry
    }

    /// Reads the infer and eval results from a node and stores the report.
    async fn write_report(
        &self,
        id: &str,
        stages: &[PipelineStage],
        selector: &BTreeMap<String, String>,
        user: &str,
    ) -> Result<(), String> {
        let mut report = Report { title: id.to_string(), ..Report::default() };
        for stage in stages.iter().filter(|s| s.kind == "infer" || s.kind == "eval") {
            let mut parts = Vec::new();
            for path in stage.result_paths.iter().filter(|p| !p.is_empty()) {
                let inspect =
                    InspectPathCommand { path: path.clone(), read: true, user: user.to_owned(), ..Default::default() };
                let files = match self.ask(selector, Command::InspectPath(inspect)).await {
                    Ok(QueryResult { result: Some(QueryAnswer::Path(p)), .. }) if p.exists => p.files,
                    Ok(QueryResult { result: Some(QueryAnswer::Path(_)), .. }) => {
                        return Err(format!("stage {}: {path} does not exist", stage.name));
                    }
                    Ok(other) => return Err(format!("stage {}: reading {path}: {}", stage.name, other.error)),
                    Err(e) => return Err(format!("stage {}: reading {path}: {e}", stage.name)),
                };
                let files: Vec<(String, String)> = files
                    .into_iter()
                    .filter(|f| f.path.ends_with(".json") || f.path.ends_with(".jsonl"))
                    .map(|f| (f.path, String::from_utf8_lossy(&f.content).into_owned()))
                    .collect();
                parts.push((path.clone(), files));
            }
            match stage.kind.as_str() {
                "infer" if parts.len() == 2 => {
                    let answers = |(path, files): &(String, Vec<(String, String)>)| {
                        let text: String = files.iter().map(|(_, t)| t.as_str()).collect();
                        read_answers(&text, path).map_err(|e| e.to_string())
                    };
                    let (before, after) = (answers(&parts[0])?, answers(&parts[1])?);
                    report.comparisons.push((stage.name.clone(), pair(&before, &after)));
                }
                "eval" if parts.len() == 2 => {
                    let (before, after) = (read_scores(&parts[0].1), read_scores(&parts[1].1));
                    if before.is_empty() && after.is_empty() {
                        return Err(format!(
                            "stage {}: no scores found under {} and {}",
                            stage.name, parts[0].0, parts[1].0
                        ));
                    }
                    report.scores.push((stage.name.clone(), score_rows(&before, &after)));
                }
                _ => {}
            }
        }
        let stored = PipelineReport {
            job_id: id.to_string(),
            markdown: report.markdown(),
            html: report.html(),
            created_unix_ms: now_unix_ms(),
        };
        self.store
            .put(&format!("reports/{id}"), stored.encode_to_vec(), Expect::Any)
            .await
            .map_err(|e| format!("storing it: {e}"))?;
        Ok(())
    }

    /// Asks a connected node (one the pipeline's node_selector allows) a question.
    async fn ask(&self, selector: &BTreeMap<String, String>, command: Command) -> Result<QueryResult, String> {
        let selector = selector.clone();
        let rx = self
            .state
            .call(move |state, _| {
                let node = state
                    .nodes
                    .values()
                    .filter(|n| n.is_connected())
                    .find(|n| selector.iter().all(|(k, v)| n.info.labels.get(k) == Some(v)))
                    .map(|n| n.info.name.clone())
                    .ok_or_else(|| "no node is connected to ask".to_string())?;
                super::queries::ask(state, &node, command).ok_or_else(|| format!("node {node} is not connected"))
            })
            .await?;
        let answer = tokio::time::timeout(ASK_TIMEOUT, rx)
            .await
            .map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
            .map_err(|_| "the node went away before answering".to_string())?;
        if !answer.error.is_empty() {
            return Err(answer.error);
        }
        Ok(answer)
    }

    // ------------------------------------------------------- API: report, cache

    pub async fn report(&self, job_ref: &str) -> Result<PipelineReport, ControllerError> {
        let job_ref = job_ref.to_string();
        let (id, ready, is_pipeline) = self
            .state
            .call(move |state, _| {
                let entry = Self::resolve(state, &job_ref)?;
                Ok::<_, ControllerError>((entry.job.id.clone(), entry.job.report_ready, entry.spec.is_pipeline()))
            })
            .await?;
        if !is_pipeline {
            return Err(ControllerError::FailedPrecondition(format!("job {id} is not a pipeline; it has no report")));
        }
        if !ready {
            return Err(ControllerError::FailedPrecondition(format!(
                "job {id} has no report yet: it is written when every stage has succeeded (`cohort status {id}`)"
            )));
        }
        let stored = self.store.get(&format!("reports/{id}")).await?.ok_or_else(|| {
            ControllerError::FailedPrecondition(format!("the report of {id} is missing from the store"))
        })?;
        PipelineReport::decode(stored.value.as_slice())
            .map_err(|e| ControllerError::FailedPrecondition(format!("the stored report of {id} is unreadable: {e}")))
    }

    pub async fn conversion_cache(&self) -> Result<Vec<ConversionCacheEntry>, ControllerError> {
        let mut entries: Vec<ConversionCacheEntry> = self
            .store
            .list("cache/")
            .await?
            .into_iter()
            .filter_map(|(_, v)| ConversionCacheEntry::decode(v.value.as_slice()).ok())
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used_unix_ms));
        Ok(entries)
    }

    /// Forgets an entry and deletes its directory on a node (the cache is shared storage).
    pub async fn remove_conversion(&self, key: &str) -> Result<ConversionCacheEntry, ControllerError> {
        if key.is_empty() {
            return Err(ControllerError::InvalidRequest("give the key of the entry (`cohort cache ls`)".into()));
        }
        let matches: Vec<ConversionCacheEntry> =
            self.conversion_cache().await?.into_iter().filter(|e| e.key.starts_with(key)).collect();
        let entry = match matches.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(ControllerError::InvalidRequest(format!(
                    "no cache entry {key:?}: `cohort cache ls` lists them"
                )));
            }
            _ => {
                return Err(ControllerError::InvalidRequest(format!(
                    "{key:?} matches {} entries; give more of the key",
                    matches.len()
                )));
            }
        };
        let key = entry.key.clone();
        let in_use = self
            .state
            .call(move |state, _| {
                state
                    .jobs
                    .values()
                    .filter(|e| e.spec.is_pipeline() && !e.is_terminal())
                    .find_map(|e| e.job.stages.iter().find(|s| s.cache_key == key).map(|_| e.job.id.clone()))
            })
            .await;
        if let Some(job) = in_use {
            return Err(ControllerError::FailedPrecondition(format!(
                "cache entry {} is used by the running pipeline {job}; remove it when that has ended",
                entry.key
            )));
        }
        // As the node's rank-user (the entry outlives the job that wrote it), never as the agent's root.
        let inspect = InspectPathCommand { path: entry.path.clone(), remove: true, ..Default::default() };
        self.ask(&BTreeMap::new(), Command::InspectPath(inspect))
            .await
            .map_err(|e| ControllerError::FailedPrecondition(format!("deleting {}: {e}", entry.path)))?;
        self.store.delete(&format!("cache/{}", entry.key), Expect::Any).await?;
        tracing::info!(key = %entry.key, path = %entry.path, "conversion cache entry removed");
        Ok(entry)
    }
}

/// Outputs and checkpoints of the stages that have them.
fn resolved(stages: &[PipelineStage]) -> Resolved {
    let mut resolved = Resolved::default();
    for stage in stages {
        if !stage.output.is_empty() {
            resolved.outputs.insert(stage.name.clone(), stage.output.clone());
        }
        if !stage.checkpoint.is_empty() {
            resolved.checkpoints.insert(stage.name.clone(), stage.checkpoint.clone());
        }
    }
    resolved
}

pub(super) fn kind_name(spec: &JobSpec) -> &'static str {
    match spec.workload {
        Workload::Command(_) => "command",
        Workload::MegatronSft(_) => "megatron-sft",
        Workload::Pipeline(_) => "pipeline",
    }
}
