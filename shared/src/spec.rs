//! The job file: YAML parsed and validated into a [`JobSpec`], with every
//! problem reported at once, each naming its field and line.
//!
//! ```yaml
//! name: qwen3-8b-sft          # [a-z0-9]([-a-z0-9]*[a-z0-9])?, at most 48 characters
//! kind: megatron-sft          # or: command
//! nodes: 2
//! gpus_per_node: 2            # required for megatron-sft; default 0 for command
//! env: {PYTORCH_CUDA_ALLOC_CONF: "expandable_segments:True"}
//! megatron:                   # ms-swift flags, rendered in file order
//!   load: Qwen3-8B-mcore
//!   tensor_model_parallel_size: 2
//! ```
//! A command job has `command: [python3, train.py]` and `launch: per-node | per-rank`.

pub mod after;
pub mod array;
mod bounds;
mod fields;
#[doc(hidden)]
pub mod fuzzing;
mod preempt;
mod restart;
pub mod stage_document;
pub mod stages;
pub mod sync;

#[cfg(test)]
mod tests_support {
    use super::JobSpec;

    /// A one-node command job with `extra` lines appended, parsed; the error as text.
    pub(super) fn command_job_with(extra: &str) -> Result<JobSpec, String> {
        let yaml = format!("name: j\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [x]\n{extra}");
        JobSpec::from_yaml(&yaml, "j.yaml").map_err(|e| e.to_string())
    }
}

use std::collections::BTreeMap;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use crate::job_file::scalar::describe;
use crate::job_file::{Problems, suggestion};
pub use crate::job_file::{SpecErrors, SpecIssue};
use crate::megatron::checks::{Cluster, check_parallelism};
use crate::megatron::parse::read_megatron;
pub use crate::megatron::{FlagValue, MegatronSpec, ParallelLayout, SwiftVersion};
use crate::model::ModelConfig;
use fields::{check_name, read_command, read_env, read_node_selector};
pub use preempt::{DEFAULT_PREEMPT_GRACE, MAX_PREEMPT_GRACE, PreemptPolicy, SIGNALS as PREEMPT_SIGNALS};
pub use restart::{BACKOFF_RESET_AFTER, DEFAULT_STRAGGLER_FACTOR, RestartPolicy, backoff_step};

/// A validated job file.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// DNS-label-like: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 48 characters.
    pub name: String,
    /// At least 1.
    pub nodes: u32,
    /// GPUs each node gives the job (= `NPROC_PER_NODE` for megatron-sft, which needs >= 1).
    pub gpus_per_node: u32,
    /// Extra environment, in file order; YAML numbers and bools become their text.
    pub env: IndexMap<String, String>,
    /// The `env` names written `NAME: {value: ..., secret: true}`: never shown or logged.
    pub secret_env: std::collections::BTreeSet<String>,
    /// The user the processes run as (`user:`); None: each node's rank-user.
    pub user: Option<String>,
    /// The directory the processes start in, on every node. A relative path is
    /// kept as written; the controller resolves it against the job file's directory.
    pub workdir: Option<String>,
    /// Labels a node must carry to be chosen.
    pub node_selector: BTreeMap<String, String>,
    /// Higher runs first; default 0.
    pub priority: i32,
    /// Time between SIGTERM and SIGKILL when the gang is stopped; default 10s.
    pub stop_grace: Duration,
    /// No progress for this long means the job hangs.
    pub hang_timeout: Option<Duration>,
    /// Wall time one attempt may hold its GPUs, counted from its placement
    /// (preparation included, as Slurm counts from the allocation); past it
    /// the gang is stopped and the attempt fails with cause `time_limit`, not
    /// restarted unless `restart.on` names `time_limit`.
    pub time_limit: Option<Duration>,
    /// The queue the job waits in (`queue:`); None: the controller's default queue.
    pub queue: Option<String>,
    /// How it saves before a preemption stops it (`preempt:`); None: it is stopped as any gang.
    pub preempt: Option<PreemptPolicy>,
    /// New attempts after a failure (`restart:`); none by default.
    pub restart: RestartPolicy,
    /// A node progressing this many times slower than the others is a straggler.
    pub straggler_factor: f64,
    /// The interpreter preflight probes (default: each agent's `--python`).
    pub python: Option<String>,
    /// Inputs copied into every node's local cache before launch.
    pub stage: Vec<StageSpec>,
    /// Paths proven to be the same on every node before launch (besides the
    /// ones a megatron-sft job implies: MODELSCOPE_CACHE, output dir, model).
    pub shared_paths: Vec<String>,
    /// What a dataset with bad rows does to a megatron-sft launch.
    pub dataset_policy: DatasetPolicy,
    /// Jobs this one waits for (`after:`); not for pipelines.
    pub after: Vec<after::Dependency>,
    /// A job array (`array:`): the controller makes one job per element; not for pipelines.
    pub array: Option<array::ArraySpec>,
    /// `sweep:`: each element of the array gets one combination of these as env.
    pub sweep: array::Sweep,
    /// `sync:`: a local directory the CLI uploads and every node unpacks as
    /// the processes' working directory; not for pipelines.
    pub sync: Option<sync::SyncSpec>,
    pub workload: Workload,
}

