//! The `megatron:` flags checked against the flag table of the job's ms-swift
//! version (shared/swift-flags/, generated from ms-swift's own parser): names,
//! renames, abbreviations, value types and choices, `swift_version` itself, the
//! model flag, and the recompute rules megatron-core enforces.
#![allow(clippy::unwrap_used)]

use cohort_shared::checkpoint::{Checkpoint, CheckpointLayout, apply_resume};
use cohort_shared::megatron::table::{MEGATRON_SFT, SwiftRelease};
use cohort_shared::spec::{JobSpec, MegatronSpec, SpecIssue, SwiftVersion, Workload};

const V3_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node.yaml");
const V4_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node-v4.yaml");

fn replaced(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "fixture lacks {from:?}");
    base.replacen(from, to, 1)
}

fn parse(text: &str) -> JobSpec {
    JobSpec::from_yaml(text, "job.yaml").unwrap_or_else(|errors| panic!("{errors}"))
}

fn megatron(text: &str) -> MegatronSpec {
    match parse(text).workload {
        Workload::MegatronSft(megatron) => megatron,
        _ => panic!("not a megatron-sft job"),
    }
}

fn problems_in(text: &str) -> Vec<SpecIssue> {
    match JobSpec::from_yaml(text, "job.yaml") {
        Ok(spec) => panic!("accepted: {spec:?}"),
        Err(errors) => errors.issues,
    }
}

/// The only issue, checked for field, line and fragments of the message.
fn single(text: &str, field: &str, line: usize, fragments: &[&str]) -> SpecIssue {
    let issues = problems_in(text);
    assert_eq!(issues.iter().map(|i| i.field.as_str()).collect::<Vec<_>>(), [field], "{issues:#?}");
    let issue = issues.into_iter().next().unwrap();
    assert_eq!(issue.line, Some(line), "{issue:?}");
    for fragment in fragments {
        assert!(issue.message.contains(fragment), "{:?} lacks {fragment:?}", issue.message);
    }
    issue
}

#[test]
fn every_example_megatron_job_validates_against_its_versions_table() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("kind: megatron-sft") {
            continue;
        }
        if let Err(errors) = JobSpec::from_yaml(&text, &path.display().to_string()) {
            panic!("{errors}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} megatron-sft examples in {}", dir.display());
    // The examples hold for every minor of their major that Cohort has a table for.
    for release in SwiftRelease::available() {
        let (base, major) =
            if release.major() == 3 { (V3_JOB, "swift_version: 3") } else { (V4_JOB, "swift_version: 4") };
        let pinned = replaced(base, major, &format!("swift_version: \"{}.{}\"", release.major(), release.minor()));
        assert_eq!(megatron(&pinned).release, release);
    }
    // The examples' fixture copies are the same files.
    assert_eq!(V4_JOB, std::fs::read_to_string(dir.join("qwen3-8b-sft-2node-v4.yaml")).unwrap());
    assert_eq!(V3_JOB, std::fs::read_to_string(dir.join("qwen3-8b-sft-2node.yaml")).unwrap());
}

#[test]
fn num_workers_is_refused_by_4x_with_its_4x_name() {
    // ms-swift 4.6.0 refuses --num_workers on every rank; the v4 example used it.
    let text = replaced(V4_JOB, "  dataloader_num_workers: 4", "  num_workers: 4");
    single(
        &text,
        "megatron.num_workers",
        32,
        &["`num_workers` is the ms-swift 3.x spelling; with swift_version 4 write `dataloader_num_workers`"],
    );
}

#[test]
fn renames_name_the_spelling_of_the_jobs_version() {
    single(
        &replaced(V3_JOB, "  finetune: true", "  finetune: true\n  tuner_type: lora"),
        "megatron.tuner_type",
        21,
        &[
            "is the ms-swift 4.x spelling; with swift_version 3 write `train_type`",
            "ms-swift 3.12.6 has no --tuner_type",
        ],
    );
    single(
        &replaced(V4_JOB, "  finetune: true", "  finetune: true\n  no_initialization: false"),
        "megatron.no_initialization",
        22,
        &["write `perform_initialization` with the opposite value"],
    );
    single(
        &replaced(V4_JOB, "  finetune: true", "  finetune: true\n  distributed_timeout_minutes: 30"),
        "megatron.distributed_timeout_minutes",
        22,
        &["write `ddp_timeout` (in seconds, not minutes)"],
    );
}

#[test]
fn unknown_flags_are_errors_with_a_suggestion_from_that_version() {
    single(
        &replaced(V3_JOB, "  lr: 1e-5", "  lrr: 1e-5"),
        "megatron.lrr",
        22,
        &["`lrr` is not a megatron sft flag of ms-swift 3.12.6 (swift_version 3); did you mean `lr`?"],
    );
    // A flag of a newer minor only: the message names the version that has it.
    let text = replaced(
        &replaced(V3_JOB, "swift_version: 3", "swift_version: \"3.10\""),
        "  finetune: true",
        "  finetune: true\n  group_by_length: true",
    );
    single(
        &text,
        "megatron.group_by_length",
        21,
        &[
            "`group_by_length` is not a megatron sft flag of ms-swift 3.10.3 (swift_version 3.10)",
            "ms-swift 3.12.6 has it: if the nodes run that version, set swift_version: \"3.12\"",
        ],
    );
}

