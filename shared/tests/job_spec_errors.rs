//! Broken job files: every problem is reported at once, each naming its field
//! (and line where the text shows it) with a fix.
#![allow(clippy::unwrap_used)]

use cohort_shared::spec::{JobSpec, SpecErrors, SpecIssue};

const V3_JOB: &str = include_str!("fixtures/jobs/qwen3-8b-sft-2node.yaml");

/// The base job with `from` replaced by `to`; fails loudly if `from` is absent.
fn variant(from: &str, to: &str) -> String {
    assert!(V3_JOB.contains(from), "fixture lacks {from:?}");
    V3_JOB.replacen(from, to, 1)
}

fn problems_in(text: &str) -> Vec<SpecIssue> {
    match JobSpec::from_yaml(text, "job.yaml") {
        Ok(spec) => panic!("accepted: {spec:?}"),
        Err(errors) => errors.issues,
    }
}

fn fields(issues: &[SpecIssue]) -> Vec<&str> {
    issues.iter().map(|issue| issue.field.as_str()).collect()
}

/// The only issue, checked for field, line and a fragment of the message.
fn single(text: &str, field: &str, line: Option<usize>, fragment: &str) -> SpecIssue {
    let issues = problems_in(text);
    assert_eq!(fields(&issues), [field], "{issues:#?}");
    let issue = issues.into_iter().next().unwrap();
    assert_eq!(issue.line, line, "{issue:?}");
    assert!(issue.message.contains(fragment), "{:?} lacks {fragment:?}", issue.message);
    issue
}

#[test]
fn global_batch_not_divisible() {
    single(
        &variant("global_batch_size: 16", "global_batch_size: 15"),
        "megatron.global_batch_size",
        Some(16),
        "15 is not divisible by micro_batch_size 2 × data-parallel size 2 (= 4); use a multiple of 4, e.g. 12 or 16",
    );
}

#[test]
fn tensor_parallel_three_breaks_four_rules() {
    let issues = problems_in(&variant("tensor_model_parallel_size: 2", "tensor_model_parallel_size: 3"));
    assert_eq!(fields(&issues), ["megatron.tensor_model_parallel_size"; 4], "{issues:#?}");
    assert!(issues.iter().all(|issue| issue.line == Some(13)));
    let messages: Vec<&str> = issues.iter().map(|issue| issue.message.as_str()).collect();
    let has = |fragment: &str| messages.iter().any(|m| m.contains(fragment));
    assert!(has("TP 3 does not divide gpus_per_node 2"), "{messages:#?}");
    assert!(has("world size 4 (2 nodes × 2 GPUs) is not divisible by TP 3 × PP 1 × CP 1 = 3"));
    assert!(has("Qwen3-8B's 32 attention heads are not divisible by TP 3"));
    assert!(has("Qwen3-8B's 8 KV heads (query groups) are not divisible by TP 3"));
    assert!(has("1, 2, 4, 8"), "the fix lists the valid TP sizes");
}

#[test]
fn sequence_parallel_needs_tensor_parallel() {
    single(
        &variant("tensor_model_parallel_size: 2", "tensor_model_parallel_size: 1"),
        "megatron.sequence_parallel",
        Some(14),
        "silently",
    );
}

#[test]
fn pipeline_five_does_not_divide_layers_or_world() {
    let text = variant("  sequence_parallel: true\n", "  sequence_parallel: true\n  pipeline_model_parallel_size: 5\n");
    let issues = problems_in(&text);
    assert_eq!(fields(&issues), ["megatron.pipeline_model_parallel_size"; 2], "{issues:#?}");
    assert!(issues.iter().all(|issue| issue.line == Some(15)));
    assert!(issues[0].message.contains("world size 4") && issues[0].message.contains("= 10"));
    assert!(issues[1].message.contains("36 layers are not divisible by PP 5"));
    assert!(issues[1].message.contains("1, 2, 3, 4, 6, 9, 12, 18, 36"));
}