/// One `stage:` entry: a file or directory (local path on a shared mount, or
/// an http(s) URL of a file) copied into each node's cache, SHA-256 verified.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Names the input; the processes find it at `$COHORT_STAGED_<NAME>`.
    /// Defaults, for a `model:` entry, to the model id with '/' and '.' as '_'.
    #[serde(default)]
    pub name: String,
    pub source: String,
    /// Expected hex SHA-256 (of the file; of the manifest for a directory).
    #[serde(default)]
    pub sha256: Option<String>,
    /// A hub model id (`Qwen/Qwen3-8B`): the staged directory is also placed
    /// where the hub library finds that id offline, in the node's cache layout.
    #[serde(default)]
    pub model: Option<String>,
    /// Which hub's cache layout a `model:` goes into (default modelscope).
    #[serde(default)]
    pub layout: Option<HubLayout>,
}

/// The on-disk cache layout of a model hub library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HubLayout {
    /// ModelScope's: `$MODELSCOPE_CACHE/models/<owner>/<name>` (dots as `___`).
    Modelscope,
    /// Hugging Face's: `$HF_HUB_CACHE/models--<owner>--<name>/{refs,snapshots}`.
    Huggingface,
}

impl HubLayout {
    /// The variable that points the library at the cache.
    pub fn cache_var(self) -> &'static str {
        match self {
            HubLayout::Modelscope => "MODELSCOPE_CACHE",
            HubLayout::Huggingface => "HF_HUB_CACHE",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HubLayout::Modelscope => "modelscope",
            HubLayout::Huggingface => "huggingface",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "modelscope" => Some(HubLayout::Modelscope),
            "huggingface" => Some(HubLayout::Huggingface),
            _ => None,
        }
    }
}

/// Where the ModelScope layout keeps model `id` under the cache root `root`
/// (the processes' `MODELSCOPE_CACHE`): `<root>/models/<owner>/<name>`, dots
/// in the name written `___`, as the SDKs before 1.38 wrote it and
/// modelscope-hub still probes first. None when `id` is not an `owner/name`
/// id that is safe as a path ([`is_model_id`]).
pub fn modelscope_model_dir(root: &std::path::Path, id: &str) -> Option<std::path::PathBuf> {
    let (owner, name) = id.split_once('/').filter(|_| is_model_id(id))?;
    Some(root.join("models").join(owner).join(name.replace('.', "___")))
}

impl StageSpec {
    /// The layout a `model:` entry is placed in (None: not a model).
    pub fn hub_layout(&self) -> Option<HubLayout> {
        self.model.as_ref().map(|_| self.layout.unwrap_or(HubLayout::Modelscope))
    }
}

/// Whether `id` is a hub model id `owner/name` that is safe as a path:
/// letters, digits, '-', '_' and '.' in each part, neither part '.' or '..'.
pub fn is_model_id(id: &str) -> bool {
    let Some((owner, name)) = id.split_once('/') else { return false };
    [owner, name].iter().all(|part| {
        !part.is_empty()
            && *part != "."
            && *part != ".."
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

pub use crate::dataset::DatasetPolicy;

impl JobSpec {
    /// Whether placement is followed by a preparation phase on every node.
    pub fn needs_preparation(&self) -> bool {
        if self.is_pipeline() {
            return false;
        }
        matches!(self.workload, Workload::MegatronSft(_))
            || !self.stage.is_empty()
            || !self.shared_paths.is_empty()
            || self.sync.is_some()
    }

    /// Whether the job is a pipeline of stages (it runs no processes itself).
    pub fn is_pipeline(&self) -> bool {
        matches!(self.workload, Workload::Pipeline(_))
    }

    /// The env name under which the processes find a staged input.
    pub fn staged_env_name(item: &str) -> String {
        let upper: String =
            item.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("COHORT_STAGED_{upper}")
    }
}

/// What the job runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Command(CommandSpec),
    MegatronSft(MegatronSpec),
    /// `kind: pipeline`: stages run in dependency order, each its own gang launch.
    Pipeline(stages::PipelineSpec),
}

/// `kind: command`: any program with Cohort's environment contract.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    /// The program and its arguments, passed without a shell.
    pub argv: Vec<String>,
    pub launch: LaunchMode,
    /// `checkpoints:`, the absolute directory the job writes Megatron-layout
    /// checkpoints to (`iter_NNNNNNN/` and `latest_checkpointed_iteration.txt`):
    /// a restart or a preemption looks the newest complete one up there, and the
    /// next attempt gets `COHORT_RESUME_FROM` and `COHORT_RESUME_ITERATION`.
    pub checkpoints: Option<String>,
}

/// How many processes a command job starts on each node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaunchMode {
    /// One process per node (e.g. torchrun, which starts its own ranks).
    PerNode,
    /// One process per GPU, each with `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` and `GROUP_RANK`.
    PerRank,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum JobKind {
    Command,
    MegatronSft,
    Pipeline,
}

/// The top-level keys of command and megatron-sft jobs besides those every
/// job has ([`stages::INHERITED_KEYS`], read by `read_common`); `name` and
/// `kind` a pipeline has too.
const JOB_KEYS: &[&str] = &[
    "name",
    "kind",
    "nodes",
    "gpus_per_node",
    "command",
    "launch",
    "checkpoints",
    "megatron",
    "after",
    "array",
    "sweep",
    "sync",
];

/// Every top-level key of a job file, of any kind.
fn top_level_keys() -> impl Iterator<Item = &'static str> + Clone {
    JOB_KEYS.iter().chain(stages::INHERITED_KEYS).chain(stages::PIPELINE_KEYS).copied()
}

