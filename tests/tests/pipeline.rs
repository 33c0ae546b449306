//! Pipeline jobs on a real controller and two real agents on loopback: stages
//! run in dependency order as gang launches of their own, outputs feed later
//! stages, a failing stage stops the pipeline, the conversion cache skips a
//! second conversion, and the report comes from the infer and eval runs.
//! The built-in ms-swift steps run `tests/payloads/fake-swift/swift` (ms-swift
//! and GPUs are not available here): it checks the flags Cohort renders and
//! writes what the real command writes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_proto::{Job, JobState, StageState};
use cohort_tests::{Cluster, NodeSpec, repo_root, state};

const WITHIN: Duration = Duration::from_secs(90);

fn two_nodes() -> Vec<NodeSpec> {
    (0..2).map(|i| NodeSpec::loopback(i, 2)).collect()
}

fn stage<'a>(job: &'a Job, name: &str) -> &'a cohort_proto::PipelineStage {
    job.stages.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no stage {name} in {job:?}"))
}

fn stage_state(job: &Job, name: &str) -> StageState {
    StageState::try_from(stage(job, name).state).unwrap()
}

fn chain(out: &Path, fail_middle: bool) -> String {
    let exit = if fail_middle { "; exit 3" } else { "" };
    format!(
        r#"
name: chain
kind: pipeline
output_dir: {out}
stages:
  - name: produce
    kind: command
    nodes: 2
    command: [sh, -c, 'mkdir -p ${{output}} && echo "rank $NODE_RANK of $NNODES on $COHORT_NODE_NAME" > ${{output}}/part-$NODE_RANK']
  - name: combine
    kind: command
    command: [sh, -c, 'mkdir -p ${{output}} && cat ${{stages.produce.output}}/part-* > ${{output}}/all{exit}']
  - name: check
    kind: command
    depends_on: [combine]
    command: [sh, -c, 'test "$(wc -l < ${{stages.combine.output}}/all)" -eq 2 && echo checked']
"#,
        out = out.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn command_stages_across_two_nodes_feed_each_other() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let out = cluster.dir.path().join("out");
    let job = cluster.submit(&chain(&out, false)).await.unwrap();
    assert_eq!(job.kind, "pipeline");
    let job = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:#?}");
    for name in ["produce", "combine", "check"] {
        assert_eq!(stage_state(&job, name), StageState::Succeeded, "{name}");
        assert!(stage(&job, name).finished_unix_ms >= stage(&job, name).started_unix_ms);
    }
    // Dependency order: each stage started after the one it depends on ended.
    assert!(stage(&job, "combine").started_unix_ms >= stage(&job, "produce").finished_unix_ms);
    assert!(stage(&job, "check").started_unix_ms >= stage(&job, "combine").finished_unix_ms);

    let produce = cluster.job(&format!("{}.produce", job.id)).await.unwrap();
    assert_eq!(produce.pipeline_id, job.id);
    let nodes: Vec<&str> = produce.plan.as_ref().unwrap().nodes.iter().map(|n| n.node_name.as_str()).collect();
    assert_eq!(nodes, ["node0", "node1"], "a two-node gang");
    let all = std::fs::read_to_string(out.join(&job.id).join("combine/all")).unwrap();
    assert_eq!(all, "rank 0 of 2 on node0\nrank 1 of 2 on node1\n");
    let logs = cluster.cli(&["logs", &format!("{}.check", job.id)]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("checked"));

    let status = cluster.cli(&["status", &job.id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.contains("stages:"), "{text}");
    let line = |name: &str| text.lines().find(|l| l.contains(name)).unwrap_or_default().to_string();
    assert!(line("└─ combine").contains("Succeeded"), "{text}");
    assert!(line("└─ check").contains(&format!("{}.check", job.id)), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_middle_stage_stops_the_pipeline() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let out = cluster.dir.path().join("out");
    let job = cluster.submit(&chain(&out, true)).await.unwrap();
    let job = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&job), JobState::Failed, "{job:#?}");
    assert!(job.reason.starts_with("stage combine failed:"), "{}", job.reason);
    assert!(job.reason.contains("code 3"), "{}", job.reason);
    assert_eq!(stage_state(&job, "produce"), StageState::Succeeded);
    assert_eq!(stage_state(&job, "combine"), StageState::Failed);
    assert_eq!(stage_state(&job, "check"), StageState::Skipped);
    assert!(stage(&job, "check").runs.is_empty());
    assert!(cluster.job(&format!("{}.check", job.id)).await.is_err(), "the stage after the failure never ran");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.lines().any(|l| l.contains("check") && l.contains("Skipped")), "{status}");

    // Deleting the pipeline deletes its stages' runs with it.
    let deleted = cluster.cli(&["delete", &job.id]);
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    for run in ["produce", "combine"] {
        assert!(cluster.job(&format!("{}.{run}", job.id)).await.is_err(), "{run} was left behind");
    }
    assert!(cluster.job(&job.id).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_pipeline_stops_its_running_stage() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let out = cluster.dir.path().join("out");
    let yaml = format!(
        "name: slow\nkind: pipeline\noutput_dir: {}\nstages:\n  - {{name: wait, kind: command, nodes: 2, command: [sleep, '600']}}\n  - {{name: after, kind: command, depends_on: [wait], command: ['true']}}\n",
        out.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let run = format!("{}.wait", job.id);
    cluster.wait_job(&run, WITHIN, |j| state(j) == JobState::Running).await.unwrap();
    let cancel = cluster.cli(&["cancel", &job.id]);
    assert!(cancel.status.success());
    let run = cluster.wait_finished(&run, WITHIN).await.unwrap();
    assert_eq!(state(&run), JobState::Cancelled, "{run:#?}");
    let job = cluster.wait_job(&job.id, WITHIN, |j| stage_state(j, "wait") != StageState::Running).await.unwrap();
    assert_eq!(state(&job), JobState::Cancelled);
    assert_eq!(stage_state(&job, "after"), StageState::Skipped);
}

/// A Hugging Face model directory for the fake converter.
fn model_dir(root: &Path, weights: &str) -> std::path::PathBuf {
    let dir = root.join("models/Qwen3-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"num_hidden_layers": 4}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    dir
}

fn fake_swift_env(log: &Path) -> String {
    let payloads = repo_root().join("tests/payloads");
    format!(
        "env:\n  PATH: {}:/usr/local/bin:/usr/bin:/bin\n  FAKE_SWIFT_LOG: {}\n  FAKE_SWIFT_RECORDED: {}\n",
        payloads.join("fake-swift").display(),
        log.display(),
        payloads.join("pipeline").display()
    )
}

fn swift_calls(log: &Path, sub: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"cmd\": \"{sub}\"")))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_conversion_cache_skips_a_second_conversion_of_the_same_model_and_layout() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let root = cluster.dir.path().to_path_buf();
    let model = model_dir(&root, "weights-1");
    let log = root.join("swift.log");
    let yaml = |tp: u32| {
        format!(
            "name: conv\nkind: pipeline\nswift_version: 4\nmodel: {}\noutput_dir: {}\nconversion_cache: {}\n{}stages:\n  - {{name: convert, kind: to_mcore, tensor_model_parallel_size: {tp}}}\n  - {{name: use, kind: command, command: [test, -f, '${{stages.convert.output}}/latest_checkpointed_iteration.txt']}}\n",
            model.display(),
            root.join("out").display(),
            root.join("cache").display(),
            fake_swift_env(&log)
        )
    };
    // Miss: converted, then recorded.
    let first = cluster.submit(&yaml(2)).await.unwrap();
    let first = cluster.wait_finished(&first.id, WITHIN).await.unwrap();
    assert_eq!(state(&first), JobState::Succeeded, "{first:#?}");
    assert_eq!(stage_state(&first, "convert"), StageState::Succeeded);
    assert_eq!(swift_calls(&log, "export"), 1);
    let key = stage(&first, "convert").cache_key.clone();
    assert_eq!(stage(&first, "convert").output, root.join("cache").join(&key).display().to_string());
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.contains("\"cuda\": \"0\""), "one GPU: {calls}");

    let ls = cluster.cli(&["cache", "ls"]);
    let listing = String::from_utf8_lossy(&ls.stdout).to_string();
    let row = listing.lines().find(|l| l.trim_start().starts_with(&key)).unwrap_or_else(|| panic!("{listing}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[1..6],
        [model.display().to_string().as_str(), "2", "1", "4.x", &stage(&first, "convert").output]
    );

    // Hit: same model, same layout: no conversion, the stage shows Cached.
    let second = cluster.submit(&yaml(2)).await.unwrap();
    let second = cluster.wait_finished(&second.id, WITHIN).await.unwrap();
    assert_eq!(state(&second), JobState::Succeeded, "{second:#?}");
    assert_eq!(stage_state(&second, "convert"), StageState::Cached);
    assert_eq!(stage(&second, "convert").cache_key, key);
    assert!(stage(&second, "convert").runs.is_empty());
    assert_eq!(swift_calls(&log, "export"), 1, "the second job converted nothing");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &second.id]).stdout).to_string();
    assert!(status.lines().any(|l| l.trim_start().starts_with("convert") && l.contains("Cached")), "{status}");

    // Another layout is another key: converted again.
    let third = cluster.submit(&yaml(1)).await.unwrap();
    let third = cluster.wait_finished(&third.id, WITHIN).await.unwrap();
    assert_eq!(stage_state(&third, "convert"), StageState::Succeeded);
    assert_ne!(stage(&third, "convert").cache_key, key);
    assert_eq!(swift_calls(&log, "export"), 2);

    // Changed weights are another model: converted again.
    model_dir(&root, "weights-2");
    let fourth = cluster.submit(&yaml(2)).await.unwrap();
    let fourth = cluster.wait_finished(&fourth.id, WITHIN).await.unwrap();
    assert_eq!(stage_state(&fourth, "convert"), StageState::Succeeded);
    assert_ne!(stage(&fourth, "convert").cache_key, key);
    assert_eq!(swift_calls(&log, "export"), 3);

    // Pruned: the entry and its directory are gone.
    let rm = cluster.cli(&["cache", "rm", &key[..8]]);
    assert!(rm.status.success(), "{}", String::from_utf8_lossy(&rm.stderr));
    assert!(!root.join("cache").join(&key).exists());
    let listing = String::from_utf8_lossy(&cluster.cli(&["cache", "ls"]).stdout).to_string();
    assert!(!listing.contains(&key), "{listing}");
    let missing = cluster.cli(&["cache", "rm", "nosuchkey"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no cache entry"));
}

#[tokio::test(flavor = "multi_thread")]
async fn convert_train_export_compare_evaluate_and_report() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let root = cluster.dir.path().to_path_buf();
    let model = model_dir(&root, "weights");
    let log = root.join("swift.log");
    let prompts = repo_root().join("tests/payloads/pipeline/prompts.jsonl");
    let yaml = format!(
        r#"name: flow
kind: pipeline
swift_version: 3
model: {model}
output_dir: {out}
conversion_cache: {cache}
{env}stages:
  - name: convert
    kind: to_mcore
  - name: train
    kind: command
    nodes: 2
    gpus_per_node: 1
    command: [sh, -c, 'test -f ${{stages.convert.output}}/latest_checkpointed_iteration.txt && {{ test "$NODE_RANK" != 0 || {{ mkdir -p ${{output}} && cp -r ${{stages.convert.output}}/. ${{output}}/; }}; }}']
  - name: export
    kind: to_hf
    model: ${{stages.train.output}}
  - name: answers
    kind: infer
    prompts: {prompts}
    after: ${{stages.export.output}}
  - name: bench
    kind: eval
    benchmarks: [gsm8k, arc_c]
    after: ${{stages.export.output}}
"#,
        model = model.display(),
        out = root.join("out").display(),
        cache = root.join("cache").display(),
        env = fake_swift_env(&log),
        prompts = prompts.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:#?}");
    assert!(job.report_ready);
    assert_eq!(
        stage(&job, "answers").runs,
        [format!("{}.answers.before", job.id), format!("{}.answers.after", job.id)]
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    let infer_models: Vec<String> = calls
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["cmd"] == "infer")
        .map(|v| v["args"]["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(infer_models.len(), 2);
    assert!(infer_models.contains(&model.display().to_string()), "before: the base model");
    assert!(infer_models.contains(&stage(&job, "export").output), "after: the exported model");

    let dir = root.join("report");
    let report = cluster.cli(&["report", &job.id, "--dir", dir.to_str().unwrap()]);
    assert!(report.status.success(), "{}", String::from_utf8_lossy(&report.stderr));
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(md.contains("| gsm8k | 0.8512 | 0.7815 | -0.0697 |"), "{md}");
    assert!(md.contains("the model became terse."), "{md}");
    assert!(md.contains("| 5 | What is the capital of Australia? |"), "{md}");
    assert!(html.contains("Canberra.") && html.starts_with("<!doctype html>"));
    assert_eq!(String::from_utf8_lossy(&report.stdout).trim(), md.trim());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_conversion_writes_over_its_half_written_output() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let root = cluster.dir.path().to_path_buf();
    let model = model_dir(&root, "weights");
    let log = root.join("swift.log");
    let failed_once = root.join("failed-once");
    let yaml = format!(
        "name: retry\nkind: pipeline\nswift_version: 4\nmodel: {}\noutput_dir: {}\nrestart: {{max_restarts: 1, backoff: 100ms, on: [rank_failed, user_error]}}\n{}  FAKE_SWIFT_FAIL_ONCE: {}\nstages:\n  - {{name: convert, kind: to_mcore}}\n  - {{name: export, kind: to_hf, model: '${{stages.convert.output}}'}}\n",
        model.display(),
        root.join("out").display(),
        fake_swift_env(&log),
        failed_once.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:#?}");
    assert!(failed_once.exists(), "the first conversion failed after writing part of its output");
    let convert = cluster.job(&format!("{}.convert", job.id)).await.unwrap();
    assert_eq!(convert.attempts.len(), 2, "{convert:#?}");
    assert_eq!(swift_calls(&log, "export"), 3, "convert twice, export once");
    let output = Path::new(&stage(&job, "convert").output);
    assert!(output.join("latest_checkpointed_iteration.txt").is_file());
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_of_a_pipeline_shows_each_stage_command_with_earlier_outputs_as_placeholders() {
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let out = cluster.cli(&["plan", "examples/jobs/qwen3-8b-pipeline.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let command_of = |stage: &str| -> Vec<String> {
        let start = stdout.find(&format!("stage {stage} (")).unwrap_or_else(|| panic!("no stage {stage}: {stdout}"));
        stdout[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("stage "))
            .filter_map(|l| l.trim().strip_prefix("command: "))
            // Shell quoting aside (no argument here holds a quote).
            .map(|c| c.replace('\'', ""))
            .collect()
    };
    assert_eq!(
        command_of("convert"),
        [
            "swift export --model /mnt/shared/models/Qwen3-8B --to_mcore true --output_dir /mnt/shared/cohort-conversions/<cache key> --exist_ok true"
        ]
    );
    let [sft] = &command_of("sft")[..] else { panic!("{stdout}") };
    assert!(sft.starts_with("megatron sft --load <stage convert: output> "), "{sft}");
    assert!(sft.contains("--save /mnt/shared/runs/<job id>/sft"), "{sft}");
    assert_eq!(
        command_of("export"),
        [
            "swift export --mcore_model <stage sft: checkpoint> --to_hf true --output_dir /mnt/shared/runs/<job id>/export --exist_ok true"
        ]
    );
    let answers = command_of("answers");
    assert_eq!(answers.len(), 2, "before and after: {stdout}");
    assert!(answers[0].starts_with("swift infer --model /mnt/shared/models/Qwen3-8B "), "{answers:?}");
    assert!(answers[1].starts_with("swift infer --model <stage export: output> "), "{answers:?}");
    assert!(stdout.contains("stage sft (megatron-sft, after convert)"), "{stdout}");
    assert!(stdout.contains("2 node(s) × 2 GPU(s)") && stdout.contains("NPROC_PER_NODE=2"), "{stdout}");
    assert!(stdout.contains("MEGATRON_LM_PATH=/root/Megatron-LM"), "the job's env: {stdout}");

    // The 4.x example: no conversions, infer on the checkpoint.
    let v4 = cluster.cli(&["plan", "examples/jobs/qwen3-8b-pipeline-v4.yaml"]);
    let text = String::from_utf8_lossy(&v4.stdout).to_string();
    assert_eq!(v4.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&v4.stderr));
    assert!(text.contains("command: megatron sft --model /mnt/shared/models/Qwen3-8B "), "{text}");
    assert!(text.contains("command: swift infer --model '<stage sft: checkpoint>' "), "{text}");

    // An invalid pipeline: every problem, and a non-zero exit.
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nkind: pipeline\noutput_dir: /o\nstages:\n  - {name: a, kind: to_hf}\n  - {name: b, kind: infer, after: /m}\n",
    )
    .unwrap();
    let out = cluster.cli(&["plan", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("stages[0].model: is required for a to_hf stage"), "{stderr}");
    assert!(stderr.contains("stages[1].prompts: is required for a infer stage"), "{stderr}");
}
