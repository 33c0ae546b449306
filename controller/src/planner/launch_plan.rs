//! Rendering an attempt: the layout the job record keeps, and from it each
//! node's processes (argv and the environment contract of DESIGN.md) and the
//! prepare and launch commands the agents receive. Every rendering rule is here
//! once; nothing reads a clock, the store or the network.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cohort_proto::{
    Checkpoint, EnvVar, GangPlan, LaunchCommand, NodeAssignment, PrepareCommand, ProcessSpec, StageInput, StageStatus,
};
use cohort_shared::spec::{FlagValue, HubLayout, JobSpec, LaunchMode, StageSpec, Workload};

use super::placement::{NodeView, Placement};
use super::{join, swift_argcheck};

/// What `render` needs besides the spec and the placement.
pub struct RenderInput<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub master_port: u16,
    /// Absolute workdir on every node, or None for a per-job directory the agent makes.
    pub workdir: Option<&'a str>,
}

/// Renders the attempt's layout: nodes in rank order with their address and
/// GPUs, the master address and port, but not the processes. The job record
/// keeps only this: each node's processes (argv and the full environment, which
/// names every node's address) are rendered by [`node_processes`] when its launch
/// command is sent, so the record grows with the number of nodes, not with its
/// square. Nodes absent from `nodes` (which `place` never returns) get an empty address.
pub fn layout(spec: &JobSpec, placement: &Placement, nodes: &[NodeView], input: &RenderInput) -> GangPlan {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let address = |name: &str| by_name.get(name).map(|n| n.address.clone()).unwrap_or_default();
    let master_addr = placement.nodes.first().map(|(n, _)| address(n)).unwrap_or_default();
    let assignments = placement
        .nodes
        .iter()
        .enumerate()
        .map(|(rank, (name, gpus))| NodeAssignment {
            node_name: name.clone(),
            address: address(name),
            node_rank: rank as u32,
            gpu_indices: gpus.clone(),
            workdir: input.workdir.unwrap_or_default().to_string(),
            processes: Vec::new(),
        })
        .collect();
    GangPlan {
        master_addr,
        master_port: input.master_port as u32,
        nodes: assignments,
        notes: placement.notes.clone(),
        argv: command_line(spec).0,
    }
}

/// The command line every node runs, and whether once per node or per rank.
pub fn command_line(spec: &JobSpec) -> (Vec<String>, LaunchMode) {
    match &spec.workload {
        Workload::Command(c) => (c.argv.clone(), c.launch),
        Workload::MegatronSft(m) => (m.render_args(), LaunchMode::PerNode),
        // A pipeline runs nothing itself; its stages are jobs of their own.
        Workload::Pipeline(_) => (Vec::new(), LaunchMode::PerNode),
    }
}

/// Renders one node's processes of a laid-out attempt with the environment
/// contract: the contract's variables, then the node's defaults (unless the job
/// sets them), then Cohort's own, then the job's `env`.
pub fn node_processes(
    spec: &JobSpec,
    plan: &GangPlan,
    node: &NodeAssignment,
    node_env: &[EnvVar],
    input: &RenderInput,
) -> Vec<ProcessSpec> {
    let nnodes = plan.nodes.len() as u32;
    let nproc = nproc_per_node(spec);
    let node_ips: Vec<&str> = plan.nodes.iter().map(|a| a.address.as_str()).collect();
    let (argv, mode) = command_line(spec);
    let node_rank = node.node_rank;
    let mut env = vec![
        var("NNODES", nnodes),
        var("NODE_RANK", node_rank),
        var("NPROC_PER_NODE", nproc),
        var("WORLD_SIZE", nnodes * nproc),
        var("MASTER_ADDR", &plan.master_addr),
        var("MASTER_PORT", plan.master_port),
        var("CUDA_VISIBLE_DEVICES", join(&node.gpu_indices)),
    ];
    env.extend(node_defaults(spec, node_env));
    env.extend([
        var("COHORT_JOB_ID", input.job_id),
        var("COHORT_ATTEMPT", input.attempt),
        var("COHORT_NODE_NAME", &node.node_name),
        var("COHORT_NODE_IPS", node_ips.join(",")),
    ]);
    if let Some((array, index)) = cohort_shared::spec::array::element_of(input.job_id) {
        env.extend([var("COHORT_ARRAY_ID", array), var("COHORT_ARRAY_INDEX", index)]);
    }
    env.extend(job_vars(spec));
    match mode {
        LaunchMode::PerNode => vec![ProcessSpec { index: 0, argv, env, global_rank: None }],
        LaunchMode::PerRank => (0..nproc)
            .map(|local| {
                let global = node_rank * nproc + local;
                let mut env = env.clone();
                env.push(var("RANK", global));
                env.push(var("LOCAL_RANK", local));
                // What torchrun sets besides: processes on this node, and the node's rank.
                env.push(var("LOCAL_WORLD_SIZE", nproc));
                env.push(var("GROUP_RANK", node_rank));
                ProcessSpec { index: local, argv: argv.clone(), env, global_rank: Some(global) }
            })
            .collect(),
    }
}