/// Keys that the design names but this version does not implement yet.
const NOT_YET_SUPPORTED: &[&str] = &[];

/// Whether `name` can be an environment variable of a job: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Variables that Cohort sets for every process; a job may not override them.
pub const RESERVED_ENV: &[&str] = &[
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "CUDA_VISIBLE_DEVICES",
];

/// Prefix of Cohort's own variables (`COHORT_JOB_ID`, ...), reserved as a whole.
pub const RESERVED_ENV_PREFIX: &str = "COHORT_";

pub const MAX_NAME_LEN: usize = 48;
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest `stop_grace`: a stop that waits longer holds GPUs no one uses
/// (and an hour in milliseconds still fits the wire's u32).
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);
/// The longest `time_limit`: 30 days.
pub const MAX_TIME_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

impl JobSpec {
    /// Parses and validates a job file. `source` names the file in messages.
    /// Every problem found is returned, not just the first; a YAML syntax error
    /// stops the parse and is then the only one.
    pub fn from_yaml(text: &str, source: &str) -> Result<JobSpec, SpecErrors> {
        let fail = |issues| SpecErrors { source: source.to_owned(), issues };
        let root = parse_document(text).map_err(|issue| fail(vec![issue]))?;
        let mut problems = Problems::new(text);
        match read_job(&root, &mut problems) {
            Some(spec) if problems.is_empty() => Ok(spec),
            _ => {
                // File order reads best; problems without a line go last.
                let mut issues = problems.into_issues();
                issues.sort_by_key(|i| i.line.unwrap_or(usize::MAX));
                Err(fail(issues))
            }
        }
    }

    /// Remarks that do not stop the job: a model missing from the built-in table
    /// (so the head, layer and memory checks were skipped), ms-swift 3.x's
    /// `finetune` default. (A flag ms-swift does not know is an error.)
    /// Lines are not known here (`line` is None).
    pub fn warnings(&self) -> Vec<SpecIssue> {
        let Workload::MegatronSft(megatron) = &self.workload else {
            return Vec::new();
        };
        let mut warnings = Vec::new();
        let mut warn = |field: String, message: String| {
            warnings.push(SpecIssue { field, line: None, message });
        };
        let version = megatron.swift_version;
        if let (Some(model_ref), Some(model_key)) = (megatron.model_ref(), megatron.model_key())
            && ModelConfig::known(model_ref).is_none()
        {
            warn(
                format!("megatron.{model_key}"),
                format!(
                    "model {model_ref:?} is not in Cohort's model table; the head, layer and recompute checks and the memory estimate were skipped"
                ),
            );
        }
        if version == SwiftVersion::V3 && !megatron.flags.contains_key("finetune") {
            warn(
                "megatron.finetune".to_owned(),
                "ms-swift 3.x defaults finetune to false, which resumes the iteration and optimizer state of `load`; a fresh fine-tune sets finetune: true".to_owned(),
            );
        }
        let saves_on_sigterm = self.preempt.as_ref().is_some_and(|p| p.signal == "SIGTERM")
            && crate::megatron::with_save_on_sigterm(megatron).is_some();
        let workers = match megatron.flags.get("num_workers") {
            Some(FlagValue::Scalar(n)) => n.trim().parse::<u32>().ok(),
            _ => Some(4),
        };
        if saves_on_sigterm && workers != Some(0) {
            warn(
                "megatron.num_workers".to_owned(),
                format!(
                    "a preemption makes this job save through Megatron-LM's exit_signal_handler (merged into \
                     megatron_extra_kwargs), and ms-swift 3.x's dataloader workers ({} of them) then read \
                     args.exit_signal, which Megatron-LM core_r0.15.0 does not define (trainers/base.py:1191): with \
                     that Megatron-LM set num_workers: 0, or set exit_signal_handler: false in megatron_extra_kwargs",
                    workers.map_or_else(|| "num_workers".to_owned(), |n| n.to_string())
                ),
            );
        }
        if self.workdir.is_none() && self.sync.is_none() {
            for (key, path) in relative_paths(megatron) {
                warn(
                    format!("megatron.{key}"),
                    format!(
                        "{path:?} is relative and the job sets no `workdir:`, so every rank resolves it against the \
                         per-job directory its agent makes: <agent --work-dir>/jobs/<job id>/workdir/{path} \
                         (/var/lib/cohort-agent/jobs/<job id>/workdir/{path} by default), on each node's own disk; \
                         give an absolute path, set `workdir:` to the shared directory it is under, or `sync:` \
                         the local directory that holds it"
                    ),
                );
            }
        }
        warnings
    }