#[test]
fn recompute_layers_must_divide_layers_per_stage() {
    single(
        &variant("recompute_num_layers: 3", "recompute_num_layers: 5"),
        "megatron.recompute_num_layers",
        Some(19),
        "36 layers / PP 1 = 36 layers per pipeline stage",
    );
}

#[test]
fn recompute_method_needs_full_granularity() {
    let issues = problems_in(&variant("recompute_granularity: full", "recompute_granularity: selective"));
    assert_eq!(fields(&issues), ["megatron.recompute_method", "megatron.recompute_num_layers"], "{issues:#?}");
    assert_eq!((issues[0].line, issues[1].line), (Some(18), Some(19)));
    assert!(issues[0].message.contains("only applies to recompute_granularity full"), "{issues:#?}");
    // Without a granularity ms-swift's default (selective) applies, and megatron-core
    // refuses both a method and a layer count with it.
    let issues = problems_in(&variant("  recompute_granularity: full\n", ""));
    assert_eq!(fields(&issues), ["megatron.recompute_method", "megatron.recompute_num_layers"], "{issues:#?}");
    assert_eq!((issues[0].line, issues[1].line), (Some(17), Some(18)));
    assert!(issues[0].message.contains("selective (ms-swift's default)"), "{issues:#?}");
    assert!(issues[1].message.contains("must not be set with recompute_granularity selective"), "{issues:#?}");
}

#[test]
fn zero_nodes() {
    single(&variant("nodes: 2", "nodes: 0"), "nodes", Some(3), "at least 1");
}

#[test]
fn nodes_of_the_wrong_type() {
    single(
        &variant("nodes: 2", "nodes: two"),
        "nodes",
        Some(3),
        "invalid type: string \"two\", expected a whole number (e.g. 2)",
    );
}

#[test]
fn misspelt_top_level_key() {
    let issues = problems_in(&variant("gpus_per_node: 2", "gpu_per_node: 2"));
    assert_eq!(fields(&issues), ["gpu_per_node", "gpus_per_node"], "{issues:#?}");
    assert_eq!(issues[0].line, Some(4));
    assert!(issues[0].message.contains("did you mean `gpus_per_node`?"));
    assert!(issues[1].message.contains("is required"));
}

#[test]
fn reserved_env_key() {
    let text = variant(
        "  MEGATRON_LM_PATH: /root/Megatron-LM\n",
        "  MEGATRON_LM_PATH: /root/Megatron-LM\n  MASTER_PORT: 29500\n",
    );
    single(&text, "env.MASTER_PORT", Some(8), "MASTER_PORT is set by Cohort");
    single(&variant("  MEGATRON_LM_PATH:", "  COHORT_JOB_ID:"), "env.COHORT_JOB_ID", Some(7), "set by Cohort");
    // torchrun's per-worker variables, which per-rank launches set.
    single(
        &variant("  MEGATRON_LM_PATH:", "  GROUP_RANK:"),
        "env.GROUP_RANK",
        Some(7),
        "set by Cohort (for each process of a per-rank launch)",
    );
    single(&variant("  MEGATRON_LM_PATH:", "  LOCAL_WORLD_SIZE:"), "env.LOCAL_WORLD_SIZE", Some(7), "set by Cohort");
    single(&variant("  MEGATRON_LM_PATH:", "  2BAD:"), "env.2BAD", Some(7), "not a valid variable name");
    single(
        &variant("  MEGATRON_LM_PATH: /root/Megatron-LM", "  MEGATRON_LM_PATH:"),
        "env.MEGATRON_LM_PATH",
        Some(7),
        "has no value",
    );
}