/// Processes per node (NPROC_PER_NODE): one per GPU, and one on a node without GPUs.
pub fn nproc_per_node(spec: &JobSpec) -> u32 {
    spec.gpus_per_node.max(1)
}

/// The node's defaults that the job does not set itself: the job's own env wins.
fn node_defaults<'a>(spec: &'a JobSpec, node_env: &'a [EnvVar]) -> impl Iterator<Item = EnvVar> + 'a {
    node_env.iter().filter(|v| !spec.env.contains_key(&v.name)).cloned()
}

fn job_vars(spec: &JobSpec) -> impl Iterator<Item = EnvVar> + '_ {
    spec.env.iter().map(|(k, v)| var(k, v))
}

/// The environment a job runs with on a node outside a launch (no contract
/// variables): the node's defaults, then the job's `env`.
pub fn job_env(spec: &JobSpec, node_env: &[EnvVar]) -> Vec<EnvVar> {
    node_defaults(spec, node_env).chain(job_vars(spec)).collect()
}

/// Renders each node's processes: [`layout`] plus [`node_processes`] for every
/// node, as `cohort plan` shows it.
pub fn render(spec: &JobSpec, placement: &Placement, nodes: &[NodeView], input: &RenderInput) -> GangPlan {
    let mut plan = layout(spec, placement, nodes, input);
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let processes: Vec<Vec<ProcessSpec>> = plan
        .nodes
        .iter()
        .map(|a| {
            let node_env = by_name.get(a.node_name.as_str()).map(|n| n.node_env.as_slice()).unwrap_or_default();
            node_processes(spec, &plan, a, node_env, input)
        })
        .collect();
    for (a, processes) in plan.nodes.iter_mut().zip(processes) {
        a.processes = processes;
    }
    plan
}

/// The spec an attempt runs: the job's own, with the resume flags when the
/// attempt resumes from a checkpoint, and, for a megatron-sft job whose
/// `preempt:` signal is SIGTERM, Megatron-LM's save on that signal where its
/// ms-swift passes it on ([`cohort_shared::megatron::with_save_on_sigterm`]).
pub fn attempt_spec(spec: &JobSpec, resume_from: Option<&Checkpoint>) -> JobSpec {
    let mut running = spec.clone();
    if let Workload::MegatronSft(m) = &mut running.workload {
        if let Some(ckpt) = resume_from {
            *m = cohort_shared::checkpoint::apply_resume(m, &to_shared_checkpoint(ckpt));
        }
        if spec.preempt.as_ref().is_some_and(|p| p.signal == "SIGTERM")
            && let Some(saving) = cohort_shared::megatron::with_save_on_sigterm(m)
        {
            *m = saving;
        }
    }
    running
}

/// What a command job's attempt is told of the checkpoint it resumes from:
/// `COHORT_RESUME_FROM`, the checkpoint's own directory (`<checkpoints>/iter_0000600`),
/// and `COHORT_RESUME_ITERATION`.
fn resume_vars(c: &Checkpoint) -> [EnvVar; 2] {
    let dir = match c.layout.as_str() {
        "megatron-iter" => format!("{}/iter_{:07}", c.path.trim_end_matches('/'), c.iteration),
        _ => c.path.clone(),
    };
    [var("COHORT_RESUME_FROM", dir), var("COHORT_RESUME_ITERATION", c.iteration)]
}

