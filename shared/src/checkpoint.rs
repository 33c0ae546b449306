//! The checkpoint a megatron-sft job resumes from, as the agent found it on
//! the shared filesystem (`cohort-agent`'s checkpoint_search), and the flags
//! that resume it.

use std::path::PathBuf;

use crate::megatron::{FlagValue, MegatronSpec, SwiftVersion};

/// Megatron-LM's tracker file: the latest saved iteration, or `release`.
pub const TRACKER_FILE: &str = "latest_checkpointed_iteration.txt";

/// How a checkpoint is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// `<dir>/latest_checkpointed_iteration.txt` + `<dir>/iter_NNNNNNN/`; ms-swift <= 3.9
    /// puts these in `<save>/vN-TIMESTAMP/`.
    MegatronIter,
    /// `<output_dir>/vN-TIMESTAMP/checkpoint-N/` containing the tracker and `iter_NNNNNNN/`
    /// (ms-swift 3.10+ and 4.x).
    SwiftCheckpointN,
}

/// A complete checkpoint a new attempt can resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The training iteration it holds; 0 for a tracker that says `release`.
    pub iteration: u64,
    /// The directory holding the tracker and `iter_*`: what 3.x takes as `--load` and
    /// 4.x as `--mcore_model` (for [`CheckpointLayout::SwiftCheckpointN`], the `checkpoint-N` dir).
    pub path: PathBuf,
    pub layout: CheckpointLayout,
    /// The `vN-TIMESTAMP` run directory it belongs to, or the save dir itself when the
    /// job ran with `add_version false`.
    pub run_dir: PathBuf,
}

/// The flags that make a new attempt resume from `ckpt`, in the job's dialect: 3.x
/// `--load <path> --finetune false`; 4.x `--mcore_model <checkpoint-N path> --finetune false`
/// (`--finetune true` would reset the iteration to 0 and retrain on the same data).
/// A path that is not UTF-8 is converted lossily.
pub fn resume_flags(version: SwiftVersion, ckpt: &Checkpoint) -> Vec<(String, String)> {
    let load_key = match version {
        SwiftVersion::V3 => "load",
        SwiftVersion::V4 => "mcore_model",
    };
    vec![(load_key.to_owned(), ckpt.path.to_string_lossy().into_owned()), ("finetune".to_owned(), "false".to_owned())]
}

/// A copy of `spec` that resumes from `ckpt`: each of [`resume_flags`] replaces the flag of
/// the same name in place, or is appended when the spec does not set it. In 4.x `model` is
/// left as the job set it: `mcore_model` is what restores the weights and the iteration.
/// The same flags are dropped from `extra_args`, which render last and would otherwise win.
pub fn apply_resume(spec: &MegatronSpec, ckpt: &Checkpoint) -> MegatronSpec {
    let mut resumed = spec.clone();
    for (key, value) in resume_flags(spec.swift_version, ckpt) {
        remove_extra_arg(&mut resumed.extra_args, &key);
        match resumed.flags.get_mut(&key) {
            Some(existing) => *existing = FlagValue::Scalar(value),
            None => {
                resumed.flags.insert(key, FlagValue::Scalar(value));
            }
        }
    }
    resumed
}

/// Removes `--key value`, `--key=value` and a bare `--key` (also spelled with dashes).
fn remove_extra_arg(args: &mut Vec<String>, key: &str) {
    let names = [format!("--{key}"), format!("--{}", key.replace('_', "-"))];
    let mut kept = Vec::with_capacity(args.len());
    let mut rest = std::mem::take(args).into_iter().peekable();
    while let Some(arg) = rest.next() {
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, _)) => (name, true),
            None => (arg.as_str(), false),
        };
        if !names.iter().any(|n| n == name) {
            kept.push(arg);
            continue;
        }
        if !inline_value && rest.peek().is_some_and(|next| !next.starts_with("--")) {
            rest.next();
        }
    }
    *args = kept;
}
