//! `kind: pipeline`: a job whose `stages:` run in dependency order, each one an
//! ordinary gang launch (a `megatron-sft` or `command` job of its own), or one
//! of the built-in ms-swift steps `to_mcore`, `to_hf`, `infer`, `eval`.
//!
//! ```yaml
//! name: qwen3-ft
//! kind: pipeline
//! swift_version: 3                 # the dialect of the built-in steps
//! model: /mnt/models/Qwen3-8B      # the Hugging Face model the pipeline starts from
//! output_dir: /mnt/shared/runs     # stage outputs: <output_dir>/<job id>/<stage>
//! stages:
//!   - {name: convert, kind: to_mcore}
//!   - name: sft
//!     kind: megatron-sft
//!     nodes: 2
//!     gpus_per_node: 8
//!     megatron: {load: "${stages.convert.output}", tensor_model_parallel_size: 2}
//!   - {name: export, kind: to_hf, model: "${stages.sft.checkpoint}"}
//!   - {name: compare, kind: infer, prompts: /mnt/shared/prompts.jsonl, after: "${stages.export.output}"}
//! ```
//! A stage's own fields are checked here, each problem named `stages[i].field`;
//! a `megatron-sft` or `command` stage is checked by the same code as a job of
//! that kind (see `crate::pipeline::StageRun`).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_yaml_ng::{Mapping, Value};

use super::JobSpec;
use crate::job_file::scalar::{describe, scalar_text};
use crate::job_file::{Problems, SpecIssue, did_you_mean, suggestion};
use crate::megatron::table::{FlagType, Lookup};
use crate::megatron::{FlagValue, SwiftRelease, SwiftVersion};

/// What a stage runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepKind {
    /// A `megatron sft` gang, the `megatron:` section as in a megatron-sft job.
    MegatronSft,
    /// Any program, as in a command job.
    Command,
    /// `swift export --to_mcore true`: Hugging Face weights to a Megatron checkpoint (cached).
    ToMcore,
    /// `swift export --to_hf true`: a Megatron checkpoint back to Hugging Face weights.
    ToHf,
    /// `swift infer` of a prompt file on the model before and after training.
    Infer,
    /// `swift eval` (or the job's own tool) on named benchmarks, before and after.
    Eval,
}

impl StepKind {
    pub const ALL: [(&'static str, StepKind); 6] = [
        ("megatron-sft", StepKind::MegatronSft),
        ("command", StepKind::Command),
        ("to_mcore", StepKind::ToMcore),
        ("to_hf", StepKind::ToHf),
        ("infer", StepKind::Infer),
        ("eval", StepKind::Eval),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, kind)| *kind == self).map(|(name, _)| *name).unwrap_or("command")
    }

    fn parse(text: &str) -> Option<StepKind> {
        Self::ALL.iter().find(|(name, _)| *name == text).map(|(_, kind)| *kind)
    }

    /// Built-in steps take one GPU on one node.
    pub fn is_builtin(self) -> bool {
        matches!(self, StepKind::ToMcore | StepKind::ToHf | StepKind::Infer | StepKind::Eval)
    }

    /// The ms-swift command a built-in step runs (its flag table's key).
    pub fn swift_command(self) -> Option<&'static str> {
        match self {
            StepKind::ToMcore | StepKind::ToHf => Some("swift export"),
            StepKind::Infer => Some("swift infer"),
            StepKind::Eval => Some("swift eval"),
            StepKind::MegatronSft | StepKind::Command => None,
        }
    }

    /// Infer and eval run twice: on the model before and after training.
    pub fn is_comparison(self) -> bool {
        matches!(self, StepKind::Infer | StepKind::Eval)
    }

    /// Keys a stage of this kind may have besides the common ones.
    fn keys(self) -> &'static [&'static str] {
        match self {
            StepKind::MegatronSft => &["nodes", "gpus_per_node", "megatron"],
            StepKind::Command => &["nodes", "gpus_per_node", "command", "launch"],
            StepKind::ToMcore => &[
                "model",
                "torch_dtype",
                "test_convert_precision",
                "tensor_model_parallel_size",
                "pipeline_model_parallel_size",
                "extra_args",
            ],
            StepKind::ToHf => &["model", "torch_dtype", "test_convert_precision", "extra_args"],
            StepKind::Infer => &["prompts", "before", "after", "max_new_tokens", "temperature", "extra_args"],
            StepKind::Eval => &["benchmarks", "before", "after", "limit", "backend", "command", "extra_args"],
        }
    }
}