    /// Per-GPU memory in GiB for the model weights, gradients and optimizer state
    /// of a megatron-sft job, activations and framework overhead EXCLUDED:
    /// parameters per GPU = params / (TP·PP), at 6 + 12/DP bytes each with the
    /// distributed optimizer (bf16 weights, fp32 gradients and Adam state), 18
    /// without it. Qwen3-8B at TP 2, DP 1 gives 68.7 GiB. None for command jobs,
    /// unknown models and layouts that do not divide.
    pub fn memory_estimate_gib(&self) -> Option<f64> {
        let Workload::MegatronSft(megatron) = &self.workload else {
            return None;
        };
        let model = self.model()?;
        let layout = megatron.layout(self.nodes, self.gpus_per_node);
        if layout.dp == 0 {
            return None;
        }
        let params_per_gpu = model.parameter_count() as f64 / f64::from(layout.tp * layout.pp);
        let bytes_per_param = if megatron.bool_flag("use_distributed_optimizer") == Some(false) {
            18.0
        } else {
            6.0 + 12.0 / f64::from(layout.dp)
        };
        Some(params_per_gpu * bytes_per_param / f64::from(1u32 << 30))
    }

    /// The model of a megatron-sft job, when the built-in table knows it.
    pub fn model(&self) -> Option<ModelConfig> {
        match &self.workload {
            Workload::MegatronSft(megatron) => ModelConfig::known(megatron.model_ref()?),
            Workload::Command(_) | Workload::Pipeline(_) => None,
        }
    }

    /// The parallel layout of a megatron-sft job.
    pub fn layout(&self) -> Option<ParallelLayout> {
        match &self.workload {
            Workload::MegatronSft(megatron) => Some(megatron.layout(self.nodes, self.gpus_per_node)),
            Workload::Command(_) | Workload::Pipeline(_) => None,
        }
    }

    /// nodes × gpus_per_node.
    pub fn world_size(&self) -> u32 {
        self.nodes.saturating_mul(self.gpus_per_node)
    }
}

/// The top-level mapping, or the one issue that stops parsing.
fn parse_document(text: &str) -> Result<Mapping, SpecIssue> {
    let whole = |line, message: String| SpecIssue { field: String::new(), line, message };
    bounds::check(text)?;
    let mut value: Value = serde_yaml_ng::from_str(text).map_err(|err| {
        // Some errors (several documents, recursion limits) carry no position:
        // the second document's `---`, else the document as a whole (line 1).
        let line = err.location().map(|location| location.line()).or_else(|| second_document(text)).unwrap_or(1);
        whole(Some(line), format!("not valid YAML: {err}"))
    })?;
    value.apply_merge().map_err(|err| {
        let line = crate::job_file::locate::line_of(text, &["<<"]).unwrap_or(1);
        whole(Some(line), format!("bad YAML merge key: {err}"))
    })?;
    match value {
        Value::Mapping(root) => Ok(root),
        Value::Null => Err(whole(Some(1), "the job file is empty".to_owned())),
        other => {
            Err(whole(Some(1), format!("a job file is a mapping (`name: ...`, `kind: ...`), got {}", describe(&other))))
        }
    }
}

/// The line of the `---` that starts a second YAML document, if any.
fn second_document(text: &str) -> Option<usize> {
    let mut content = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") && content {
            return Some(i + 1);
        }
        content |= !line.trim().is_empty() && !line.trim_start().starts_with('#') && !line.starts_with("---");
    }
    None
}

