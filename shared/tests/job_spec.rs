//! The job files that must be accepted, and what they render to.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_shared::model::ModelConfig;
use cohort_shared::spec::{FlagValue, JobSpec, LaunchMode, ParallelLayout, SwiftVersion, Workload};

const V3_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node.yaml");
const V4_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node-v4.yaml");
const COMMAND_JOB: &str = include_str!("fixtures/jobs/rendezvous-command.yaml");

fn parse(text: &str) -> JobSpec {
    match JobSpec::from_yaml(text, "job.yaml") {
        Ok(spec) => spec,
        Err(errors) => panic!("{errors}"),
    }
}

fn megatron(spec: &JobSpec) -> &cohort_shared::spec::MegatronSpec {
    match &spec.workload {
        Workload::MegatronSft(megatron) => megatron,
        _ => panic!("not a megatron-sft job"),
    }
}

/// The argv both dialects share after their model flag.
fn argv(words: &str, system_prompt_at: &str) -> Vec<String> {
    let mut argv = Vec::new();
    for word in words.split_whitespace() {
        if word == system_prompt_at {
            argv.push("You are a helpful assistant.".to_owned());
        } else {
            argv.push(word.to_owned());
        }
    }
    argv
}

#[test]
fn v3_example_renders_exactly() {
    let spec = parse(V3_JOB);
    let expected = argv(
        "megatron sft --load Qwen3-8B-mcore \
         --dataset /root/dataset/multi_round_output.jsonl /root/dataset/output_messages.jsonl \
         --split_dataset_ratio 0.01 --tensor_model_parallel_size 2 --sequence_parallel true \
         --micro_batch_size 2 --global_batch_size 16 --recompute_granularity full \
         --recompute_method uniform --recompute_num_layers 3 --finetune true \
         --cross_entropy_loss_fusion true --lr 1e-5 --lr_warmup_fraction 0.05 --min_lr 1e-6 \
         --max_epochs 3 --save /mnt/shared/megatron_output/Qwen3-8B-sft --save_interval 50 \
         --max_length 2048 --add_version false --system SYSTEM --num_workers 4 \
         --dataset_num_proc 4 --model_author swift --model_name swift-robot",
        "SYSTEM",
    );
    assert_eq!(megatron(&spec).render_args(), expected);
}

#[test]
fn v3_example_fields_layout_and_model() {
    let spec = parse(V3_JOB);
    assert_eq!(spec.name, "qwen3-8b-sft");
    assert_eq!((spec.nodes, spec.gpus_per_node, spec.world_size()), (2, 2, 4));
    assert_eq!(
        spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(),
        [("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"), ("MEGATRON_LM_PATH", "/root/Megatron-LM")]
    );
    assert_eq!(spec.stop_grace, Duration::from_secs(10));
    assert_eq!((spec.priority, spec.hang_timeout, spec.workdir.as_deref()), (0, None, None));
    assert!(spec.node_selector.is_empty());

    let megatron = megatron(&spec);
    assert_eq!(megatron.swift_version, SwiftVersion::V3);
    assert_eq!(megatron.program, ["megatron", "sft"]);
    assert!(megatron.extra_args.is_empty());
    assert_eq!(
        megatron.flag("dataset"),
        Some(&FlagValue::List(vec![
            "/root/dataset/multi_round_output.jsonl".into(),
            "/root/dataset/output_messages.jsonl".into()
        ]))
    );
    assert!(!megatron.flags.contains_key("swift_version"));
    assert_eq!(megatron.model_ref(), Some("Qwen3-8B-mcore"));
    assert_eq!(megatron.output_dir(), Some("/mnt/shared/megatron_output/Qwen3-8B-sft"));

    let layout = spec.layout().unwrap();
    assert_eq!(
        layout,
        ParallelLayout { tp: 2, pp: 1, cp: 1, dp: 2, world: 4, micro_batch: 2, global_batch: 16, grad_accum: 4 }
    );
    assert_eq!(
        layout.to_string(),
        "TP 2 × PP 1 × CP 1 × DP 2 = world 4; micro batch 2 × DP 2 × grad accumulation 4 = global batch 16"
    );
    assert_eq!(spec.model(), ModelConfig::known("Qwen3-8B"));
    // `load: Qwen3-8B-mcore` with no workdir: resolved in each agent's per-job directory.
    let fields: Vec<String> = spec.warnings().into_iter().map(|w| w.field).collect();
    assert_eq!(fields, ["megatron.load"]);
}

