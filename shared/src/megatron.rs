//! The `megatron:` section of a megatron-sft job: ms-swift flags in file order,
//! the exact `megatron sft ...` argv they render to, and the parallel layout
//! (TP × PP × CP × DP, gradient accumulation) they imply.

pub(crate) mod checks;
pub mod flags;
pub(crate) mod parse;
pub mod table;

use std::fmt;

use indexmap::IndexMap;

pub use table::SwiftRelease;

/// The ms-swift major version on the nodes; it decides the flag dialect
/// (`--load/--save` in 3.x, `--model/--output_dir` in 4.x) and the log format.
/// The exact version whose flags a job is checked against is a [`SwiftRelease`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwiftVersion {
    V3,
    V4,
}

impl SwiftVersion {
    /// The major version number, as written in `swift_version:`.
    pub fn major(self) -> u8 {
        match self {
            SwiftVersion::V3 => 3,
            SwiftVersion::V4 => 4,
        }
    }
}

impl fmt::Display for SwiftVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ms-swift {}.x", self.major())
    }
}

/// A flag's value as it appears on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlagValue {
    /// `--key value`
    Scalar(String),
    /// `--key v1 v2 ...`, e.g. several datasets.
    List(Vec<String>),
}

/// A validated `megatron:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct MegatronSpec {
    /// The dialect of `release` (`swift_version: 3 | 4 | "major.minor"`, default 3).
    pub swift_version: SwiftVersion,
    /// The ms-swift version whose flag table the section was checked against:
    /// the newest of the major, or the minor that `swift_version` names.
    pub release: SwiftRelease,
    /// Every other key of the section, in file order, except `extra_args` and `program`.
    pub flags: IndexMap<String, FlagValue>,
    /// Appended verbatim after the flags.
    pub extra_args: Vec<String>,
    /// The program and subcommand, default `["megatron", "sft"]`.
    pub program: Vec<String>,
}

/// ms-swift's default `global_batch_size` (Megatron-LM's own default differs).
pub const DEFAULT_GLOBAL_BATCH_SIZE: u32 = 16;

/// The default `program`.
pub fn default_program() -> Vec<String> {
    vec!["megatron".to_owned(), "sft".to_owned()]
}

impl MegatronSpec {
    /// A section with the default program and no flags, for the newest
    /// version of the dialect that Cohort has a flag table for.
    pub fn new(swift_version: SwiftVersion) -> Self {
        Self::with_release(SwiftRelease::newest(swift_version))
    }

    /// A section with the default program and no flags, for `release`.
    pub fn with_release(release: SwiftRelease) -> Self {
        MegatronSpec {
            swift_version: release.dialect(),
            release,
            flags: IndexMap::new(),
            extra_args: Vec::new(),
            program: default_program(),
        }
    }

    /// The full argv: the program, then `--key value` per flag in file order (a
    /// list gives `--key v1 v2 ...`, a bool `true`/`false`), then `extra_args`.
    /// Each value is one element, spaces included: no shell is involved.
    pub fn render_args(&self) -> Vec<String> {
        let mut argv = self.program.clone();
        for (key, value) in &self.flags {
            argv.push(format!("--{key}"));
            match value {
                FlagValue::Scalar(text) => argv.push(text.clone()),
                FlagValue::List(items) => argv.extend(items.iter().cloned()),
            }
        }
        argv.extend(self.extra_args.iter().cloned());
        argv
    }

    /// The parallel layout on `nodes` × `gpus_per_node` GPUs. Reads
    /// `tensor_model_parallel_size`, `pipeline_model_parallel_size`,
    /// `context_parallel_size`, `micro_batch_size` (each default 1) and
    /// `global_batch_size` (default 16); a missing or invalid value counts as its default.
    pub fn layout(&self, nodes: u32, gpus_per_node: u32) -> ParallelLayout {
        let size = |key: &str, default: u32| self.positive_int(key).ok().flatten().unwrap_or(default);
        ParallelLayout::new(
            nodes.saturating_mul(gpus_per_node),
            size("tensor_model_parallel_size", 1),
            size("pipeline_model_parallel_size", 1),
            size("context_parallel_size", 1),
            size("micro_batch_size", 1),
            size("global_batch_size", DEFAULT_GLOBAL_BATCH_SIZE),
        )
    }

    /// The model to fine-tune: `load`, else `model` in 3.x (3.10+ loads a Hugging
    /// Face `--model` itself; with both, `load` holds the weights); `model`, else
    /// `mcore_model`, in 4.x.
    pub fn model_ref(&self) -> Option<&str> {
        match self.swift_version {
            SwiftVersion::V3 => self.scalar("load").or_else(|| self.scalar("model")),
            SwiftVersion::V4 => self.scalar("model").or_else(|| self.scalar("mcore_model")),
        }
    }