fn read_job(root: &Mapping, problems: &mut Problems) -> Option<JobSpec> {
    check_top_level_keys(root, problems);

    let name = typed::<String>(root, "name", problems);
    match &name {
        Some(name) => check_name(name, problems),
        None => required(root, "name", "a job name such as `qwen3-8b-sft`", problems),
    }
    let kind = typed::<JobKind>(root, "kind", problems);
    if kind.is_none() {
        required(root, "kind", "`command`, `megatron-sft` or `pipeline`", problems);
    }
    if kind == Some(JobKind::Pipeline) {
        return read_pipeline_job(root, name, problems);
    }
    for key in stages::PIPELINE_KEYS {
        misplaced(root, key, "command or megatron-sft", "a pipeline job", problems);
    }
    let after = after::read_after(root, problems);
    let sync = sync::read_sync(root, problems);
    let common = read_common(root, problems);
    let sweep = array::read_sweep(root, &common.env, problems);
    let array = array::read_array(root, &sweep, problems);
    let nodes = typed::<u32>(root, "nodes", problems);
    match nodes {
        Some(0) => problems.at(&["nodes"], "must be at least 1"),
        None => required(root, "nodes", "the number of nodes, at least 1", problems),
        Some(_) => {}
    }
    let gpus_per_node = typed::<u32>(root, "gpus_per_node", problems);

    let workload = match kind? {
        JobKind::Command => {
            misplaced(root, "megatron", "command", "a megatron-sft job", problems);
            read_command(root, problems).map(Workload::Command)
        }
        JobKind::Pipeline => None,
        JobKind::MegatronSft => {
            misplaced(root, "command", "megatron-sft", "a command job", problems);
            misplaced(
                root,
                "launch",
                "megatron-sft",
                "a command job (megatron sft starts torchrun once per node)",
                problems,
            );
            misplaced(
                root,
                "checkpoints",
                "megatron-sft",
                "a command job (a megatron-sft job resumes from its megatron.save or output_dir)",
                problems,
            );
            match gpus_per_node {
                Some(0) => problems.at(&["gpus_per_node"], "megatron-sft needs at least 1 GPU per node"),
                None => required(
                    root,
                    "gpus_per_node",
                    "the GPUs each node gives the job (NPROC_PER_NODE), at least 1",
                    problems,
                ),
                Some(_) => {}
            }
            let megatron = read_megatron_section(root, problems)?;
            check_megatron(&megatron, nodes, gpus_per_node, root, problems);
            Some(Workload::MegatronSft(megatron))
        }
    };
    let mut spec = common.into_spec(name?, nodes?, gpus_per_node.unwrap_or(0), workload?);
    spec.after = after;
    spec.array = array;
    spec.sweep = sweep;
    spec.sync = sync;
    Some(spec)
}

/// A `kind: pipeline` job: the shared top-level fields, then `stages:`.
fn read_pipeline_job(root: &Mapping, name: Option<String>, problems: &mut Problems) -> Option<JobSpec> {
    // Read here for their errors; each stage's job inherits them (stages.rs).
    let common = read_common(root, problems);
    misplaced(root, "after", "pipeline", "a command or megatron-sft job (a stage waits on `depends_on`)", problems);
    misplaced(root, "array", "pipeline", "a command or megatron-sft job", problems);
    misplaced(root, "sweep", "pipeline", "a command or megatron-sft job", problems);
    misplaced(root, "sync", "pipeline", "a command or megatron-sft job", problems);
    let pipeline = stages::read_pipeline(root, problems.text(), problems)?;
    Some(common.into_spec(name?, 0, 0, Workload::Pipeline(pipeline)))
}

/// The top-level fields every kind of job has, read and checked once.
struct Common {
    env: IndexMap<String, String>,
    secret_env: std::collections::BTreeSet<String>,
    user: Option<String>,
    workdir: Option<String>,
    node_selector: BTreeMap<String, String>,
    priority: i32,
    stop_grace: Duration,
    hang_timeout: Option<Duration>,
    time_limit: Option<Duration>,
    queue: Option<String>,
    preempt: Option<PreemptPolicy>,
    restart: RestartPolicy,
    straggler_factor: f64,
    python: Option<String>,
    stage: Vec<StageSpec>,
    shared_paths: Vec<String>,
    dataset_policy: DatasetPolicy,
}