#[test]
fn abbreviations_are_refused_with_the_whole_name() {
    single(
        &replaced(V3_JOB, "  lr_warmup_fraction: 0.05", "  lr_warm: 0.05"),
        "megatron.lr_warm",
        23,
        &["abbreviation of several flags (--lr_warmup_fraction, --lr_warmup_iters)", "write the whole name"],
    );
    single(
        &replaced(V3_JOB, "  lr_warmup_fraction: 0.05", "  lr_warmup_frac: 0.05"),
        "megatron.lr_warmup_frac",
        23,
        &["only an abbreviation that argparse would silently take as --lr_warmup_fraction", "`lr_warmup_fraction`"],
    );
}

#[test]
fn values_are_checked_against_the_type_and_choices() {
    single(
        &replaced(V3_JOB, "  max_epochs: 3", "  max_epochs: three"),
        "megatron.max_epochs",
        25,
        &["`max_epochs` takes an integer, got \"three\""],
    );
    single(&replaced(V3_JOB, "  lr: 1e-5", "  lr: fast"), "megatron.lr", 22, &["`lr` takes a number, got \"fast\""]);
    single(
        &replaced(V3_JOB, "  add_version: false", "  add_version: maybe"),
        "megatron.add_version",
        29,
        &["`add_version` takes true or false"],
    );
    single(
        &replaced(V3_JOB, "recompute_granularity: full", "recompute_granularity: ful"),
        "megatron.recompute_granularity",
        17,
        &["must be one of selective, full, none, got \"ful\"; did you mean `full`?"],
    );
    single(
        &replaced(V3_JOB, "  lr: 1e-5", "  lr: [1e-5, 2e-5]"),
        "megatron.lr",
        22,
        &["`lr` takes one value (a number), got a list of 2"],
    );
    single(
        &replaced(V3_JOB, "  model_name: swift-robot", "  model_name: swift robot"),
        "megatron.model_name",
        34,
        &["takes several values", "ONE value with spaces"],
    );
    // A one-element list keeps a value with spaces whole, on purpose.
    parse(&replaced(V3_JOB, "  model_name: swift-robot", "  model_name: [swift robot]"));
}

#[test]
fn switches_and_unusable_flags_say_what_to_write() {
    single(
        &replaced(V4_JOB, "  finetune: true", "  finetune: true\n  no_gradient_accumulation_fusion: true"),
        "megatron.no_gradient_accumulation_fusion",
        22,
        &["is a switch that takes no value; write `gradient_accumulation_fusion: false` instead"],
    );
    single(
        &replaced(V3_JOB, "  finetune: true", "  finetune: true\n  vllm_engine_kwargs: '{}'"),
        "megatron.vllm_engine_kwargs",
        21,
        &["refuses every value of `vllm_engine_kwargs`"],
    );
}

#[test]
fn extra_args_flags_are_checked_too() {
    let text = replaced(
        V3_JOB,
        "  swift_version: 3\n",
        "  swift_version: 3\n  extra_args: [--seed, x, --lrr, '1', --use_distributed_optimizer, --lr-warmup-iters=5, stray]\n",
    );
    let issues = problems_in(&text);
    let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
    assert_eq!(fields, ["megatron.extra_args[0]", "megatron.extra_args[2]", "megatron.extra_args[5]"], "{issues:#?}");
    assert!(issues.iter().all(|i| i.line == Some(10)), "{issues:#?}");
    assert!(issues[0].message.contains("`seed` takes an integer, got \"x\""), "{issues:#?}");
    assert!(issues[1].message.contains("did you mean `lr`?"), "{issues:#?}");
    // --use_distributed_optimizer alone means true (nargs '?'); `stray` is a second value
    // after --lr-warmup-iters=5, which argparse would leave over.
    assert!(
        issues[2].message.contains("`lr_warmup_iters` takes one value (an integer), got a list of 2"),
        "{issues:#?}"
    );
    // Good extra_args pass, dashed aliases included.
    parse(&replaced(
        V3_JOB,
        "  swift_version: 3\n",
        "  swift_version: 3\n  extra_args: [--seed, '7', --lr-warmup-iters=5, --dataset_shuffle]\n",
    ));
}