#[test]
fn dialect_spellings_name_the_right_one() {
    single(
        &variant("  save: ", "  output_dir: "),
        "megatron.output_dir",
        Some(26),
        "`output_dir` is the ms-swift 4.x spelling; with swift_version 3 write `save`",
    );
    single(
        &variant("  save_interval: 50", "  save_steps: 50"),
        "megatron.save_steps",
        Some(27),
        "write `save_interval`",
    );
    single(
        &variant("  max_epochs: 3", "  num_train_epochs: 3"),
        "megatron.num_train_epochs",
        Some(25),
        "write `max_epochs`",
    );
    single(&variant("  load: ", "  mcore_model: "), "megatron.mcore_model", Some(10), "write `load`");
    let v4 =
        include_str!("fixtures/jobs/qwen3-8b-sft-2node-v4.yaml").replace("  save_steps: 50", "  save_interval: 50");
    let issues = problems_in(&v4);
    assert_eq!(fields(&issues), ["megatron.save_interval"]);
    assert!(issues[0].message.contains("with swift_version 4 write `save_steps`"), "{issues:?}");
    let v4 = include_str!("fixtures/jobs/qwen3-8b-sft-2node-v4.yaml").replace("  model: ", "  load: ");
    let issues = problems_in(&v4);
    assert_eq!(fields(&issues), ["megatron.load"], "{issues:#?}");
    assert!(issues[0].message.contains("write `model` or `mcore_model`"));
}

#[test]
fn swift_version_must_be_3_or_4() {
    single(
        &variant("swift_version: 3", "swift_version: 5"),
        "megatron.swift_version",
        Some(9),
        "must be 3, 4 or a quoted \"major.minor\" such as \"3.10\"",
    );
}