#[test]
fn v4_example_uses_the_4x_dialect() {
    let spec = parse(V4_JOB);
    let megatron = megatron(&spec);
    assert_eq!(megatron.swift_version, SwiftVersion::V4);
    let expected = argv(
        "megatron sft --model Qwen/Qwen3-8B \
         --dataset /root/dataset/multi_round_output.jsonl /root/dataset/output_messages.jsonl \
         --split_dataset_ratio 0.01 --tensor_model_parallel_size 2 --sequence_parallel true \
         --micro_batch_size 2 --global_batch_size 16 --recompute_granularity full \
         --recompute_method uniform --recompute_num_layers 3 --finetune true \
         --cross_entropy_loss_fusion true --lr 1e-5 --lr_warmup_fraction 0.05 --min_lr 1e-6 \
         --num_train_epochs 3 --output_dir /mnt/shared/megatron_output/Qwen3-8B-sft --save_steps 50 \
         --max_length 2048 --add_version false --system SYSTEM --dataloader_num_workers 4 \
         --dataset_num_proc 4 --model_author swift --model_name swift-robot",
        "SYSTEM",
    );
    assert_eq!(megatron.render_args(), expected);
    assert_eq!(megatron.model_ref(), Some("Qwen/Qwen3-8B"));
    assert_eq!(megatron.output_dir(), Some("/mnt/shared/megatron_output/Qwen3-8B-sft"));
    assert_eq!(spec.model().map(|m| m.name), Some("Qwen3-8B".into()));
    assert_eq!(spec.layout(), parse(V3_JOB).layout());
    assert_eq!(spec.warnings(), []);
}

#[test]
fn memory_estimate_matches_the_reference_table() {
    // Qwen3-8B at TP 2: DP 1 → 68.7 GiB, DP 2 → 45.8 GiB (reference section 4).
    let dp2 = parse(V3_JOB).memory_estimate_gib().unwrap();
    assert!((dp2 - 45.8).abs() < 0.05, "{dp2}");
    let dp1 = parse(&V3_JOB.replace("nodes: 2", "nodes: 1")).memory_estimate_gib().unwrap();
    assert!((dp1 - 68.7).abs() < 0.05, "{dp1}");
    // Without the distributed optimizer every rank keeps all 18 bytes a parameter.
    let replicated =
        parse(&V3_JOB.replace("  finetune: true\n", "  finetune: true\n  use_distributed_optimizer: false\n"));
    let replicated = replicated.memory_estimate_gib().unwrap();
    assert!((replicated - 68.7).abs() < 0.05, "{replicated}");
}

#[test]
fn unknown_models_have_no_model_and_no_estimate() {
    let spec = parse(&V3_JOB.replace("load: Qwen3-8B-mcore", "load: /ckpt/llama-7b"));
    assert_eq!(spec.model(), None);
    assert_eq!(spec.memory_estimate_gib(), None);
    let warnings = spec.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].field, "megatron.load");
    assert!(warnings[0].message.contains("\"/ckpt/llama-7b\""), "{warnings:?}");
}

#[test]
fn relative_paths_without_a_workdir_are_warned_of_with_where_they_resolve() {
    // The fixture loads `Qwen3-8B-mcore`, a relative path, and sets no workdir.
    let text = V3_JOB.replace("[/root/dataset/multi_round_output.jsonl,", "[data/train.jsonl#100, hub/name,");
    let warnings = parse(&text).warnings();
    let fields: Vec<&str> = warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, ["megatron.load", "megatron.dataset"], "{warnings:?}");
    assert!(
        warnings[0].message.contains("<agent --work-dir>/jobs/<job id>/workdir/Qwen3-8B-mcore")
            && warnings[0].message.contains("set `workdir:`"),
        "{warnings:?}"
    );
    assert!(warnings[1].message.contains("\"data/train.jsonl\" is relative"), "{warnings:?}");
    // With a workdir the same paths are the user's choice: no warning.
    let with_workdir = parse(&text.replace("megatron:\n", "workdir: /mnt/shared\nmegatron:\n")).warnings();
    assert!(with_workdir.is_empty(), "{with_workdir:?}");
    // Absolute paths need no workdir.
    let absolute = parse(&V3_JOB.replace("load: Qwen3-8B-mcore", "load: /ckpt/Qwen3-8B-mcore")).warnings();
    assert!(absolute.iter().all(|w| w.field != "megatron.load" || !w.message.contains("relative")), "{absolute:?}");
}

#[test]
fn warnings_name_the_3x_finetune_default() {
    // An unknown flag is no longer a warning but an error (job_spec_flags.rs).
    let text = V3_JOB.replace("  finetune: true\n", "").replace("megatron:\n", "workdir: /mnt/shared\nmegatron:\n");
    let warnings = parse(&text).warnings();
    let fields: Vec<&str> = warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(fields, ["megatron.finetune"]);
    assert!(warnings[0].message.contains("defaults finetune to false"));
}