/// Keys every stage may have.
const COMMON_STAGE_KEYS: &[&str] = &["name", "kind", "depends_on", "output", "env"];

/// Top-level keys of a pipeline besides the ones every job has.
pub const PIPELINE_KEYS: &[&str] = &["swift_version", "model", "output_dir", "conversion_cache", "stages"];

/// Top-level keys every job has (`read_common` in spec.rs reads them), which a
/// pipeline passes on to the job of every stage: a stage failure goes through
/// the job's restart policy first.
pub const INHERITED_KEYS: &[&str] = &[
    "env",
    "workdir",
    "node_selector",
    "priority",
    "stop_grace",
    "hang_timeout",
    "time_limit",
    "queue",
    "preempt",
    "python",
    "stage",
    "shared_paths",
    "dataset_policy",
    "restart",
    "straggler_factor",
    "user",
];

/// A validated `kind: pipeline` job.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSpec {
    /// The ms-swift dialect of the built-in steps and megatron-sft stages; default 3.
    pub swift_version: SwiftVersion,
    /// The ms-swift release whose flag tables check the stages: `swift_version: 3`/`4` is the
    /// newest table of that major, `"3.10"` that minor's.
    pub swift_release: SwiftRelease,
    /// `swift_version` as written (`3`, `"3.10"`): what megatron-sft stages inherit.
    pub swift_version_written: String,
    /// The Hugging Face model the pipeline starts from: `to_mcore`'s input and
    /// the "before" model of `infer` and `eval`.
    pub model: Option<String>,
    /// Absolute and shared: a stage without `output` writes to `<output_dir>/<job id>/<stage>`.
    pub output_dir: String,
    /// Absolute and shared: converted checkpoints are kept here, by model digest and layout.
    pub conversion_cache: Option<String>,
    /// In file order.
    pub stages: Vec<PipelineStage>,
    /// The top-level keys of [`INHERITED_KEYS`] as written.
    pub inherited: Mapping,
}

/// One entry of `stages:`.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStage {
    pub name: String,
    pub kind: StepKind,
    /// Stages that must succeed first: `depends_on` plus every stage named in
    /// a `${stages.NAME....}` reference, in file order.
    pub depends_on: Vec<String>,
    /// The stage's mapping as written.
    pub raw: Mapping,
}

impl PipelineStage {
    /// A field of the stage as text, when it is a scalar.
    pub fn text(&self, key: &str) -> Option<String> {
        self.raw.get(key).and_then(|value| scalar_text(value).ok())
    }

    /// A yes/no field as ms-swift's argparse reads it (transformers' `string_to_bool`:
    /// true/false, yes/no, t/f, y/n, 1/0); None when absent or not one of those.
    pub fn flag(&self, key: &str) -> Option<bool> {
        match self.raw.get(key)? {
            Value::Bool(value) => Some(*value),
            other => match scalar_text(other).ok()?.to_ascii_lowercase().as_str() {
                "true" | "yes" | "t" | "y" | "1" => Some(true),
                "false" | "no" | "f" | "n" | "0" => Some(false),
                _ => None,
            },
        }
    }

    /// A field that is a list of scalars.
    pub fn list(&self, key: &str) -> Vec<String> {
        match self.raw.get(key) {
            Some(Value::Sequence(items)) => items.iter().filter_map(|item| scalar_text(item).ok()).collect(),
            Some(other) => scalar_text(other).ok().into_iter().collect(),
            None => Vec::new(),
        }
    }
}

impl PipelineSpec {
    pub fn stage(&self, name: &str) -> Option<&PipelineStage> {
        self.stages.iter().find(|stage| stage.name == name)
    }

    /// Whether some stage reads `${stages.NAME.checkpoint}`.
    pub fn checkpoint_needed(&self, name: &str) -> bool {
        self.stages.iter().any(|s| {
            strings(&Value::Mapping(s.raw.clone()))
                .into_iter()
                .flat_map(references)
                .any(|(n, f)| n == name && f == "checkpoint")
        })
    }
}

/// `${stages.NAME.FIELD}` references in a text, as (name, field); `${output}`,
/// `${model}` and `${benchmarks}` are the stage's own and are left out.
pub fn references(text: &str) -> Vec<(String, String)> {
    placeholders(text)
        .into_iter()
        .filter_map(|inner| {
            let rest = inner.strip_prefix("stages.")?;
            let (name, field) = rest.rsplit_once('.')?;
            Some((name.to_owned(), field.to_owned()))
        })
        .collect()
}