    /// The flag that [`model_ref`](Self::model_ref) read, if any.
    pub fn model_key(&self) -> Option<&'static str> {
        let keys: &[&'static str] = match self.swift_version {
            SwiftVersion::V3 => &["load", "model"],
            SwiftVersion::V4 => &["model", "mcore_model"],
        };
        keys.iter().copied().find(|key| self.scalar(key).is_some())
    }

    /// Where checkpoints go: `save` in 3.x, `output_dir` in 4.x.
    pub fn output_dir(&self) -> Option<&str> {
        match self.swift_version {
            SwiftVersion::V3 => self.scalar("save"),
            SwiftVersion::V4 => self.scalar("output_dir"),
        }
    }

    /// A flag's value, if set.
    pub fn flag(&self, key: &str) -> Option<&FlagValue> {
        self.flags.get(key)
    }

    /// A flag's text when it is a single value.
    pub fn scalar(&self, key: &str) -> Option<&str> {
        match self.flags.get(key)? {
            FlagValue::Scalar(text) => Some(text),
            FlagValue::List(_) => None,
        }
    }

    /// A boolean flag read the way ms-swift's argument parser reads it
    /// (`true/false`, `yes/no`, `1/0`, any case); None when unset or not a bool.
    pub fn bool_flag(&self, key: &str) -> Option<bool> {
        parse_bool(self.scalar(key)?)
    }

    /// A flag that must be a positive integer: `Ok(None)` when unset, `Err` with a
    /// message when set to anything else.
    pub(crate) fn positive_int(&self, key: &str) -> Result<Option<u32>, String> {
        let Some(value) = self.flags.get(key) else {
            return Ok(None);
        };
        match value {
            FlagValue::Scalar(text) => match text.parse::<u32>() {
                Ok(number) if number > 0 => Ok(Some(number)),
                _ => Err(format!("{text:?} is not a positive integer")),
            },
            FlagValue::List(_) => Err("is a list; expected a positive integer".to_owned()),
        }
    }
}

pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "t" | "y" | "1" => Some(true),
        "false" | "no" | "f" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// How a job's GPUs are split: world = TP·PP·CP·DP, global batch = micro batch ·
/// DP · gradient-accumulation steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    pub tp: u32,
    pub pp: u32,
    pub cp: u32,
    /// world / (tp·pp·cp); 0 when that does not divide evenly.
    pub dp: u32,
    pub world: u32,
    pub micro_batch: u32,
    pub global_batch: u32,
    /// global_batch / (micro_batch·dp); 0 when that does not divide evenly.
    pub grad_accum: u32,
}

impl ParallelLayout {
    /// Derives DP and gradient accumulation from the world size and the other sizes.
    pub fn new(world: u32, tp: u32, pp: u32, cp: u32, micro_batch: u32, global_batch: u32) -> Self {
        let model_parallel = tp.saturating_mul(pp).saturating_mul(cp);
        let dp = exact_quotient(world, model_parallel);
        let grad_accum = exact_quotient(global_batch, micro_batch.saturating_mul(dp));
        ParallelLayout { tp, pp, cp, dp, world, micro_batch, global_batch, grad_accum }
    }

    /// Whether both DP and gradient accumulation came out whole.
    pub fn is_valid(&self) -> bool {
        self.dp > 0 && self.grad_accum > 0
    }
}

/// `a / b` when `b` divides `a` exactly and both are positive, else 0.
fn exact_quotient(a: u32, b: u32) -> u32 {
    if a > 0 && b > 0 && a.is_multiple_of(b) { a / b } else { 0 }
}

impl fmt::Display for ParallelLayout {
    /// `TP 2 × PP 1 × CP 1 × DP 2 = world 4; micro batch 2 × DP 2 × grad accumulation 4 = global batch 16`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TP {} × PP {} × CP {} × DP {} = world {}; micro batch {} × DP {} × grad accumulation {} = global batch {}",
            self.tp,
            self.pp,
            self.cp,
            self.dp,
            self.world,
            self.micro_batch,
            self.dp,
            self.grad_accum,
            self.global_batch
        )
    }
}