#[test]
fn swift_version_takes_a_quoted_minor_and_refuses_a_float() {
    let text = replaced(
        &replaced(V3_JOB, "swift_version: 3", "swift_version: \"3.10\""),
        "  load: Qwen3-8B-mcore",
        "  model: Qwen/Qwen3-8B",
    );
    let spec = megatron(&text);
    assert_eq!(spec.release.to_string(), "3.10.3");
    assert_eq!(spec.swift_version, SwiftVersion::V3);
    assert_eq!(spec.model_ref(), Some("Qwen/Qwen3-8B"), "3.10+ loads a Hugging Face --model itself");
    assert_eq!(megatron(V3_JOB).release, SwiftRelease::newest(SwiftVersion::V3));
    assert_eq!(megatron(V4_JOB).release.to_string(), "4.6.0");

    single(
        &replaced(V3_JOB, "swift_version: 3", "swift_version: 3.10"),
        "megatron.swift_version",
        9,
        &["3.10 is read by YAML as the number 3.1", "quote it: `swift_version: \"3.10\"`"],
    );
    // In flow style the line does not show the value alone: the message still says to quote.
    let text =
        "name: a\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\nmegatron: {swift_version: 3.10, load: Qwen3-8B}\n";
    single(text, "megatron.swift_version", 5, &["read by YAML as the number 3.1", "`swift_version: \"3.10\"`"]);
    let issue = single(
        &replaced(V3_JOB, "swift_version: 3", "swift_version: \"3.11\""),
        "megatron.swift_version",
        9,
        &["no flag table for ms-swift 3.11", "tools/swift-flags/"],
    );
    for release in SwiftRelease::available() {
        assert!(issue.message.contains(&release.to_string()), "{} lacks {release}", issue.message);
    }
}

#[test]
fn model_under_3x_is_a_model_and_the_missing_model_error_names_both() {
    let text = replaced(V3_JOB, "  load: Qwen3-8B-mcore", "  model: Qwen/Qwen3-8B");
    let spec = megatron(&text);
    assert_eq!((spec.model_ref(), spec.model_key()), (Some("Qwen/Qwen3-8B"), Some("model")));
    assert!(parse(&text).model().is_some());
    single(
        &replaced(V3_JOB, "  load: Qwen3-8B-mcore\n", ""),
        "megatron",
        8,
        &["names no model to fine-tune; with ms-swift 3.12.6 set `load` (an mcore checkpoint) or `model`"],
    );
}

#[test]
fn resume_of_a_3x_job_with_model_keeps_model_and_loads_the_checkpoint() {
    // ms-swift 3.12.6 with --model and --load: `model` gives the config and tokenizer
    // (swift/megatron/train/sft.py:52 downloads no weights when args.load is set) and the
    // weights come from --load, not from the HF model (trainers/base.py:479); with
    // --finetune false the iteration and optimizer are restored (trainers/base.py:497).
    let spec = megatron(&replaced(V3_JOB, "  load: Qwen3-8B-mcore", "  model: Qwen/Qwen3-8B"));
    let ckpt = Checkpoint {
        path: "/mnt/shared/megatron_output/Qwen3-8B-sft".into(),
        iteration: 50,
        layout: CheckpointLayout::MegatronIter,
        run_dir: "/mnt/shared/megatron_output/Qwen3-8B-sft".into(),
    };
    let argv = apply_resume(&spec, &ckpt).render_args();
    let at = |flag: &str| argv.iter().position(|a| a == flag).map(|i| argv[i + 1].as_str());
    assert_eq!(at("--model"), Some("Qwen/Qwen3-8B"));
    assert_eq!(at("--load"), Some("/mnt/shared/megatron_output/Qwen3-8B-sft"));
    assert_eq!(at("--finetune"), Some("false"));
    // And the resumed argv is still one ms-swift 3.12.6 takes.
    let sft = spec.release.table().command(MEGATRON_SFT).unwrap();
    assert!(sft.flag("model").is_some() && sft.flag("load").is_some());
}

#[test]
fn recompute_rules_are_megatron_cores() {
    // full without a method: transformer_config.py:916-920.
    single(
        &replaced(V3_JOB, "  recompute_method: uniform\n", ""),
        "megatron.recompute_granularity",
        17,
        &["full needs recompute_method: uniform", "or block"],
    );
    // full without a layer count: ms-swift's default is None (transformer_config.py:922-927).
    single(
        &replaced(V3_JOB, "  recompute_num_layers: 3\n", ""),
        "megatron.recompute_granularity",
        17,
        &["full needs recompute_num_layers (ms-swift's default is None"],
    );
    // selective with a layer count (transformer_config.py:929-935).
    let text = replaced(
        &replaced(V3_JOB, "  recompute_method: uniform\n", ""),
        "recompute_granularity: full",
        "recompute_granularity: selective",
    );
    single(&text, "megatron.recompute_num_layers", 18, &["must not be set with recompute_granularity selective"]);
    // none: ms-swift passes None, and megatron-core checks nothing else.
    parse(&replaced(V3_JOB, "recompute_granularity: full", "recompute_granularity: none"));
    // block with any count is fine; uniform with 0 never advances.
    parse(&replaced(V3_JOB, "recompute_method: uniform", "recompute_method: block"));
    single(
        &replaced(V3_JOB, "recompute_num_layers: 3", "recompute_num_layers: 0"),
        "megatron.recompute_num_layers",
        19,
        &["never advances", "at least 1"],
    );
}