/// The insides of every `${...}` in a text.
pub(crate) fn placeholders(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                found.push(after[..end].to_owned());
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    found
}

/// Every string scalar inside a YAML value.
pub(crate) fn strings(value: &Value) -> Vec<&str> {
    match value {
        Value::String(text) => vec![text.as_str()],
        Value::Sequence(items) => items.iter().flat_map(strings).collect(),
        Value::Mapping(map) => map.values().flat_map(strings).collect(),
        Value::Tagged(tagged) => strings(&tagged.value),
        _ => Vec::new(),
    }
}

/// Reads `swift_version`, `model`, `output_dir`, `conversion_cache` and
/// `stages` of a pipeline job.
pub(super) fn read_pipeline(root: &Mapping, text: &str, problems: &mut Problems) -> Option<PipelineSpec> {
    let release = read_swift_version(root, problems);
    let model = top_text(root, "model", problems);
    let output_dir = top_text(root, "output_dir", problems);
    match &output_dir {
        None => problems.at(
            &["output_dir"],
            "is required for a pipeline: an absolute directory on storage every node shares; stage outputs go to <output_dir>/<job id>/<stage>",
        ),
        Some(dir) if !dir.starts_with('/') => {
            problems.at(&["output_dir"], format!("{dir:?} must be an absolute path on storage every node shares"))
        }
        Some(_) => {}
    }
    let conversion_cache = top_text(root, "conversion_cache", problems);
    if let Some(dir) = conversion_cache.as_deref().filter(|dir| !dir.starts_with('/')) {
        problems.at(&["conversion_cache"], format!("{dir:?} must be an absolute path on storage every node shares"));
    }
    for key in ["nodes", "gpus_per_node", "command", "launch", "megatron"] {
        if root.contains_key(key) {
            problems.at(&[key], "does not apply to kind pipeline; set it on the stage that needs it");
        }
    }
    let stages = match root.get("stages") {
        None | Some(Value::Null) => {
            problems.at(&["stages"], "is required for kind pipeline: a list of stages, each with a name and a kind");
            return None;
        }
        Some(Value::Sequence(items)) if items.is_empty() => {
            problems.at(&["stages"], "is empty; give at least one stage");
            return None;
        }
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            problems.at(&["stages"], format!("must be a list of stages, got {}", describe(other)));
            return None;
        }
    };
    let lines = StageLines::new(text);
    let mut read = Vec::new();
    for (index, item) in stages.iter().enumerate() {
        if let Some(stage) = read_stage(index, item, &lines, problems) {
            read.push(stage);
        }
    }
    let mut inherited = Mapping::new();
    for key in INHERITED_KEYS {
        if let Some(value) = root.get(*key) {
            inherited.insert(Value::String((*key).to_owned()), value.clone());
        }
    }
    let (swift_release, swift_version_written) =
        release.unwrap_or_else(|| (SwiftRelease::newest(SwiftVersion::V3), "3".to_owned()));
    let spec = PipelineSpec {
        swift_version: swift_release.dialect(),
        swift_release,
        swift_version_written,
        model,
        output_dir: output_dir.unwrap_or_default(),
        conversion_cache,
        stages: read,
        inherited,
    };
    // Stages that could not be read still count as names that exist.
    let written: Vec<&str> = stages.iter().filter_map(|s| s.get("name").and_then(Value::as_str)).collect();
    check_graph(&spec, &written, &lines, problems);
    check_stage_fields(&spec, &written, &lines, problems);
    Some(spec)
}

/// `swift_version`: `3`, `4` or a quoted `"major.minor"` as in a megatron-sft job; absent
/// means 3. None (and a problem) when invalid.
fn read_swift_version(root: &Mapping, problems: &mut Problems) -> Option<(SwiftRelease, String)> {
    let written = match root.get("swift_version") {
        None | Some(Value::Null) => return None,
        Some(Value::Number(number)) if number.is_f64() => {
            problems.at(
                &["swift_version"],
                format!(
                    "{number} is a YAML number, which loses the minor version (3.10 reads as 3.1); quote it: `swift_version: \"3.10\"`"
                ),
            );
            return None;
        }
        Some(Value::Number(number)) => number.to_string(),
        Some(Value::String(text)) => text.trim().to_owned(),
        Some(other) => {
            problems.at(
                &["swift_version"],
                format!("must be 3, 4 or a quoted \"major.minor\" such as \"3.10\", got {}", describe(other)),
            );
            return None;
        }
    };
    match SwiftRelease::resolve(&written) {
        Ok(release) => Some((release, written)),
        Err(err) => {
            problems.at(&["swift_version"], err.to_string());
            None
        }
    }
}