fn read_common(root: &Mapping, problems: &mut Problems) -> Common {
    let (env, secret_env) = read_env(root, problems);
    let user = read_user(root, problems);
    let workdir = typed::<String>(root, "workdir", problems);
    if workdir.as_deref().is_some_and(|dir| dir.trim().is_empty()) {
        problems.at(&["workdir"], "is empty; leave it out or name a directory");
    }
    let node_selector = read_node_selector(root, problems);
    let priority = typed::<i32>(root, "priority", problems).unwrap_or(0);
    let stop_grace = typed::<DurationText>(root, "stop_grace", problems).map_or(DEFAULT_STOP_GRACE, |d| d.0);
    if stop_grace > MAX_STOP_GRACE {
        problems.at(
            &["stop_grace"],
            format!(
                "{} is longer than the longest wait between SIGTERM and SIGKILL, {}; a trainer that needs more should save a checkpoint on SIGTERM",
                humantime::format_duration(stop_grace),
                humantime::format_duration(MAX_STOP_GRACE)
            ),
        );
    }
    let hang_timeout = typed::<DurationText>(root, "hang_timeout", problems).map(|d| d.0);
    if hang_timeout == Some(Duration::ZERO) {
        problems.at(&["hang_timeout"], "must be longer than zero; leave it out to turn hang detection off");
    }
    let time_limit = read_time_limit(root, problems);
    let queue = read_queue(root, problems);
    let preempt = preempt::read_preempt(root, problems);
    let restart = restart::read_restart(root, problems);
    let straggler_factor = restart::read_straggler_factor(root, problems);
    let python = typed::<String>(root, "python", problems);
    let mut stage = typed::<Vec<StageSpec>>(root, "stage", problems).unwrap_or_default();
    for item in &mut stage {
        if item.name.is_empty()
            && let Some(model) = &item.model
        {
            item.name = model.chars().map(|c| if c == '/' || c == '.' { '_' } else { c }).collect();
        }
    }
    check_stage(&stage, problems);
    let shared_paths = typed::<Vec<String>>(root, "shared_paths", problems).unwrap_or_default();
    for (i, path) in shared_paths.iter().enumerate() {
        if !path.starts_with('/') {
            problems.at_field(
                format!("shared_paths[{i}]"),
                &["shared_paths"],
                format!("{path:?} must be an absolute path"),
            );
        }
    }
    let dataset_policy = typed::<DatasetPolicy>(root, "dataset_policy", problems).unwrap_or_default();
    Common {
        env,
        secret_env,
        user,
        workdir,
        node_selector,
        priority,
        stop_grace,
        hang_timeout,
        time_limit,
        queue,
        preempt,
        restart,
        straggler_factor,
        python,
        stage,
        shared_paths,
        dataset_policy,
    }
}

impl Common {
    fn into_spec(self, name: String, nodes: u32, gpus_per_node: u32, workload: Workload) -> JobSpec {
        JobSpec {
            name,
            nodes,
            gpus_per_node,
            env: self.env,
            secret_env: self.secret_env,
            user: self.user,
            workdir: self.workdir,
            node_selector: self.node_selector,
            priority: self.priority,
            stop_grace: self.stop_grace,
            hang_timeout: self.hang_timeout,
            time_limit: self.time_limit,
            queue: self.queue,
            preempt: self.preempt,
            restart: self.restart,
            straggler_factor: self.straggler_factor,
            python: self.python,
            stage: self.stage,
            shared_paths: self.shared_paths,
            dataset_policy: self.dataset_policy,
            after: Vec::new(),
            array: None,
            sweep: Vec::new(),
            sync: None,
            workload,
        }
    }
}

/// `queue:`, a queue name of the controller's queue configuration (checked at submit).
fn read_queue(root: &Mapping, problems: &mut Problems) -> Option<String> {
    let queue = typed::<String>(root, "queue", problems)?;
    if !is_queue_name(&queue) {
        problems.at(
            &["queue"],
            format!("{queue:?} is not a queue name: use letters, digits, `-` and `_`, e.g. `team-a`; leave it out for the default queue"),
        );
        return None;
    }
    Some(queue)
}

/// Whether `name` can name a queue: 1 to 63 ASCII letters, digits, `-` or `_`.
pub fn is_queue_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `time_limit:`, the wall time one attempt may run: above zero, at most [`MAX_TIME_LIMIT`].
fn read_time_limit(root: &Mapping, problems: &mut Problems) -> Option<Duration> {
    let limit = typed::<DurationText>(root, "time_limit", problems).map(|d| d.0)?;
    if limit.is_zero() {
        problems.at(&["time_limit"], "must be longer than zero, e.g. `2h`; leave it out for no limit");
    } else if limit > MAX_TIME_LIMIT {
        problems.at(
            &["time_limit"],
            format!(
                "{} is longer than the longest time limit, {}; leave it out for no limit",
                humantime::format_duration(limit),
                humantime::format_duration(MAX_TIME_LIMIT)
            ),
        );
    }
    Some(limit)
}

/// `user:`, the account the processes run as (each node decides whether it allows it).
fn read_user(root: &Mapping, problems: &mut Problems) -> Option<String> {
    let user = typed::<String>(root, "user", problems);
    if user.as_deref().is_some_and(|u| u.trim().is_empty() || u.contains(char::is_whitespace) || u.contains(':')) {
        problems
            .at(&["user"], "must be a user name or uid without spaces or ':'; leave it out to run as the default user");
    }
    user
}