#[test]
fn command_job_fields() {
    let spec = parse(COMMAND_JOB);
    let Workload::Command(command) = &spec.workload else {
        panic!("not a command job");
    };
    assert_eq!(command.argv, ["python3", "rendezvous.py", "--timeout", "30"]);
    assert_eq!(command.launch, LaunchMode::PerRank);
    assert_eq!(spec.gpus_per_node, 0, "CPU-only command jobs default to 0 GPUs");
    assert_eq!(spec.env.get("OMP_NUM_THREADS").map(String::as_str), Some("1"));
    assert_eq!(spec.env.get("DEBUG").map(String::as_str), Some("true"));
    assert_eq!(spec.node_selector.get("gpu").map(String::as_str), Some("h100"));
    assert_eq!(spec.workdir.as_deref(), Some("/opt/cohort/examples"));
    assert_eq!(spec.priority, 5);
    assert_eq!(spec.stop_grace, Duration::from_secs(30));
    assert_eq!(spec.hang_timeout, Some(Duration::from_secs(600)));
    assert_eq!((spec.layout(), spec.model(), spec.memory_estimate_gib()), (None, None, None));
    assert_eq!(spec.warnings(), []);
}

#[test]
fn command_launch_defaults_to_per_node() {
    let spec = parse("name: a\nkind: command\nnodes: 1\ncommand: [true]\n");
    let Workload::Command(command) = &spec.workload else {
        panic!("not a command job");
    };
    assert_eq!((command.argv.as_slice(), command.launch), (&["true".to_owned()][..], LaunchMode::PerNode));
    // Relative workdirs are kept; the controller resolves them against the job file.
    let spec = parse("name: a\nkind: command\nnodes: 1\ncommand: [true]\nworkdir: runs/a\n");
    assert_eq!(spec.workdir.as_deref(), Some("runs/a"));
}

#[test]
fn megatron_program_and_extra_args() {
    let text = V3_JOB.replace(
        "  swift_version: 3\n",
        "  swift_version: 3\n  program: [/opt/venv/bin/megatron, sft]\n  extra_args: [--seed, 42]\n",
    );
    let args = megatron(&parse(&text)).render_args();
    assert_eq!(args[..2], ["/opt/venv/bin/megatron", "sft"]);
    assert_eq!(args[args.len() - 2..], ["--seed", "42"]);
    assert!(!args.iter().any(|arg| arg == "--program" || arg == "--extra_args"));
}

#[test]
fn yaml_scalars_render_as_argparse_reads_them() {
    let text = "name: a\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\nmegatron:\n  load: Qwen3-8B\n  \
                finetune: true\n  lr: 0.00002\n  weight_decay: 0.1\n  adam_eps: 1.0e-8\n  seed: 007\n  \
                max_length: 4096\n  add_version: False\n  system: 'a: b'\n";
    let args = megatron(&parse(text)).render_args();
    assert_eq!(
        args[2..],
        [
            "--load",
            "Qwen3-8B",
            "--finetune",
            "true",
            "--lr",
            "2e-5",
            "--weight_decay",
            "0.1",
            "--adam_eps",
            "1e-8",
            "--seed",
            "007",
            "--max_length",
            "4096",
            "--add_version",
            "false",
            "--system",
            "a: b"
        ]
    );
}

#[test]
fn flow_style_megatron_section_is_accepted() {
    let text = "name: a\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 2\n\
                megatron: {load: Qwen3-8B, tensor_model_parallel_size: 2, finetune: true}\n";
    let spec = parse(text);
    assert_eq!(spec.layout().map(|l| (l.tp, l.dp, l.grad_accum)), Some((2, 1, 16)));
}