/// A found checkpoint (as agents report it) in the domain's terms.
pub fn to_shared_checkpoint(c: &Checkpoint) -> cohort_shared::checkpoint::Checkpoint {
    use cohort_shared::checkpoint::{Checkpoint as Shared, CheckpointLayout};
    let path = std::path::PathBuf::from(&c.path);
    let (layout, run_dir) = if c.layout == "swift-checkpoint-n" {
        (CheckpointLayout::SwiftCheckpointN, path.parent().map(|p| p.to_path_buf()).unwrap_or_default())
    } else {
        // The Megatron layout's checkpoint path is its run directory.
        (CheckpointLayout::MegatronIter, path.clone())
    };
    Shared { iteration: c.iteration, layout, run_dir, path }
}

/// Where the job's checkpoints are looked up for a restart or a preemption:
/// a megatron-sft job's output directory, a command job's `checkpoints:`, or
/// its `preempt.checkpoints`.
pub fn checkpoint_dir(spec: &JobSpec) -> Option<String> {
    let declared = match &spec.workload {
        Workload::Command(c) => c.checkpoints.clone(),
        _ => None,
    };
    output_dir(spec).or(declared).or_else(|| spec.preempt.as_ref().and_then(|p| p.checkpoints.clone()))
}

/// Where a megatron-sft job writes (its save/output_dir), made absolute with
/// the workdir: where preparation proves it shared, where the last rank's
/// metrics are read and where checkpoints are looked for. None for other
/// kinds, or a relative directory without a workdir.
pub fn output_dir(spec: &JobSpec) -> Option<String> {
    let Workload::MegatronSft(m) = &spec.workload else { return None };
    let workdir = spec.workdir.as_deref().unwrap_or_default();
    match m.output_dir() {
        Some(dir) if dir.starts_with('/') => Some(dir.to_string()),
        Some(dir) if !workdir.is_empty() => Some(format!("{workdir}/{dir}")),
        _ => None,
    }
}

/// What an attempt's commands depend on besides the spec and its layout.
pub struct AttemptInputs<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    /// The checkpoint the attempt resumes from: a megatron-sft job's resume
    /// flags, a command job's `COHORT_RESUME_FROM` and `COHORT_RESUME_ITERATION`.
    pub resume_from: Option<&'a Checkpoint>,
    /// What the nodes staged: ready or cached items become `COHORT_STAGED_<NAME>`
    /// of the node that holds them.
    pub staged: &'a [StageStatus],
    /// Each node's own variables of the contract (MODELSCOPE_CACHE, ...), by node name.
    pub node_env: &'a HashMap<&'a str, &'a [EnvVar]>,
    /// The shared-path marker of the preparation; None renders no prepare commands.
    pub prepare_marker: Option<&'a str>,
    /// The job's `sync:` archive (its file's, not its spec's): every node
    /// fetches and unpacks it in the preparation.
    pub sync: Option<&'a cohort_proto::SyncArchive>,
}

/// Every node's commands of one attempt, in node-rank order.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub nodes: Vec<NodeLaunch>,
}

/// One node's commands, as its agent receives them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLaunch {
    pub node_name: String,
    /// Present when the plan was rendered for the preparation.
    pub prepare: Option<PrepareCommand>,
    pub launch: LaunchCommand,
}