fn check_stage(stage: &[StageSpec], problems: &mut Problems) {
    let mut names = std::collections::HashSet::new();
    for (i, item) in stage.iter().enumerate() {
        let field = |f: &str| format!("stage[{i}].{f}");
        if item.name.is_empty() || !item.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            problems.at_field(
                field("name"),
                &["stage"],
                format!("{:?} must be letters, digits, '-' or '_'", item.name),
            );
        } else if !names.insert(item.name.to_ascii_lowercase()) {
            problems.at_field(field("name"), &["stage"], format!("{:?} is staged twice", item.name));
        }
        let remote = item.source.starts_with("http://") || item.source.starts_with("https://");
        if !remote && !item.source.starts_with('/') {
            problems.at_field(
                field("source"),
                &["stage"],
                format!("{:?} must be an absolute path or an http(s) URL", item.source),
            );
        }
        if let Some(digest) = &item.sha256
            && (digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()))
        {
            problems.at_field(field("sha256"), &["stage"], format!("{digest:?} is not a hex SHA-256 (64 hex digits)"));
        }
        match (&item.model, item.layout) {
            (Some(model), _) if !is_model_id(model) => problems.at_field(
                field("model"),
                &["stage"],
                format!("{model:?} is not a hub model id: write owner/name, e.g. Qwen/Qwen3-8B"),
            ),
            (None, Some(layout)) => problems.at_field(
                field("layout"),
                &["stage"],
                format!(
                    "layout {} needs a model: give the hub id the input is, e.g. model: Qwen/Qwen3-8B",
                    layout.as_str()
                ),
            ),
            _ => {}
        }
    }
}

/// A duration field, read with the same rules as everywhere else.
#[derive(Deserialize)]
struct DurationText(#[serde(with = "crate::duration::serde_duration")] Duration);

/// Deserialises one top-level field; a type error is reported with the serde path
/// inside the field (for structured fields) and its line. Null counts as absent.
fn typed<T: DeserializeOwned>(root: &Mapping, key: &str, problems: &mut Problems) -> Option<T> {
    let value = root.get(key).filter(|value| !value.is_null())?;
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let mut path = vec![key.to_owned()];
            let mut field = key.to_owned();
            for segment in err.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Seq { index } => field.push_str(&format!("[{index}]")),
                    other => {
                        field.push_str(&format!(".{other}"));
                        path.push(other.to_string());
                    }
                }
            }
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            problems.at_field(field, &path, in_words(&err.into_inner().to_string()));
            None
        }
    }
}

/// serde's type names in words a job file's author knows: "expected u32"
/// becomes "expected a whole number (e.g. 2)".
fn in_words(message: &str) -> String {
    const WORDS: &[(&str, &str)] = &[
        ("expected u8", "expected a whole number (e.g. 2)"),
        ("expected u16", "expected a whole number (e.g. 2)"),
        ("expected u32", "expected a whole number (e.g. 2)"),
        ("expected u64", "expected a whole number (e.g. 2)"),
        ("expected usize", "expected a whole number (e.g. 2)"),
        ("expected i32", "expected a whole number (e.g. 2)"),
        ("expected i64", "expected a whole number (e.g. 2)"),
        ("expected f32", "expected a number (e.g. 0.5)"),
        ("expected f64", "expected a number (e.g. 0.5)"),
        ("expected a sequence", "expected a list (e.g. [a, b])"),
        ("expected a map", "expected a mapping (key: value lines)"),
    ];
    let mut text = message.to_owned();
    for (serde, words) in WORDS {
        if let Some(at) = text.find(serde) {
            let end = at + serde.len();
            // "u32" but not "u320"; the rest of the message stays.
            if !text[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                text.replace_range(at..end, words);
            }
        }
    }
    text
}

/// Reports a missing required field, unless it is present but already reported.
fn required(root: &Mapping, key: &str, what: &str, problems: &mut Problems) {
    if root.get(key).is_none_or(Value::is_null) {
        problems.at(&[key], format!("is required: {what}"));
    }
}

fn misplaced(root: &Mapping, key: &str, kind: &str, belongs_to: &str, problems: &mut Problems) {
    if root.contains_key(key) {
        problems.at(&[key], format!("does not apply to kind {kind}; it belongs to {belongs_to}"));
    }
}

/// The first top-level line (not indented, no comment, sequence item or
/// document marker) for which `wanted(line, key)` holds, `key` being the text
/// before its first `:` read as YAML (None when it does not read).
fn first_top_level_line(text: &str, wanted: impl Fn(&str, Option<Value>) -> bool) -> Option<usize> {
    text.lines().enumerate().find_map(|(i, line)| {
        let top = !line.starts_with([' ', '\t', '#', '-', '.']);
        let key = line.split(':').next().unwrap_or_default();
        (top && wanted(line, serde_yaml_ng::from_str::<Value>(key).ok())).then_some(i + 1)
    })
}

/// The first top-level line whose key is not text (`&anchor:`, `1:`, `~:`).
fn line_of_odd_key(text: &str) -> Option<usize> {
    first_top_level_line(text, |line, key| !line.is_empty() && !matches!(key, Some(Value::String(_))))
}

/// The first top-level line whose key reads as empty text (`"": x`, `!!binary : x`).
fn line_of_empty_key(text: &str) -> Option<usize> {
    first_top_level_line(text, |line, key| {
        line.contains(':')
            && match key {
                Some(Value::String(s)) => s.trim().is_empty(),
                Some(Value::Tagged(tagged)) => {
                    tagged.value.as_str().is_some_and(|s| s.trim().is_empty()) || tagged.value.is_null()
                }
                Some(Value::Null) => true,
                _ => false,
            }
    })
}