#[test]
fn restart_policy_defaults_and_overrides() {
    use cohort_shared::failure::FailureCause as C;
    let base = "name: a\nkind: command\nnodes: 1\ncommand: [x]\n";
    let none = parse(base);
    assert_eq!(none.restart.max_restarts, 0, "no restart section: no restarts");
    assert!(!none.restart.retries(C::NodeLost));
    assert_eq!(none.straggler_factor, 1.5);

    let defaults = parse(&format!("{base}restart: {{}}\n"));
    assert_eq!(defaults.restart.max_restarts, 3);
    assert_eq!(defaults.restart.backoff, Duration::from_secs(10));
    assert_eq!(defaults.restart.on, [C::RankFailed, C::NodeLost, C::Hang]);
    // Infrastructure failures are retried, OOM and user errors are not.
    assert!(defaults.restart.retries(C::Nccl) && defaults.restart.retries(C::Hang));
    assert!(!defaults.restart.retries(C::CudaOom) && !defaults.restart.retries(C::UserError));
    assert!(!defaults.restart.retries(C::PreflightFailed));
    assert!(!defaults.restart.retries(C::TimeLimit), "a timed-out attempt is not restarted by default");
    assert_eq!(defaults.restart.backoff_for(1), Duration::from_secs(10));
    assert_eq!(defaults.restart.backoff_for(3), Duration::from_secs(40));
    assert_eq!(defaults.restart.backoff_for(30), Duration::from_secs(300));

    let custom = parse(&format!(
        "{base}straggler_factor: 2\nrestart:\n  max_restarts: 1\n  backoff: 500ms\n  on: [node_lost, cuda_oom]\n  exclude_failed_nodes: true\n"
    ));
    assert_eq!(custom.straggler_factor, 2.0);
    assert_eq!(custom.restart.max_restarts, 1);
    assert_eq!(custom.restart.backoff, Duration::from_millis(500));
    assert!(custom.restart.exclude_failed_nodes);
    assert!(custom.restart.retries(C::CudaOom), "a cause named in `on` is retried");
    assert!(!custom.restart.retries(C::Nccl), "rank_failed is not in `on`");

    let requeued = parse(&format!("{base}restart: {{on: [time_limit]}}\n"));
    assert!(requeued.restart.retries(C::TimeLimit), "named, a timed-out attempt is restarted");
}

#[test]
fn time_limit_is_read_as_a_duration_and_absent_by_default() {
    let base = "name: a\nkind: command\nnodes: 1\ncommand: [x]\n";
    assert_eq!(parse(base).time_limit, None);
    assert_eq!(parse(&format!("{base}time_limit: 1h30m\n")).time_limit, Some(Duration::from_secs(5400)));
    assert_eq!(parse(&format!("{base}time_limit: 30days\n")).time_limit, Some(Duration::from_secs(30 * 86400)));
}

#[test]
fn queue_names_the_queue_and_a_bad_name_is_refused_at_queue() {
    let spec = parse("name: a\nkind: command\nnodes: 1\nqueue: team-a\ncommand: [x]\n");
    assert_eq!(spec.queue.as_deref(), Some("team-a"));
    assert_eq!(parse("name: a\nkind: command\nnodes: 1\ncommand: [x]\n").queue, None);
    let errors =
        JobSpec::from_yaml("name: a\nkind: command\nnodes: 1\nqueue: 'team a'\ncommand: [x]\n", "a.yaml").unwrap_err();
    let issue = errors.issues.iter().find(|i| i.field == "queue").expect("an issue at queue");
    assert!(issue.message.contains("is not a queue name"), "{}", issue.message);
}

#[test]
fn checkpoints_belong_to_command_jobs_and_megatron_sft_is_sent_to_its_save() {
    let spec = parse("name: a\nkind: command\nnodes: 1\ncheckpoints: /shared/ckpt\ncommand: [x]\n");
    let Workload::Command(command) = &spec.workload else { panic!("not a command job") };
    assert_eq!(command.checkpoints.as_deref(), Some("/shared/ckpt"));
    let misplaced = V3_JOB.replacen("kind: megatron-sft\n", "kind: megatron-sft\ncheckpoints: /shared/ckpt\n", 1);
    assert_ne!(misplaced, V3_JOB);
    let e = JobSpec::from_yaml(&misplaced, "job.yaml").unwrap_err().to_string();
    assert!(e.contains("checkpoints") && e.contains("megatron.save or output_dir"), "{e}");
}

#[test]
fn a_3x_job_that_saves_on_sigterm_is_warned_of_its_dataloader_workers() {
    // The fixture sets num_workers: 4 and no preempt: nothing to warn of.
    assert!(!parse(V3_JOB).warnings().iter().any(|w| w.field == "megatron.num_workers"));
    let preemptible = format!("{V3_JOB}preempt: {{grace: 5m}}\n");
    let warnings = parse(&preemptible).warnings();
    let workers = warnings.iter().find(|w| w.field == "megatron.num_workers").expect("warned");
    assert!(workers.message.contains("(4 of them)") && workers.message.contains("set num_workers: 0"), "{workers:?}");
    let fixed = preemptible.replace("  num_workers: 4\n", "  num_workers: 0\n");
    assert!(!parse(&fixed).warnings().iter().any(|w| w.field == "megatron.num_workers"));
    // Another signal, or 4.x (no handler is merged): nothing.
    let usr1 = format!("{V3_JOB}preempt: {{signal: SIGUSR1}}\n");
    assert!(!parse(&usr1).warnings().iter().any(|w| w.field == "megatron.num_workers"));
    let v4 = format!("{V4_JOB}preempt: {{grace: 5m}}\n");
    assert!(!parse(&v4).warnings().iter().any(|w| w.field == "megatron.num_workers"));
}