/// Renders the attempt laid out in `layout`: each node's processes, its launch
/// command and, with a marker, its prepare command.
pub fn launch_plan(spec: &JobSpec, layout: &GangPlan, inputs: &AttemptInputs) -> LaunchPlan {
    let running = attempt_spec(spec, inputs.resume_from);
    let render_input = RenderInput {
        job_id: inputs.job_id,
        attempt: inputs.attempt,
        master_port: layout.master_port as u16,
        workdir: spec.workdir.as_deref(),
    };
    let output_dir = output_dir(spec);
    let last_rank = layout.nodes.len().saturating_sub(1) as u32;
    let processes: Vec<Vec<ProcessSpec>> = layout
        .nodes
        .iter()
        .map(|a| {
            let node_env = inputs.node_env.get(a.node_name.as_str()).copied().unwrap_or_default();
            let mut processes = node_processes(&running, layout, a, node_env, &render_input);
            add_staged(&mut processes, &a.node_name, inputs.staged, &spec.stage);
            use_staged_model(&mut processes, &a.node_name, inputs.staged, spec);
            if let (Workload::Command(_), Some(ckpt)) = (&spec.workload, inputs.resume_from) {
                for process in &mut processes {
                    process.env.extend(resume_vars(ckpt));
                }
            }
            processes
        })
        .collect();
    let preparation = inputs.prepare_marker.map(|marker| Preparation::new(spec, layout, &processes, marker));
    let nodes = layout
        .nodes
        .iter()
        .zip(processes)
        .map(|(a, processes)| {
            let prepare = preparation.as_ref().map(|p| p.command(spec, &running, layout, a, inputs, &processes));
            let launch = LaunchCommand {
                job_id: inputs.job_id.into(),
                attempt: inputs.attempt,
                node_rank: a.node_rank,
                workdir: a.workdir.clone(),
                stop_grace_ms: u32::try_from(spec.stop_grace.as_millis()).unwrap_or(u32::MAX),
                processes,
                // ms-swift also writes its metrics to <output_dir>/.../logging.jsonl on the last rank.
                metrics_dir: match &output_dir {
                    Some(dir) if a.node_rank == last_rank => dir.clone(),
                    _ => String::new(),
                },
                user: spec.user.clone().unwrap_or_default(),
            };
            NodeLaunch { node_name: a.node_name.clone(), prepare, launch }
        })
        .collect();
    LaunchPlan { nodes }
}

/// `COHORT_STAGED_<NAME>` on each process for what `node` staged, and for a
/// `model:` input the hub's cache variable (MODELSCOPE_CACHE, HF_HUB_CACHE)
/// at the node's cache layout it was placed in.
fn add_staged(processes: &mut [ProcessSpec], node: &str, staged: &[StageStatus], items: &[StageSpec]) {
    for s in staged_on(staged, node) {
        let layout = items.iter().find(|i| i.name == s.item).and_then(StageSpec::hub_layout);
        for process in processes.iter_mut() {
            process.env.push(var(&JobSpec::staged_env_name(&s.item), &s.path));
            if let Some(layout) = layout.filter(|_| !s.hub_cache.is_empty()) {
                process.env.push(var(layout.cache_var(), &s.hub_cache));
            }
        }
    }
}

/// What `node` staged and holds (ready or cached, with a path).
fn staged_on<'a>(staged: &'a [StageStatus], node: &'a str) -> impl Iterator<Item = &'a StageStatus> + 'a {
    staged
        .iter()
        .filter(move |s| s.node_name == node && (s.state == "ready" || s.state == "cached") && !s.path.is_empty())
}

/// A megatron-sft job whose `--model` is the id of a `model:` input staged
/// into the ModelScope layout gets, on each node, that node's copy as
/// `--model` (`<MODELSCOPE_CACHE>/models/<owner>/<name>`, which still ends in
/// the id). ms-swift's ModelScope route lists the repo online for an id even
/// when the cache holds it (`MSHub.download_model` calls modelscope's
/// `snapshot_download` without `local_files_only`), and fails on a node without
/// internet; a path that exists is used as it is (`safe_snapshot_download`),
/// as a user pointing `--model` at a local copy would. The Hugging Face
/// layout needs no such help: huggingface_hub falls back to its cache offline.
fn use_staged_model(processes: &mut [ProcessSpec], node: &str, staged: &[StageStatus], spec: &JobSpec) {
    let Workload::MegatronSft(m) = &spec.workload else { return };
    let Some(id) = m.scalar("model") else { return };
    let Some(item) =
        spec.stage.iter().find(|s| s.model.as_deref() == Some(id) && s.hub_layout() == Some(HubLayout::Modelscope))
    else {
        return;
    };
    let Some(dir) = staged_on(staged, node)
        .find(|s| s.item == item.name && !s.hub_cache.is_empty())
        .and_then(|s| cohort_shared::spec::modelscope_model_dir(std::path::Path::new(&s.hub_cache), id))
    else {
        return;
    };
    let dir = dir.display().to_string();
    for process in processes.iter_mut() {
        for i in 1..process.argv.len() {
            if process.argv[i - 1] == "--model" && process.argv[i] == id {
                process.argv[i] = dir.clone();
            }
        }
    }
}

/// What every node's prepare command shares.
struct Preparation {
    marker: String,
    shared_paths: Vec<String>,
    output_dir: String,
    datasets: Vec<String>,
    stage: Vec<StageInput>,
}