fn top_text(root: &Mapping, key: &str, problems: &mut Problems) -> Option<String> {
    let value = root.get(key).filter(|value| !value.is_null())?;
    match value {
        Value::String(text) if !text.trim().is_empty() => Some(text.clone()),
        other => {
            problems.at(&[key], format!("must be a non-empty path, got {}", describe(other)));
            None
        }
    }
}

/// Lines of each `stages:` entry, for problems found after parsing.
struct StageLines {
    /// (first line, indentation of the entry's keys) of each entry, 1-based.
    entries: Vec<(usize, usize)>,
    lines: Vec<String>,
}

impl StageLines {
    fn new(text: &str) -> Self {
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut entries = Vec::new();
        let mut inside = None;
        for (index, line) in lines.iter().enumerate() {
            let content = line.trim_start();
            let indent = line.len() - content.len();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            if indent == 0 {
                inside = content.starts_with("stages:").then_some(usize::MAX);
                continue;
            }
            let Some(dash_indent) = inside else { continue };
            if let Some(after) = content.strip_prefix("- ")
                && (dash_indent == usize::MAX || indent == dash_indent)
            {
                inside = Some(indent);
                let key_indent = indent + 2 + (after.len() - after.trim_start().len());
                entries.push((index + 1, key_indent));
            }
        }
        StageLines { entries, lines }
    }

    /// The line of `key` in stage `index`, else the stage's first line.
    fn line(&self, index: usize, key: Option<&str>) -> Option<usize> {
        let &(start, key_indent) = self.entries.get(index)?;
        let Some(key) = key else { return Some(start) };
        let end = self.entries.get(index + 1).map(|(line, _)| *line - 1).unwrap_or(self.lines.len());
        for number in start..=end {
            let line = self.lines.get(number - 1)?;
            let content = line.trim_start().trim_start_matches("- ");
            let indent = line.len() - content.len();
            if indent == key_indent && content.starts_with(&format!("{key}:")) {
                return Some(number);
            }
            // `- {name: x, kind: y}`: the key is on the entry's own line.
            if number == start && content.starts_with('{') && content.contains(&format!("{key}:")) {
                return Some(number);
            }
        }
        Some(start)
    }
}

fn stage_problem(problems: &mut Problems, lines: &StageLines, index: usize, key: Option<&str>, message: String) {
    let field = match key {
        Some(key) => format!("stages[{index}].{key}"),
        None => format!("stages[{index}]"),
    };
    problems.at_line(field, lines.line(index, key), message);
}

