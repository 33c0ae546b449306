//! The flags that resume a megatron-sft job from a checkpoint.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cohort_shared::checkpoint::{Checkpoint, CheckpointLayout, apply_resume, resume_flags};
use cohort_shared::spec::{FlagValue, JobSpec, MegatronSpec, SwiftVersion, Workload};

const V3_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node.yaml");
const V4_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node-v4.yaml");

fn checkpoint(path: &str, layout: CheckpointLayout) -> Checkpoint {
    Checkpoint { iteration: 200, path: PathBuf::from(path), layout, run_dir: PathBuf::from("/out/v0") }
}

fn pairs(flags: &[(&str, &str)]) -> Vec<(String, String)> {
    flags.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn resume_flags_follow_the_dialect() {
    let v3 = checkpoint("/out/v0-20260822-101500", CheckpointLayout::MegatronIter);
    assert_eq!(
        resume_flags(SwiftVersion::V3, &v3),
        pairs(&[("load", "/out/v0-20260822-101500"), ("finetune", "false")])
    );
    let v4 = checkpoint("/out/v0-20260822-101500/checkpoint-200", CheckpointLayout::SwiftCheckpointN);
    assert_eq!(
        resume_flags(SwiftVersion::V4, &v4),
        pairs(&[("mcore_model", "/out/v0-20260822-101500/checkpoint-200"), ("finetune", "false")])
    );
}

fn megatron_of(text: &str) -> MegatronSpec {
    let job = match JobSpec::from_yaml(text, "job.yaml") {
        Ok(job) => job,
        Err(errors) => panic!("{errors}"),
    };
    match job.workload {
        Workload::MegatronSft(megatron) => megatron,
        _ => panic!("not a megatron-sft job"),
    }
}

/// The value after `--key` in an argv, and where `--key` is.
fn flag_at(argv: &[String], key: &str) -> (usize, String) {
    let at = argv.iter().position(|arg| arg == &format!("--{key}")).unwrap();
    (at, argv[at + 1].clone())
}

#[test]
fn apply_resume_replaces_load_and_finetune_in_place_for_v3() {
    let spec = megatron_of(V3_JOB);
    let ckpt = checkpoint("/mnt/shared/megatron_output/Qwen3-8B-sft", CheckpointLayout::MegatronIter);
    let resumed = apply_resume(&spec, &ckpt);
    let (before, after) = (spec.render_args(), resumed.render_args());
    assert_eq!(before.len(), after.len());
    assert_eq!(flag_at(&before, "load"), (2, "Qwen3-8B-mcore".to_owned()));
    assert_eq!(flag_at(&after, "load"), (2, "/mnt/shared/megatron_output/Qwen3-8B-sft".to_owned()));
    let (finetune_at, value) = flag_at(&after, "finetune");
    assert_eq!((finetune_at, value.as_str()), (flag_at(&before, "finetune").0, "false"));
    // Nothing else moved or changed.
    let differing: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
    assert_eq!(differing, [3, finetune_at + 1]);
    assert_eq!(resumed.flags.keys().collect::<Vec<_>>(), spec.flags.keys().collect::<Vec<_>>());
}

#[test]
fn apply_resume_adds_mcore_model_and_keeps_model_for_v4() {
    let spec = megatron_of(V4_JOB);
    assert_eq!(spec.swift_version, SwiftVersion::V4);
    let ckpt =
        checkpoint("/mnt/shared/megatron_output/Qwen3-8B-sft/v0/checkpoint-200", CheckpointLayout::SwiftCheckpointN);
    let resumed = apply_resume(&spec, &ckpt);
    let argv = resumed.render_args();
    assert_eq!(flag_at(&argv, "model"), (2, "Qwen/Qwen3-8B".to_owned()));
    assert_eq!(flag_at(&argv, "finetune"), (flag_at(&spec.render_args(), "finetune").0, "false".to_owned()));
    // Appended after the job's own flags, before extra_args.
    assert_eq!(
        resumed.flags.last(),
        Some((&"mcore_model".to_owned(), &FlagValue::Scalar(ckpt.path.display().to_string())))
    );

    // A second resume replaces the first checkpoint rather than adding another flag.
    let later =
        checkpoint("/mnt/shared/megatron_output/Qwen3-8B-sft/v1/checkpoint-400", CheckpointLayout::SwiftCheckpointN);
    let again = apply_resume(&resumed, &later);
    assert_eq!(again.flags.len(), resumed.flags.len());
    assert_eq!(again.scalar("mcore_model"), Some("/mnt/shared/megatron_output/Qwen3-8B-sft/v1/checkpoint-400"));
}

#[test]
fn apply_resume_drops_conflicting_extra_args() {
    let mut spec = MegatronSpec::new(SwiftVersion::V3);
    spec.flags.insert("load".into(), FlagValue::Scalar("base".into()));
    spec.extra_args = ["--seed", "7", "--finetune", "true", "--load=other", "--no-load-optim", "--finetune"]
        .map(String::from)
        .to_vec();
    let resumed = apply_resume(&spec, &checkpoint("/ckpt", CheckpointLayout::MegatronIter));
    assert_eq!(
        resumed.render_args(),
        ["megatron", "sft", "--load", "/ckpt", "--finetune", "false", "--seed", "7", "--no-load-optim"]
    );
}