#[test]
fn command_given_as_one_string() {
    let text = "name: x\nkind: command\nnodes: 1\ncommand: \"python3 x.py\"\n";
    single(text, "command", Some(4), r#"write `command: ["python3", "x.py"]`"#);
}

#[test]
fn bad_command_elements_are_indexed() {
    let text = "name: x\nkind: command\nnodes: 1\ncommand:\n  - python3\n  - {a: 1}\n";
    single(text, "command[1]", Some(4), "is a mapping");
}

#[test]
fn kind_is_required_and_sections_must_match_it() {
    let no_kind = variant("kind: megatron-sft\n", "");
    single(&no_kind, "kind", None, "is required: `command`, `megatron-sft` or `pipeline`");
    single(&variant("kind: megatron-sft", "kind: megatron"), "kind", Some(2), "unknown variant `megatron`");
    let issues = problems_in(&variant("kind: megatron-sft", "kind: command"));
    assert_eq!(fields(&issues), ["megatron", "command"], "{issues:#?}");
    assert!(issues[0].message.contains("does not apply to kind command"));
    let text = format!("{V3_JOB}command: [python3]\nlaunch: per-rank\n");
    assert_eq!(fields(&problems_in(&text)), ["command", "launch"]);
}

#[test]
fn megatron_needs_gpus_and_a_model() {
    single(&variant("gpus_per_node: 2\n", ""), "gpus_per_node", None, "is required");
    single(&variant("gpus_per_node: 2", "gpus_per_node: 0"), "gpus_per_node", Some(4), "at least 1 GPU");
    single(
        &variant("  load: Qwen3-8B-mcore\n", ""),
        "megatron",
        Some(8),
        "names no model to fine-tune; with ms-swift 3.12.6 set `load` (an mcore checkpoint) or `model` (a Hugging Face model id or directory)",
    );
}

#[test]
fn bad_flag_values_name_the_flag() {
    let issues = problems_in(&variant(
        "  num_workers: 4\n",
        "  num_workers:\n  rope_scaling: {type: yarn}\n  val_dataset: []\n  tensor-model-parallel-size: 2\n  context_parallel_size: two\n",
    ));
    assert_eq!(
        fields(&issues),
        [
            "megatron.num_workers",
            "megatron.rope_scaling",
            "megatron.val_dataset",
            "megatron.tensor-model-parallel-size",
            "megatron.context_parallel_size"
        ],
        "{issues:#?}"
    );
    assert_eq!(issues.iter().map(|issue| issue.line).collect::<Vec<_>>(), [31, 32, 33, 34, 35].map(Some));
    assert!(issues[3].message.contains("write the flag as `tensor_model_parallel_size`"));
    assert!(issues[4].message.contains("`context_parallel_size` takes an integer, got \"two\""), "{issues:#?}");
}

#[test]
fn name_env_selector_and_durations() {
    single(&variant("name: qwen3-8b-sft", "name: Qwen3_SFT"), "name", Some(1), r#"e.g. "qwen3-sft""#);
    single(&variant("name: qwen3-8b-sft", &format!("name: {}", "a".repeat(49))), "name", Some(1), "at most 48");
    single(&format!("{V3_JOB}workdir: ' '\n"), "workdir", Some(35), "is empty");
    single(&format!("{V3_JOB}stop_grace: 30\n"), "stop_grace", Some(35), r#"write e.g. "30s""#);
    // It went to the agents as u32 milliseconds, truncated: 999999999h became about 12 days.
    single(&format!("{V3_JOB}stop_grace: 999999999h\n"), "stop_grace", Some(35), "longer than the longest wait");
    single(&format!("{V3_JOB}hang_timeout: 0s\n"), "hang_timeout", Some(35), "longer than zero");
    single(&format!("{V3_JOB}time_limit: 0s\n"), "time_limit", Some(35), "longer than zero");
    single(&format!("{V3_JOB}time_limit: 31d\n"), "time_limit", Some(35), "longer than the longest time limit, 30days");
    single(&format!("{V3_JOB}time_limit: 2\n"), "time_limit", Some(35), r#"has no unit; write e.g. "2s""#);
    single(&format!("{V3_JOB}node_selector: [gpu]\n"), "node_selector", Some(35), "must be a mapping");
    single(&format!("{V3_JOB}priority: high\n"), "priority", Some(35), "expected a whole number (e.g. 2)");
    single(&format!("{V3_JOB}restart: always\n"), "restart", Some(35), "must be a mapping");
    single(&format!("{V3_JOB}restart: {{on: [node_lots]}}\n"), "restart.on[0]", Some(35), "did you mean `node_lost`?");
    single(&format!("{V3_JOB}restart: {{max_restart: 2}}\n"), "restart.max_restart", Some(35), "unknown field");
    single(&format!("{V3_JOB}restart: {{backoff: 10}}\n"), "restart.backoff", Some(35), "write e.g. \"10s\"");
    single(&format!("{V3_JOB}straggler_factor: 0.5\n"), "straggler_factor", Some(35), "above 1");
    single(
        &format!("{V3_JOB}stage: [{{name: m, source: rel/path}}]\n"),
        "stage[0].source",
        Some(35),
        "absolute path or an http(s) URL",
    );
    single(&format!("{V3_JOB}dataset_policy: maybe\n"), "dataset_policy", Some(35), "unknown variant");
}

#[test]
fn all_problems_are_reported_together() {
    let text = variant("name: qwen3-8b-sft", "name: Qwen3_SFT")
        .replacen("  MEGATRON_LM_PATH", "  MASTER_PORT: 1\n  MEGATRON_LM_PATH", 1)
        .replacen("global_batch_size: 16", "global_batch_size: 15", 1)
        .replacen("  save: ", "  output_dir: ", 1)
        .replacen("recompute_num_layers: 3", "recompute_num_layers: 5", 1)
        + "restart: always\npriority: high\n";
    let issues = problems_in(&text);
    assert_eq!(
        fields(&issues),
        // In file order.
        [
            "name",
            "env.MASTER_PORT",
            "megatron.global_batch_size",
            "megatron.recompute_num_layers",
            "megatron.output_dir",
            "restart",
            "priority"
        ],
        "{issues:#?}"
    );
    assert!(issues.iter().all(|issue| issue.line.is_some()), "{issues:#?}");
}

#[test]
fn syntax_errors_carry_the_line_and_stop_there() {
    let issues = problems_in("name: a\nkind: command\nnodes: [1\ncommand: [x]\n");
    assert_eq!(issues.len(), 1, "{issues:#?}");
    assert_eq!(issues[0].field, "");
    assert!(issues[0].line.is_some_and(|line| line >= 3), "{issues:?}");
    assert!(issues[0].message.starts_with("not valid YAML"));
    let duplicate = problems_in("name: a\nname: b\n");
    assert!(duplicate[0].message.contains("duplicate"), "{duplicate:?}");
    assert_eq!(problems_in("")[0].message, "the job file is empty");
    assert!(problems_in("- a\n")[0].message.contains("is a mapping"));
}

#[test]
fn errors_the_yaml_parser_gives_no_position_for_still_name_a_line() {
    // Found by the job_file fuzz target: serde_yaml has no location for these.
    let two = problems_in("# job\nname: a\nkind: command\n---\nname: b\n");
    assert_eq!((two[0].line, two[0].message.contains("more than one document")), (Some(4), true), "{two:?}");
    let stray = problems_in("#\n   text\nname: a\n");
    assert!(stray[0].line.is_some(), "{stray:?}");
    assert_eq!(problems_in("")[0].line, Some(1));
    // An anchor on an empty key: a null key, on line 3.
    let null_key = problems_in("name: a\nkind: command\n&anchor: [x]\n");
    let odd = null_key.iter().find(|i| i.message.contains("must be text")).unwrap();
    assert_eq!(odd.line, Some(3), "{null_key:?}");
}

#[test]
fn display_lists_file_line_field_and_message() {
    let errors: SpecErrors = JobSpec::from_yaml(&variant("nodes: 2", "nodes: 0"), "jobs/q.yaml").unwrap_err();
    assert_eq!(errors.to_string(), "job file jobs/q.yaml: 1 problem\n  jobs/q.yaml:3: nodes: must be at least 1");
}

#[test]
fn a_pipeline_checks_the_shared_fields_as_every_job_does() {
    let text = "name: flow\nkind: pipeline\nworkdir: ' '\nhang_timeout: 0s\nshared_paths: [relative/dir]\noutput_dir: /tmp/flow\n\
                stages:\n  - {name: a, kind: command, command: ['true']}\n";
    let issues = problems_in(text);
    assert_eq!(fields(&issues), ["workdir", "hang_timeout", "shared_paths[0]"], "{issues:#?}");
    assert_eq!(issues.iter().map(|i| i.line).collect::<Vec<_>>(), [Some(3), Some(4), Some(5)]);
}

#[test]
fn a_staged_model_needs_a_hub_id_and_a_layout_needs_a_model() {
    single(
        &format!("{V3_JOB}stage: [{{model: Qwen3-8B, source: /m}}]\n"),
        "stage[0].model",
        Some(35),
        "write owner/name, e.g. Qwen/Qwen3-8B",
    );
    single(
        &format!("{V3_JOB}stage: [{{model: ../etc, source: /m}}]\n"),
        "stage[0].model",
        Some(35),
        "not a hub model id",
    );
    single(
        &format!("{V3_JOB}stage: [{{name: m, source: /m, layout: huggingface}}]\n"),
        "stage[0].layout",
        Some(35),
        "needs a model",
    );
    single(
        &format!("{V3_JOB}stage: [{{model: Qwen/Qwen3-8B, source: /m, layout: hf}}]\n"),
        "stage[0].layout",
        Some(35),
        "expected `modelscope` or `huggingface`",
    );

    let spec = JobSpec::from_yaml(
        &format!(
            "{V3_JOB}stage: [{{model: Qwen/Qwen3.5-8B, source: /m}}, {{model: a/b, source: /b, layout: huggingface}}]\n"
        ),
        "job.yaml",
    )
    .unwrap();
    assert_eq!(spec.stage[0].name, "Qwen_Qwen3_5-8B", "named after the model");
    assert_eq!(spec.stage[0].hub_layout(), Some(cohort_shared::spec::HubLayout::Modelscope), "the default layout");
    assert_eq!(spec.stage[1].hub_layout(), Some(cohort_shared::spec::HubLayout::Huggingface));
}
