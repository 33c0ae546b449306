//! Pipeline jobs: the `stages:` section, what each stage renders to (the
//! ms-swift commands of both dialects), and the before/after report.
#![allow(clippy::unwrap_used)]

use cohort_shared::megatron::SwiftVersion;
use cohort_shared::pipeline::report::{Report, pair, read_answers, read_scores, score_rows, summary};
use cohort_shared::pipeline::{
    ConvertOptions, Part, Resolved, conversion_key, eval_args, infer_args, to_hf_args, to_mcore_args,
};
use cohort_shared::spec::stages::{PipelineSpec, StepKind};
use cohort_shared::spec::{JobSpec, Workload};

const PIPELINE: &str = include_str!("fixtures/jobs/qwen3-8b-pipeline.yaml");
const PIPELINE_V4: &str = include_str!("fixtures/jobs/qwen3-8b-pipeline-v4.yaml");

fn pipeline(text: &str) -> (JobSpec, PipelineSpec) {
    let spec = JobSpec::from_yaml(text, "p.yaml").unwrap_or_else(|e| panic!("{e}"));
    match spec.workload.clone() {
        Workload::Pipeline(p) => (spec, p),
        _ => panic!("not a pipeline"),
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn problems(text: &str) -> Vec<String> {
    match JobSpec::from_yaml(text, "p.yaml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(errors) => errors
            .issues
            .iter()
            .map(|i| format!("{}:{}: {}", i.line.map(|l| l.to_string()).unwrap_or_default(), i.field, i.message))
            .collect(),
    }
}

#[test]
fn builtin_steps_render_the_ms_swift_commands_of_both_dialects() {
    for version in [SwiftVersion::V3, SwiftVersion::V4] {
        let bf16_tested = ConvertOptions { torch_dtype: Some("bfloat16".into()), test_convert_precision: Some(true) };
        assert_eq!(
            to_mcore_args(version, "/m/Qwen3-8B", "/c/k", &bf16_tested),
            strings(&[
                "swift",
                "export",
                "--model",
                "/m/Qwen3-8B",
                "--to_mcore",
                "true",
                "--output_dir",
                "/c/k",
                "--exist_ok",
                "true",
                "--torch_dtype",
                "bfloat16",
                "--test_convert_precision",
                "true"
            ])
        );
        assert_eq!(
            to_hf_args(version, "/o/sft", "/o/export", &ConvertOptions::default()),
            strings(&[
                "swift",
                "export",
                "--mcore_model",
                "/o/sft",
                "--to_hf",
                "true",
                "--output_dir",
                "/o/export",
                "--exist_ok",
                "true"
            ])
        );
        assert_eq!(
            infer_args(version, "/o/export", "/p.jsonl", "/o/ans/after.jsonl", "0", "2048"),
            strings(&[
                "swift",
                "infer",
                "--model",
                "/o/export",
                "--val_dataset",
                "/p.jsonl",
                "--result_path",
                "/o/ans/after.jsonl",
                "--stream",
                "false",
                "--temperature",
                "0",
                "--max_new_tokens",
                "2048"
            ])
        );
        assert_eq!(
            eval_args(version, "/m", "Native", &strings(&["gsm8k", "arc_c"]), "/o/bench/before", Some("200")),
            strings(&[
                "swift",
                "eval",
                "--model",
                "/m",
                "--eval_backend",
                "Native",
                "--eval_dataset",
                "gsm8k",
                "arc_c",
                "--eval_output_dir",
                "/o/bench/before",
                "--eval_limit",
                "200"
            ])
        );
    }
}

/// Every stage's runs, with references resolved as the controller resolves them.
fn all_runs(text: &str, job_id: &str) -> Vec<(String, Part, JobSpec, Option<String>)> {
    let (_, p) = pipeline(text);
    let mut resolved = Resolved::default();
    let mut runs = Vec::new();
    for stage in p.order() {
        let output = p.stage_output(stage, job_id, &resolved).unwrap();
        resolved.outputs.insert(stage.name.clone(), output.clone());
        if stage.kind == StepKind::MegatronSft {
            resolved.checkpoints.insert(stage.name.clone(), format!("{output}/v0-20261128-101500/checkpoint-50"));
        }
        for run in p.runs(stage, "qwen3-8b-ft", &resolved).unwrap() {
            let yaml = cohort_shared::pipeline::document_yaml(&run.document);
            let spec = JobSpec::from_yaml(&yaml, "run").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            runs.push((stage.name.clone(), run.part, spec, run.result_path));
        }
    }
    runs
}

fn argv(spec: &JobSpec) -> Vec<String> {
    match &spec.workload {
        Workload::Command(c) => c.argv.clone(),
        Workload::MegatronSft(m) => m.render_args(),
        Workload::Pipeline(_) => panic!("nested pipeline"),
    }
}

#[test]
fn each_stage_becomes_an_ordinary_job_with_outputs_of_earlier_stages() {
    let runs = all_runs(PIPELINE, "qwen3-8b-ft-7");
    let names: Vec<(String, Part)> = runs.iter().map(|(n, p, ..)| (n.clone(), *p)).collect();
    assert_eq!(
        names,
        [
            ("convert".to_string(), Part::Main),
            ("sft".into(), Part::Main),
            ("export".into(), Part::Main),
            ("answers".into(), Part::Before),
            ("answers".into(), Part::After),
            ("bench".into(), Part::Before),
            ("bench".into(), Part::After),
        ]
    );
    let out = "/mnt/shared/runs/qwen3-8b-ft-7";
    let (_, _, convert, _) = &runs[0];
    assert_eq!((convert.nodes, convert.gpus_per_node), (1, 1), "single-GPU step");
    assert_eq!(argv(convert)[..4], strings(&["swift", "export", "--model", "/mnt/shared/models/Qwen3-8B"]));
    assert_eq!(convert.env.get("MEGATRON_LM_PATH").map(String::as_str), Some("/root/Megatron-LM"), "pipeline env");

    let (_, _, sft, _) = &runs[1];
    assert_eq!((sft.nodes, sft.gpus_per_node), (2, 2));
    let sft_argv = argv(sft);
    assert_eq!(sft_argv[..4], strings(&["megatron", "sft", "--load", &format!("{out}/convert")]));
    let save = sft_argv.iter().position(|a| a == "--save").unwrap();
    assert_eq!(sft_argv[save + 1], format!("{out}/sft"), "3.x saves to the stage output");

    let (_, _, export, _) = &runs[2];
    assert_eq!(argv(export)[3], format!("{out}/sft/v0-20261128-101500/checkpoint-50"));

    let (_, _, before, result) = &runs[3];
    let before_argv = argv(before);
    assert_eq!(before_argv[3], "/mnt/shared/models/Qwen3-8B", "before = the pipeline's model");
    assert_eq!(result.as_deref(), Some(&*format!("{out}/answers/before.jsonl")));
    let (_, _, after, _) = &runs[4];
    assert_eq!(argv(after)[3], format!("{out}/export"));
    assert!(before.name.ends_with("-before") && after.name.ends_with("-after"));

    let (_, _, bench_after, dir) = &runs[6];
    assert_eq!(dir.as_deref(), Some(&*format!("{out}/bench/after")));
    assert!(argv(bench_after).windows(2).any(|w| w == ["--eval_limit", "200"]));
}

#[test]
fn conversions_render_ms_swift_defaults_and_overwrite_a_half_written_output() {
    let runs = all_runs(PIPELINE, "qwen3-8b-ft-7");
    for (stage, _, spec, _) in runs.iter().filter(|(name, ..)| name == "convert" || name == "export") {
        let argv = argv(spec);
        // ms-swift's defaults: torch_dtype None, test_convert_precision false; the job sets neither.
        assert!(!argv.iter().any(|a| a == "--torch_dtype" || a == "--test_convert_precision"), "{stage}: {argv:?}");
        // A retried stage finds its own half-written output: ms-swift refuses it without this.
        assert!(argv.windows(2).any(|w| w == ["--exist_ok", "true"]), "{stage}: {argv:?}");
    }
    let text = PIPELINE.replace(
        "    kind: to_mcore\n",
        "    kind: to_mcore\n    torch_dtype: float16\n    test_convert_precision: yes\n",
    );
    let convert = argv(&all_runs(&text, "j").remove(0).2);
    assert!(convert.windows(2).any(|w| w == ["--torch_dtype", "float16"]), "{convert:?}");
    assert!(convert.windows(2).any(|w| w == ["--test_convert_precision", "true"]), "{convert:?}");
    let bad_text = PIPELINE.replace("    kind: to_mcore\n", "    kind: to_mcore\n    test_convert_precision: sure\n");
    let line = bad_text.lines().position(|l| l.contains("sure")).unwrap() + 1;
    let bad = problems(&bad_text);
    let want = format!("{line}:stages[0].test_convert_precision: must be true or false");
    assert!(bad.iter().any(|p| p.starts_with(&want)), "{bad:?}");
}

#[test]
fn version_4_megatron_stage_saves_to_output_dir_and_conversion_layout_follows_the_consumer() {
    let text = PIPELINE
        .replace("swift_version: 3", "swift_version: 4")
        .replace("load: $", "mcore_model: $")
        .replace("      max_epochs: 1\n", "      num_train_epochs: 1\n");
    let runs = all_runs(&text, "j-1");
    let sft = &runs[1].2;
    let Workload::MegatronSft(m) = &sft.workload else { panic!() };
    assert_eq!(m.swift_version, SwiftVersion::V4);
    assert_eq!(m.scalar("output_dir"), Some("/mnt/shared/runs/j-1/sft"));
    assert_eq!(m.scalar("mcore_model"), Some("/mnt/shared/runs/j-1/convert"));

    let (_, p) = pipeline(&text);
    assert_eq!(p.conversion_layout(p.stage("convert").unwrap()), (2, 1), "TP of the sft stage that loads it");
    let key = conversion_key("digest-a", 2, 1, SwiftVersion::V4);
    assert_eq!(key, conversion_key("digest-a", 2, 1, SwiftVersion::V4));
    assert_ne!(key, conversion_key("digest-a", 2, 1, SwiftVersion::V3));
    assert_ne!(key, conversion_key("digest-a", 1, 1, SwiftVersion::V4));
    assert_ne!(key, conversion_key("digest-b", 2, 1, SwiftVersion::V4));
}

#[test]
fn version_4_example_trains_from_hf_weights_and_compares_the_checkpoint_without_conversions() {
    let (_, p) = pipeline(PIPELINE_V4);
    assert!(!p.stages.iter().any(|s| matches!(s.kind, StepKind::ToMcore | StepKind::ToHf)));
    let runs = all_runs(PIPELINE_V4, "j-2");
    let out = "/mnt/shared/runs/j-2";
    let sft = argv(&runs[0].2);
    assert_eq!(sft[..4], strings(&["megatron", "sft", "--model", "/mnt/shared/models/Qwen3-8B"]));
    assert!(sft.windows(2).any(|w| w == ["--output_dir", &format!("{out}/sft")]), "{sft:?}");
    // checkpoint-N holds Hugging Face safetensors (save_safetensors defaults to true): infer reads it.
    let checkpoint = format!("{out}/sft/v0-20261128-101500/checkpoint-50");
    let (_, part, after, _) = &runs[2];
    assert_eq!((*part, argv(after)[..4].to_vec()), (Part::After, strings(&["swift", "infer", "--model", &checkpoint])));
    let (_, part, before, _) = &runs[1];
    assert_eq!((*part, argv(before)[3].as_str()), (Part::Before, "/mnt/shared/models/Qwen3-8B"));
}

#[test]
fn command_stages_feed_each_other_through_output_references() {
    let text = r#"
name: chain
kind: pipeline
output_dir: /shared/out
stages:
  - name: produce
    kind: command
    nodes: 2
    command: [sh, -c, "echo hi > ${output}/x"]
  - name: consume
    kind: command
    command: [cat, "${stages.produce.output}/x"]
"#;
    let (_, p) = pipeline(text);
    assert_eq!(p.stage("consume").unwrap().depends_on, ["produce"], "a reference is a dependency");
    let runs = all_runs(text, "chain-3");
    assert_eq!(argv(&runs[0].2), ["sh", "-c", "echo hi > /shared/out/chain-3/produce/x"]);
    assert_eq!(runs[0].2.nodes, 2);
    assert_eq!(argv(&runs[1].2), ["cat", "/shared/out/chain-3/produce/x"]);
}

#[test]
fn bad_stages_are_reported_with_field_and_line() {
    let text = r#"name: bad
kind: pipeline
output_dir: /o
stages:
  - name: sft
    kind: megatron_sft
  - name: conv
    kind: to_hf
    model: ${stages.train.checkpoint}
  - name: a
    kind: command
    command: [x, "${stages.b.output}"]
  - name: b
    kind: command
    depends_on: [a]
    command: [y]
    prompts: /p
  - name: ask
    kind: infer
    after: ${stages.a.checkpoint}
"#;
    let found = problems(text);
    let expect = [
        "6:stages[0].kind: unknown stage kind \"megatron_sft\"; did you mean `megatron-sft`?",
        "7:stages[1]: depends on stage \"train\", which does not exist",
        "10:stages[2].depends_on: the stages depend on each other in a cycle: a -> b -> a",
        "17:stages[3].prompts: `prompts` is not a field of a command stage; it belongs to a infer stage",
        "18:stages[4].prompts: is required for a infer stage",
        "18:stages[4]: `${stages.a.checkpoint}`: only a megatron-sft stage has a checkpoint",
    ];
    for want in expect {
        assert!(found.iter().any(|f| f.starts_with(want)), "missing {want:?} in\n{}", found.join("\n"));
    }
}

#[test]
fn extra_args_of_builtin_steps_are_checked_against_ms_swift_flag_tables() {
    let text = |version: u32| {
        format!(
            r#"name: p
kind: pipeline
swift_version: {version}
output_dir: /o
model: /m
stages:
  - name: convert
    kind: to_mcore
    extra_args: [--exist_ok, "true", --to_megatron, "true"]
  - name: ask
    kind: infer
    prompts: /p.jsonl
    after: /m2
    extra_args: [--max_new_token, "100", --temprature, "0.5", --top_k, many, --infer_backend, pt]
  - name: bench
    kind: eval
    benchmarks: [gsm8k]
    after: /m2
    extra_args: [--eval_backend, Natve]
"#
        )
    };
    for version in [3, 4] {
        let found = problems(&text(version));
        let release = if version == 3 { "3.12.6" } else { "4.6.0" };
        let expect = [
            format!("9:stages[0].extra_args: `--to_megatron` is not a flag of `swift export` in ms-swift {release}"),
            format!(
                "14:stages[1].extra_args: `--max_new_token` is not a flag of `swift infer` in ms-swift {release}, only an abbreviation (of --max_new_tokens)"
            ),
            format!(
                "14:stages[1].extra_args: `--temprature` is not a flag of `swift infer` in ms-swift {release}; did you mean `--temperature`?"
            ),
            "14:stages[1].extra_args: `top_k` takes an integer, got \"many\"".to_owned(),
            "19:stages[2].extra_args: `eval_backend` must be one of Native, OpenCompass, VLMEvalKit, got \"Natve\""
                .to_owned(),
        ];
        for want in &expect {
            assert!(found.iter().any(|f| f.starts_with(want.as_str())), "missing {want:?} in\n{}", found.join("\n"));
        }
        assert_eq!(found.len(), expect.len(), "--exist_ok and --infer_backend pt are fine: {found:#?}");
    }
}

#[test]
fn swift_version_may_name_a_minor_release_which_stages_inherit() {
    // ms-swift 3.10+ loads Hugging Face weights itself (`--model`), which 3.x before 3.10 cannot.
    let text =
        PIPELINE_V4.replace("swift_version: 4", "swift_version: \"3.10\"").replace("num_train_epochs", "max_epochs");
    let (_, p) = pipeline(&text);
    assert_eq!((p.swift_version, p.swift_release.to_string().as_str()), (SwiftVersion::V3, "3.10.3"));
    let runs = all_runs(&text, "j-3");
    let Workload::MegatronSft(m) = &runs[0].2.workload else { panic!() };
    assert_eq!(m.swift_version, SwiftVersion::V3);
    assert_eq!(m.scalar("save"), Some("/mnt/shared/runs/j-3/sft"), "3.x saves with --save");
    assert_eq!(m.scalar("model"), Some("/mnt/shared/models/Qwen3-8B"));

    // A stage's own "major.minor" decides its dialect (here: where it saves).
    let own = PIPELINE.replace("      max_epochs: 1\n", "      max_epochs: 1\n      swift_version: \"3.12\"\n");
    let Workload::MegatronSft(m) = &all_runs(&own, "j-4")[1].2.workload else { panic!() };
    assert_eq!(m.scalar("save"), Some("/mnt/shared/runs/j-4/sft"));

    let float = problems(&PIPELINE.replace("swift_version: 3", "swift_version: 3.10"));
    assert!(float.iter().any(|f| f.contains(":swift_version: ") && f.contains("quote it")), "{float:?}");
    let unknown = problems(&PIPELINE.replace("swift_version: 3", "swift_version: \"3.7\""));
    assert!(unknown.iter().any(|f| f.contains("no flag table for ms-swift 3.7")), "{unknown:?}");
}

#[test]
fn every_rendered_builtin_flag_is_in_each_ms_swift_flag_table() {
    use cohort_shared::megatron::table::Lookup;
    use cohort_shared::megatron::{FlagValue, SwiftRelease};
    let all = ConvertOptions { torch_dtype: Some("bfloat16".into()), test_convert_precision: Some(true) };
    for release in SwiftRelease::available() {
        let version = release.dialect();
        let lines = [
            to_mcore_args(version, "/m", "/o", &all),
            to_hf_args(version, "/c", "/o", &all),
            infer_args(version, "/m", "/p.jsonl", "/o/a.jsonl", "0", "2048"),
            eval_args(version, "/m", "Native", &strings(&["gsm8k", "arc_c"]), "/o", Some("200")),
        ];
        for argv in lines {
            let command = argv[..2].join(" ");
            let flags = release.table().command(&command).unwrap_or_else(|| panic!("{release}: no {command}"));
            let mut index = 2;
            while index < argv.len() {
                let name = argv[index].strip_prefix("--").unwrap_or_else(|| panic!("{argv:?}"));
                index += 1;
                let mut values = Vec::new();
                while index < argv.len() && !argv[index].starts_with("--") {
                    values.push(argv[index].clone());
                    index += 1;
                }
                let Lookup::Exact(flag) = flags.lookup(name) else {
                    panic!("ms-swift {release} {command}: no --{name}")
                };
                let value =
                    if values.len() == 1 { FlagValue::Scalar(values.remove(0)) } else { FlagValue::List(values) };
                flag.check_value(&value).unwrap_or_else(|e| panic!("ms-swift {release} {command}: {e}"));
            }
        }
    }
}

#[test]
fn a_checkpoint_reference_to_a_stage_that_saves_no_megatron_weights_is_refused() {
    let text = PIPELINE_V4.replace("      max_length: 2048\n", "      max_length: 2048\n      no_save_optim: true\n");
    let found = problems(&text);
    assert!(
        found.iter().any(|f| f.contains("stages[0].megatron: no_save_optim with save_safetensors")
            && f.contains("`${stages.sft.checkpoint}` would find none")),
        "{found:?}"
    );
    // With save_safetensors false the Megatron checkpoint keeps the model.
    let kept =
        text.replace("      no_save_optim: true\n", "      no_save_optim: true\n      save_safetensors: false\n");
    pipeline(&kept);
}

#[test]
fn a_megatron_stage_is_checked_like_a_megatron_job() {
    let text = r#"name: p
kind: pipeline
output_dir: /o
model: /m
stages:
  - name: sft
    kind: megatron-sft
    nodes: 1
    gpus_per_node: 2
    megatron:
      load: /m-mcore
      micro_batch_size: 2
      global_batch_size: 5
"#;
    let found = problems(text);
    assert!(
        found.iter().any(|f| f.starts_with("10:stages[0].megatron.global_batch_size: ") && f.contains("divisible")),
        "{found:?}"
    );
    let missing = problems("name: p\nkind: pipeline\nstages:\n  - {name: a, kind: command, command: [x]}\n");
    assert!(missing.iter().any(|f| f.starts_with(":output_dir: is required")), "{missing:?}");
    let misplaced = problems(
        "name: p\nkind: pipeline\noutput_dir: /o\nnodes: 2\nstages:\n  - {name: a, kind: command, command: [x]}\n",
    );
    assert!(misplaced.iter().any(|f| f.starts_with("4:nodes: does not apply to kind pipeline")), "{misplaced:?}");
}

#[test]
fn report_from_recorded_answers_shows_both_answers_lengths_and_the_change() {
    let before = read_answers(include_str!("fixtures/pipeline/answers-before.jsonl"), "before.jsonl").unwrap();
    let after = read_answers(include_str!("fixtures/pipeline/answers-after.jsonl"), "after.jsonl").unwrap();
    assert_eq!(before.len(), 5);
    let pairs = pair(&before, &after);
    assert_eq!(pairs.len(), 5);
    // The after file lists prompts 3 and 4 the other way round: pairing is by prompt.
    assert_eq!(pairs[2].prompt, "Give me three tips for writing a cover letter.");
    assert_eq!(pairs[2].after.as_deref(), Some("Tailor it, lead with results, keep it short."));
    let text = summary(&pairs);
    assert!(text.starts_with("Answers got 9"), "{text}");
    assert!(text.contains("answers with lists 40% → 0%"), "{text}");
    assert!(text.ends_with("the model became terse."), "{text}");

    let read = |part: &str| {
        let dir = format!(
            "{}/tests/fixtures/pipeline/eval-{part}/20261128_101500/reports/Qwen3-8B",
            env!("CARGO_MANIFEST_DIR")
        );
        let files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                (path.display().to_string(), std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        read_scores(&files)
    };
    let rows = score_rows(&read("before"), &read("after"));
    assert_eq!(
        rows,
        [("arc_c".to_string(), Some(0.9031), Some(0.9104)), ("gsm8k".to_string(), Some(0.8512), Some(0.7815))]
    );

    let report = Report {
        title: "qwen3-8b-ft-7".into(),
        comparisons: vec![("answers".into(), pairs)],
        scores: vec![("bench".into(), rows)],
    };
    let md = report.markdown();
    assert!(md.contains("| gsm8k | 0.8512 | 0.7815 | -0.0697 |"), "{md}");
    assert!(md.contains("| arc_c | 0.9031 | 0.9104 | +0.0073 |"), "{md}");
    assert!(md.contains("| 5 | What is the capital of Australia? | The capital of Australia is Canberra."), "{md}");
    assert!(md.contains("| Canberra. | 29 → 1 |"), "{md}");
    assert!(md.contains("| mean words |"), "{md}");
    let html = report.html();
    assert!(html.contains("<td class=\"num down\">-0.0697</td>"), "{html}");
    assert!(html.contains("`items[::-1]`"), "code kept as text");
    assert!(!html.contains("<script"), "self-contained, no scripts");

    let bad = read_answers(
        "{\"response\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\nnot json\n",
        "r.jsonl",
    );
    assert!(bad.unwrap_err().to_string().starts_with("r.jsonl:2: not JSON"));
}