fn check_top_level_keys(root: &Mapping, problems: &mut Problems) {
    for key in root.keys() {
        let Some(key) = key.as_str() else {
            let message = format!("top-level keys must be text, got {}", describe(key));
            // Found by the job_file fuzz target: such a key had neither a field nor a line.
            match line_of_odd_key(problems.text()) {
                Some(line) => problems.at_line(String::new(), Some(line), message),
                None => {
                    let shown = serde_yaml_ng::to_string(key).unwrap_or_default().trim().to_owned();
                    problems.at_line(if shown.is_empty() { "?".into() } else { shown }, None, message)
                }
            }
            continue;
        };
        if top_level_keys().any(|k| k == key) {
            continue;
        }
        if key.trim().is_empty() {
            // Found by the corpus test: `!!binary &c:` is an empty text key, which no line shows as such.
            let message = "an empty top-level key; each line is `field: value`".to_owned();
            let line = line_of_empty_key(problems.text()).unwrap_or(1);
            problems.at_line(String::new(), Some(line), message);
            continue;
        }
        let message = if NOT_YET_SUPPORTED.contains(&key) {
            format!("`{key}` is not supported yet")
        } else {
            format!("unknown key `{key}`{}", suggestion(key, top_level_keys()))
        };
        problems.at(&[key], message);
    }
}

fn read_megatron_section(root: &Mapping, problems: &mut Problems) -> Option<MegatronSpec> {
    match root.get("megatron") {
        None | Some(Value::Null) => {
            problems.at(&["megatron"], "is required for kind megatron-sft: a mapping of ms-swift flags");
            None
        }
        Some(section) => read_megatron(section, problems),
    }
}

fn check_megatron(
    megatron: &MegatronSpec,
    nodes: Option<u32>,
    gpus_per_node: Option<u32>,
    root: &Mapping,
    problems: &mut Problems,
) {
    // Which flags name the model: the table says whether this version has each
    // (`model` in 3.x since 3.10, where ms-swift loads Hugging Face weights itself).
    let candidates: &[&str] = match megatron.swift_version {
        SwiftVersion::V3 => &["load", "model"],
        SwiftVersion::V4 => &["model", "mcore_model"],
    };
    let sft = megatron.release.table().command(crate::megatron::table::MEGATRON_SFT);
    let model_keys: Vec<&str> =
        candidates.iter().copied().filter(|key| sft.is_some_and(|sft| sft.flag(key).is_some())).collect();
    let in_extra_args = |flag: &str| {
        megatron.extra_args.iter().any(|arg| arg == &format!("--{flag}") || arg.starts_with(&format!("--{flag}=")))
    };
    let has_model = megatron.model_ref().is_some() || model_keys.iter().any(|key| in_extra_args(key));
    // A flag reported as bad is absent from `flags` but present in the file.
    let reported = ["load", "model", "mcore_model"]
        .iter()
        .any(|key| root.get("megatron").and_then(|section| section.get(*key)).is_some());
    if !has_model && !reported {
        let named = model_keys
            .iter()
            .map(|key| match *key {
                "load" | "mcore_model" => format!("`{key}` (an mcore checkpoint)"),
                _ => format!("`{key}` (a Hugging Face model id or directory)"),
            })
            .collect::<Vec<_>>()
            .join(" or ");
        problems
            .at(&["megatron"], format!("names no model to fine-tune; with ms-swift {} set {named}", megatron.release));
    }
    let model = megatron.model_ref().and_then(ModelConfig::known);
    let cluster = Cluster { nodes, gpus_per_node };
    check_parallelism(megatron, &cluster, model.as_ref(), problems);
}

/// The relative paths of a megatron-sft section: the checkpoint it loads (3.x
/// `load`, 4.x `mcore_model`), where it saves, and its `.jsonl` datasets (a
/// `model` may be a hub name, a dataset without `.jsonl` a hub dataset).
fn relative_paths(megatron: &MegatronSpec) -> Vec<(&'static str, String)> {
    let mut paths = Vec::new();
    for key in ["load", "mcore_model", "save", "output_dir"] {
        if let Some(path) = megatron.scalar(key) {
            paths.push((key, path.to_owned()));
        }
    }
    for key in ["dataset", "val_dataset"] {
        let values = match megatron.flag(key) {
            Some(FlagValue::Scalar(v)) => vec![v.clone()],
            Some(FlagValue::List(vs)) => vs.clone(),
            None => Vec::new(),
        };
        for value in values {
            // ms-swift's `path#N` samples N rows of a file.
            let path = value.split('#').next().unwrap_or_default();
            if path.ends_with(".jsonl") {
                paths.push((key, path.to_owned()));
            }
        }
    }
    paths.retain(|(_, path)| !path.is_empty() && !path.starts_with('/'));
    paths
}