fn read_stage(index: usize, item: &Value, lines: &StageLines, problems: &mut Problems) -> Option<PipelineStage> {
    let Value::Mapping(raw) = item else {
        stage_problem(
            problems,
            lines,
            index,
            None,
            format!("must be a mapping with `name` and `kind`, got {}", describe(item)),
        );
        return None;
    };
    let name = match raw.get("name") {
        Some(Value::String(name)) if valid_stage_name(name) => Some(name.clone()),
        Some(other) => {
            stage_problem(
                problems,
                lines,
                index,
                Some("name"),
                format!("{} is not a stage name: lower-case letters, digits, '-' and '_', at most 32", describe(other)),
            );
            None
        }
        None => {
            stage_problem(problems, lines, index, Some("name"), "is required, e.g. `name: sft`".to_owned());
            None
        }
    };
    let names: Vec<&str> = StepKind::ALL.iter().map(|(name, _)| *name).collect();
    let kind = match raw.get("kind") {
        Some(Value::String(text)) => match StepKind::parse(text) {
            Some(kind) => Some(kind),
            None => {
                stage_problem(
                    problems,
                    lines,
                    index,
                    Some("kind"),
                    format!(
                        "unknown stage kind {text:?}{}; one of {}",
                        suggestion(text, names.iter().copied()),
                        names.join(", ")
                    ),
                );
                None
            }
        },
        other => {
            let got = other.map(describe).unwrap_or_else(|| "nothing".to_owned());
            stage_problem(
                problems,
                lines,
                index,
                Some("kind"),
                format!("is required: one of {}, got {got}", names.join(", ")),
            );
            None
        }
    };
    if let Some(kind) = kind {
        for key in raw.keys() {
            let Some(key) = key.as_str() else {
                stage_problem(problems, lines, index, None, format!("keys must be text, got {}", describe(key)));
                continue;
            };
            if COMMON_STAGE_KEYS.contains(&key) || kind.keys().contains(&key) {
                continue;
            }
            let allowed = COMMON_STAGE_KEYS.iter().chain(kind.keys()).copied();
            let owner = StepKind::ALL
                .iter()
                .find(|(_, other)| other.keys().contains(&key))
                .map(|(name, _)| format!("; it belongs to a {name} stage"))
                .unwrap_or_default();
            let hint = suggestion(key, allowed);
            let hint = if hint.is_empty() { owner } else { hint };
            stage_problem(
                problems,
                lines,
                index,
                Some(key),
                format!("`{key}` is not a field of a {} stage{hint}", kind.name()),
            );
        }
    }
    let mut depends_on = Vec::new();
    match raw.get("depends_on") {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(items)) => {
            for item in items {
                match item.as_str() {
                    Some(dep) => depends_on.push(dep.to_owned()),
                    None => {
                        stage_problem(
                            problems,
                            lines,
                            index,
                            Some("depends_on"),
                            format!("must list stage names, got {}", describe(item)),
                        );
                    }
                }
            }
        }
        Some(Value::String(dep)) => depends_on.push(dep.clone()),
        Some(other) => {
            stage_problem(
                problems,
                lines,
                index,
                Some("depends_on"),
                format!("must be a list of stage names, got {}", describe(other)),
            );
        }
    }
    for key in ["output", "model", "prompts", "before", "after", "torch_dtype", "backend"] {
        if let Some(value) = raw.get(key)
            && !matches!(value, Value::String(_))
        {
            stage_problem(problems, lines, index, Some(key), format!("must be text, got {}", describe(value)));
        }
    }
    for (_, field) in strings(&Value::Mapping(raw.clone())).into_iter().flat_map(references) {
        if field != "output" && field != "checkpoint" {
            stage_problem(
                problems,
                lines,
                index,
                None,
                format!(
                    "`${{stages.NAME.{field}}}` is not a stage output; use `.output` (or `.checkpoint` of a megatron-sft stage)"
                ),
            );
        }
    }
    let (name, kind) = (name?, kind?);
    for (dep, _) in strings(&Value::Mapping(raw.clone())).into_iter().flat_map(references) {
        if !depends_on.contains(&dep) {
            depends_on.push(dep);
        }
    }
    // A stage with a bad field is still part of the graph, so that its
    // dependencies are checked too; the problem keeps the job from running.
    Some(PipelineStage { name, kind, depends_on, raw: raw.clone() })
}

fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Names are unique, every dependency exists and comes from another stage, and
/// the dependencies have no cycle.
fn check_graph(spec: &PipelineSpec, names: &[&str], lines: &StageLines, problems: &mut Problems) {
    let mut seen = HashSet::new();
    for stage in &spec.stages {
        let index = names.iter().position(|n| *n == stage.name).unwrap_or(0);
        if !seen.insert(stage.name.as_str()) {
            stage_problem(problems, lines, index, Some("name"), format!("{:?} names two stages", stage.name));
        }
        for dep in &stage.depends_on {
            if *dep == stage.name {
                stage_problem(problems, lines, index, Some("depends_on"), "a stage cannot depend on itself".to_owned());
            } else if !names.contains(&dep.as_str()) {
                stage_problem(
                    problems,
                    lines,
                    index,
                    None,
                    format!("depends on stage {dep:?}, which does not exist{}", suggestion(dep, names.iter().copied())),
                );
            } else if stage.raw.values().flat_map(strings).flat_map(references).any(|(n, f)| {
                n == *dep && f == "checkpoint" && spec.stage(dep).is_some_and(|s| s.kind != StepKind::MegatronSft)
            }) {
                stage_problem(
                    problems,
                    lines,
                    index,
                    None,
                    format!(
                        "`${{stages.{dep}.checkpoint}}`: only a megatron-sft stage has a checkpoint; use `.output`"
                    ),
                );
            }
        }
    }
    if let Some(cycle) = find_cycle(spec) {
        let index = names.iter().position(|n| *n == cycle[0]).unwrap_or(0);
        stage_problem(
            problems,
            lines,
            index,
            Some("depends_on"),
            format!("the stages depend on each other in a cycle: {}", cycle.join(" -> ")),
        );
    }
}