/// A copy of `spec` whose Megatron-LM saves a checkpoint and exits on SIGTERM:
/// `exit_signal_handler: true` merged into `megatron_extra_kwargs`, which
/// ms-swift 3.x puts on Megatron-LM's command line (3.12.6
/// `swift/megatron/argument/megatron_args.py:793-805`), where the training
/// loop saves before it exits (Megatron-LM core_r0.15.0
/// `megatron/training/training.py:1851-1864`). None for ms-swift 4.x, whose
/// own training loop has no signal handler, for a job that turned the handler
/// off itself, and for `megatron_extra_kwargs` that are not a JSON object.
pub fn with_save_on_sigterm(spec: &MegatronSpec) -> Option<MegatronSpec> {
    if spec.swift_version != SwiftVersion::V3 {
        return None;
    }
    const KEY: &str = "megatron_extra_kwargs";
    let mut kwargs = match spec.flags.get(KEY) {
        None => serde_json::Map::new(),
        Some(FlagValue::Scalar(text)) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return None,
        },
        Some(FlagValue::List(_)) => return None,
    };
    if kwargs.get("exit_signal_handler").is_some_and(|v| v == &serde_json::Value::Bool(false)) {
        return None;
    }
    kwargs.insert("exit_signal_handler".into(), serde_json::Value::Bool(true));
    let mut saving = spec.clone();
    let text = serde_json::Value::Object(kwargs).to_string();
    match saving.flags.get_mut(KEY) {
        Some(existing) => *existing = FlagValue::Scalar(text),
        None => {
            saving.flags.insert(KEY.into(), FlagValue::Scalar(text));
        }
    }
    Some(saving)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn save_on_sigterm_merges_into_the_jobs_extra_kwargs_for_ms_swift_3_only() {
        let mut spec = MegatronSpec::new(SwiftVersion::V3);
        let kwargs = |s: &MegatronSpec| match s.flags.get("megatron_extra_kwargs") {
            Some(FlagValue::Scalar(t)) => serde_json::from_str::<serde_json::Value>(t).unwrap(),
            other => panic!("{other:?}"),
        };
        let saving = with_save_on_sigterm(&spec).unwrap();
        assert_eq!(kwargs(&saving), serde_json::json!({"exit_signal_handler": true}));
        spec.flags
            .insert("megatron_extra_kwargs".into(), FlagValue::Scalar(r#"{"no_persist_layer_norm": true}"#.into()));
        let saving = with_save_on_sigterm(&spec).unwrap();
        assert_eq!(kwargs(&saving), serde_json::json!({"no_persist_layer_norm": true, "exit_signal_handler": true}));
        spec.flags
            .insert("megatron_extra_kwargs".into(), FlagValue::Scalar(r#"{"exit_signal_handler": false}"#.into()));
        assert_eq!(with_save_on_sigterm(&spec), None, "the job turned it off");
        assert_eq!(with_save_on_sigterm(&MegatronSpec::new(SwiftVersion::V4)), None);
    }

    fn spec(flags: &[(&str, FlagValue)]) -> MegatronSpec {
        let mut spec = MegatronSpec::new(SwiftVersion::V3);
        for (key, value) in flags {
            spec.flags.insert((*key).to_owned(), value.clone());
        }
        spec
    }

    fn scalar(text: &str) -> FlagValue {
        FlagValue::Scalar(text.to_owned())
    }

    #[test]
    fn render_keeps_file_order_lists_and_extra_args() {
        let mut spec = spec(&[
            ("load", scalar("m")),
            ("dataset", FlagValue::List(vec!["a".into(), "b".into()])),
            ("system", scalar("You are helpful.")),
        ]);
        spec.extra_args = vec!["--seed".into(), "7".into()];
        assert_eq!(
            spec.render_args(),
            ["megatron", "sft", "--load", "m", "--dataset", "a", "b", "--system", "You are helpful.", "--seed", "7"]
        );
    }

    #[test]
    fn layout_uses_defaults_and_derives_dp_and_accumulation() {
        let layout = spec(&[]).layout(2, 4);
        assert_eq!(layout, ParallelLayout::new(8, 1, 1, 1, 1, 16));
        assert_eq!((layout.dp, layout.grad_accum), (8, 2));

        let layout =
            spec(&[("tensor_model_parallel_size", scalar("2")), ("micro_batch_size", scalar("2"))]).layout(2, 2);
        assert_eq!(
            layout.to_string(),
            "TP 2 × PP 1 × CP 1 × DP 2 = world 4; micro batch 2 × DP 2 × grad accumulation 4 = global batch 16"
        );
        assert!(layout.is_valid());
    }

    #[test]
    fn layout_reports_zero_when_sizes_do_not_divide() {
        let layout = spec(&[("tensor_model_parallel_size", scalar("3"))]).layout(2, 2);
        assert_eq!((layout.dp, layout.grad_accum), (0, 0));
        assert!(!layout.is_valid());
        let layout = spec(&[("global_batch_size", scalar("15"))]).layout(1, 2);
        assert_eq!((layout.dp, layout.grad_accum), (2, 0));
    }

    #[test]
    fn model_and_output_follow_the_dialect() {
        let v3 = spec(&[("load", scalar("Qwen3-8B-mcore")), ("save", scalar("/out"))]);
        assert_eq!((v3.model_ref(), v3.output_dir()), (Some("Qwen3-8B-mcore"), Some("/out")));
        let mut v4 = spec(&[("mcore_model", scalar("/ckpt")), ("output_dir", scalar("/o4"))]);
        v4.swift_version = SwiftVersion::V4;
        assert_eq!((v4.model_ref(), v4.output_dir()), (Some("/ckpt"), Some("/o4")));
        v4.flags.insert("model".into(), scalar("Qwen/Qwen3-8B"));
        assert_eq!(v4.model_ref(), Some("Qwen/Qwen3-8B"));
    }

    #[test]
    fn typed_flag_readers() {
        let spec = spec(&[("a", scalar("Yes")), ("b", scalar("0")), ("c", scalar("maybe")), ("n", scalar("0"))]);
        assert_eq!(spec.bool_flag("a"), Some(true));
        assert_eq!(spec.bool_flag("b"), Some(false));
        assert_eq!(spec.bool_flag("c"), None);
        assert!(spec.positive_int("n").is_err());
        assert_eq!(spec.positive_int("missing"), Ok(None));
    }
}