impl Preparation {
    fn new(spec: &JobSpec, layout: &GangPlan, processes: &[Vec<ProcessSpec>], marker: &str) -> Self {
        let rank0_env = processes.first().and_then(|p| p.first()).map(|p| p.env.as_slice()).unwrap_or_default();
        let mut shared: BTreeSet<String> = spec.shared_paths.iter().cloned().collect();
        let mut datasets = Vec::new();
        let output_dir = output_dir(spec);
        if let Workload::MegatronSft(m) = &spec.workload {
            // A model staged into the ModelScope layout makes MODELSCOPE_CACHE each node's own.
            let staged_cache = spec.stage.iter().any(|s| s.hub_layout() == Some(HubLayout::Modelscope));
            if let Some(cache) = env_value(rank0_env, "MODELSCOPE_CACHE").filter(|_| !staged_cache) {
                shared.insert(cache);
            }
            if let Some(dir) = &output_dir {
                shared.insert(dir.clone());
            }
            if let Some(model) = m.model_ref().filter(|p| p.starts_with('/')) {
                shared.insert(model.to_string());
            }
            for value in m.flag("dataset").map(flag_values).unwrap_or_default() {
                // ms-swift's `path#N` samples N rows of a file.
                let path = value.split('#').next().unwrap_or_default();
                if path.ends_with(".jsonl") {
                    datasets.push(path.to_string());
                }
            }
        }
        let stage = spec
            .stage
            .iter()
            .map(|s| StageInput {
                name: s.name.clone(),
                source: s.source.clone(),
                sha256: s.sha256.clone().unwrap_or_default(),
                model: s.model.clone().unwrap_or_default(),
                layout: s.hub_layout().map(|l| l.as_str().to_owned()).unwrap_or_default(),
                // Filled in by the controller, which knows who holds what (controller::content).
                peers: Vec::new(),
                awaits_digest: false,
            })
            .collect();
        Preparation {
            marker: marker.to_string(),
            // One node has nobody to share with.
            shared_paths: if layout.nodes.len() > 1 { shared.into_iter().collect() } else { Vec::new() },
            output_dir: output_dir.unwrap_or_default(),
            datasets,
            stage,
        }
    }

    fn command(
        &self,
        spec: &JobSpec,
        running: &JobSpec,
        layout: &GangPlan,
        node: &NodeAssignment,
        inputs: &AttemptInputs,
        processes: &[ProcessSpec],
    ) -> PrepareCommand {
        let first = processes.first().cloned().unwrap_or_default();
        let mut interfaces: Vec<String> = Vec::new();
        for name in ["NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"] {
            for iface in env_value(&first.env, name).unwrap_or_default().split(',') {
                // "^docker" excludes and "=eth0" is exact in NCCL's syntax: only plain names are checked.
                if !iface.is_empty() && !iface.starts_with('^') && !interfaces.contains(&iface.to_string()) {
                    interfaces.push(iface.trim_start_matches('=').to_string());
                }
            }
        }
        PrepareCommand {
            job_id: inputs.job_id.into(),
            attempt: inputs.attempt,
            node_rank: node.node_rank,
            python: spec.python.clone().unwrap_or_default(),
            probe_packages: matches!(spec.workload, Workload::MegatronSft(_)),
            shared_paths: self.shared_paths.clone(),
            marker: self.marker.clone(),
            output_dir: self.output_dir.clone(),
            master_port: layout.master_port,
            interfaces,
            stage: self.stage.clone(),
            datasets: self.datasets.clone(),
            workdir: node.workdir.clone(),
            swift_argcheck: swift_argcheck::for_job(running, &first.argv),
            user: spec.user.clone().unwrap_or_default(),
            env: first.env,
            sync: inputs.sync.cloned(),
        }
    }
}

/// The last value of `name` in `env` (a later entry wins, as in a shell).
fn env_value(env: &[EnvVar], name: &str) -> Option<String> {
    env.iter().rev().find(|v| v.name == name).map(|v| v.value.clone())
}

fn flag_values(value: &FlagValue) -> Vec<String> {
    match value {
        FlagValue::Scalar(s) => vec![s.clone()],
        FlagValue::List(l) => l.clone(),
    }
}

fn var(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.to_string(), value: value.to_string() }
}