/// A dependency cycle, as stage names with the first repeated at the end.
fn find_cycle(spec: &PipelineSpec) -> Option<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> =
        spec.stages.iter().map(|s| (s.name.as_str(), s.depends_on.iter().map(String::as_str).collect())).collect();
    // 0 unvisited, 1 on the current path, 2 done.
    let mut mark: HashMap<&str, u8> = HashMap::new();
    fn visit<'a>(
        node: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        mark: &mut HashMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match mark.get(node) {
            Some(2) => return None,
            Some(1) => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|n| (*n).to_owned()).collect();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        mark.insert(node, 1);
        path.push(node);
        for dep in deps.get(node).into_iter().flatten() {
            if deps.contains_key(dep)
                && let Some(cycle) = visit(dep, deps, mark, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        mark.insert(node, 2);
        None
    }
    for name in deps.keys() {
        if let Some(cycle) = visit(name, &deps, &mut mark, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// The `--flag value ...` tokens of a built-in step's `extra_args`, checked against the flag
/// table of its ms-swift command (`swift export`/`infer`/`eval`) in the pipeline's ms-swift
/// release: each flag must be one the command has, written whole (argparse's
/// abbreviations are refused), with values of its type and choices. An eval stage with its own
/// `command:` runs no ms-swift, so its `extra_args` are not checked.
fn check_builtin_extra_args(release: SwiftRelease, stage: &PipelineStage) -> Vec<String> {
    let Some(command) = stage.kind.swift_command() else { return Vec::new() };
    if stage.kind == StepKind::Eval && stage.raw.contains_key("command") {
        return Vec::new();
    }
    let Some(flags) = release.table().command(command) else {
        return vec![format!("ms-swift {release} has no `{command}` command")];
    };
    let args = stage.list("extra_args");
    let mut problems = Vec::new();
    let mut index = 0;
    while index < args.len() {
        let token = &args[index];
        index += 1;
        let Some(body) = token.strip_prefix("--") else {
            problems.push(format!(
                "{token:?} follows no --flag; ms-swift refuses leftover arguments (write `--name value`)"
            ));
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (body, None),
        };
        let mut values: Vec<String> = inline.into_iter().collect();
        while index < args.len() && !args[index].starts_with("--") {
            values.push(args[index].clone());
            index += 1;
        }
        let flag = match flags.lookup(name) {
            Lookup::Exact(flag) => flag,
            Lookup::Abbreviation(targets) => {
                problems.push(format!(
                    "`--{name}` is not a flag of `{command}` in ms-swift {release}, only an abbreviation (of {}) that argparse would take; write the whole flag name",
                    targets.iter().map(|t| format!("--{t}")).collect::<Vec<_>>().join(", ")
                ));
                continue;
            }
            Lookup::Unknown => {
                let hint = did_you_mean(name, flags.canonical_names())
                    .map(|close| format!("; did you mean `--{close}`?"))
                    .unwrap_or_default();
                problems.push(format!("`--{name}` is not a flag of `{command}` in ms-swift {release}{hint}"));
                continue;
            }
        };
        let verdict = match (values.len(), flag.kind) {
            (0, FlagType::Switch) => Ok(()),
            (0, FlagType::Bool) if flag.value_optional => Ok(()),
            (0, _) => Err(format!("`{token}` needs a value")),
            (1, _) => flag.check_value(&FlagValue::Scalar(values.remove(0))),
            (_, _) => flag.check_value(&FlagValue::List(values)),
        };
        if let Err(message) = verdict {
            problems.push(format!("{message} (`{command}` of ms-swift {release})"));
        }
    }
    problems
}

/// A megatron-sft stage whose `megatron:` section sets `no_save_optim` and leaves
/// `save_safetensors` at ms-swift's default (true) or sets it true.
fn saves_without_weights(stage: &PipelineStage) -> bool {
    let Some(Value::Mapping(section)) = stage.raw.get("megatron") else { return false };
    let flag = |key: &str| {
        section.get(key).and_then(|value| match value {
            Value::Bool(b) => Some(*b),
            other => scalar_text(other).ok().map(|t| matches!(t.to_ascii_lowercase().as_str(), "true" | "yes" | "1")),
        })
    };
    flag("no_save_optim") == Some(true) && flag("save_safetensors") != Some(false)
}

/// Fields of each kind: what the built-in steps need, and a megatron-sft or
/// command stage checked as the job it becomes.
fn check_stage_fields(spec: &PipelineSpec, names: &[&str], lines: &StageLines, problems: &mut Problems) {
    for stage in &spec.stages {
        let index = names.iter().position(|n| *n == stage.name).unwrap_or(0);
        let mut need = |key: &str, what: &str| {
            if stage.raw.get(key).is_none_or(Value::is_null) {
                stage_problem(
                    problems,
                    lines,
                    index,
                    Some(key),
                    format!("is required for a {} stage: {what}", stage.kind.name()),
                );
            }
        };
        match stage.kind {
            StepKind::ToMcore if spec.model.is_none() => {
                need("model", "the Hugging Face model to convert (or set the pipeline's `model`)")
            }
            StepKind::ToHf => need("model", "the Megatron checkpoint to convert, e.g. \"${stages.sft.checkpoint}\""),
            StepKind::Infer => {
                need("prompts", "a JSONL file of {\"messages\": [...]} rows, on storage every node shares");
                need("after", "the trained model, e.g. \"${stages.export.output}\"");
                if spec.model.is_none() {
                    need("before", "the model before training (or set the pipeline's `model`)");
                }
            }
            StepKind::Eval => {
                need("after", "the trained model, e.g. \"${stages.export.output}\"");
                if spec.model.is_none() {
                    need("before", "the model before training (or set the pipeline's `model`)");
                }
                if stage.list("benchmarks").is_empty() {
                    stage_problem(
                        problems,
                        lines,
                        index,
                        Some("benchmarks"),
                        "is required for an eval stage: a list of benchmark names, e.g. [gsm8k, arc_c]".to_owned(),
                    );
                }
            }
            _ => {}
        }
        if stage.kind.is_builtin() {
            for message in check_builtin_extra_args(spec.swift_release, stage) {
                stage_problem(problems, lines, index, Some("extra_args"), message);
            }
            for key in ["extra_args", "command"] {
                if let Some(value) = stage.raw.get(key)
                    && !matches!(value, Value::Sequence(_))
                {
                    stage_problem(
                        problems,
                        lines,
                        index,
                        Some(key),
                        format!("must be a list of arguments, got {}", describe(value)),
                    );
                }
            }
        }
        if stage.raw.get("test_convert_precision").is_some_and(|v| !v.is_null())
            && stage.flag("test_convert_precision").is_none()
        {
            stage_problem(problems, lines, index, Some("test_convert_precision"), "must be true or false".to_owned());
        }
        if let Some(prompts) = stage.text("prompts")
            && !prompts.starts_with('/')
            && !prompts.starts_with("${")
        {
            stage_problem(
                problems,
                lines,
                index,
                Some("prompts"),
                format!("{prompts:?} must be an absolute path on storage every node shares"),
            );
        }
        if stage.kind == StepKind::MegatronSft && spec.checkpoint_needed(&stage.name) && saves_without_weights(stage) {
            stage_problem(
                problems,
                lines,
                index,
                Some("megatron"),
                format!(
                    "no_save_optim with save_safetensors (ms-swift's default) saves Megatron checkpoints without the model \
                     (4.6.0 swift/megatron/trainers/base.py:837, 3.12.6 :1051), so `${{stages.{}.checkpoint}}` would find \
                     none to use; drop no_save_optim",
                    stage.name
                ),
            );
        }
        if matches!(stage.kind, StepKind::MegatronSft | StepKind::Command) {
            let document = super::stage_document::stage_document_for_check(spec, stage);
            let text = serde_yaml_ng::to_string(&Value::Mapping(document)).unwrap_or_default();
            if let Err(errors) = JobSpec::from_yaml(&text, "stage") {
                for SpecIssue { field, message, .. } in errors.issues {
                    // Fields inherited from the pipeline are reported there already.
                    let key = field.split(['.', '[']).next().unwrap_or_default().to_owned();
                    if INHERITED_KEYS.contains(&key.as_str()) && key != "env" {
                        continue;
                    }
                    let line = lines.line(index, Some(&key));
                    let field =
                        if field.is_empty() { format!("stages[{index}]") } else { format!("stages[{index}].{field}") };
                    problems.at_line(field, line, message);
                }
            }
        }
    }
}
