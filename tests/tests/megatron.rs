//! First-class ms-swift/Megatron runs against real controller and agent
//! processes: metrics from the last rank, preflight refusal with the table,
//! shared paths that are not shared, dataset checks, staging, and
//! checkpoint-aware resume. The Python stack is faked with stub packages
//! (tests/payloads/fake-python); `megatron sft` with tests/payloads/fake_megatron.py.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, processes_of_job, repo_root, state};

fn fake_python(kind: &str) -> String {
    repo_root().join("tests/payloads/fake-python").join(kind).display().to_string()
}

/// Two nodes whose agents probe the given fake Python stacks.
async fn cluster(pythons: [&str; 2]) -> Cluster {
    let nodes = pythons
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut node = NodeSpec::loopback(i, 1);
            node.extra_args = vec!["--python".into(), fake_python(kind)];
            node
        })
        .collect();
    Cluster::start(nodes).await.unwrap()
}

/// A 2-node megatron-sft job (ms-swift 3.x) run by the fake megatron.
fn megatron_job(save: &Path, dataset: &Path, extra: &str) -> String {
    format!(
        "
name: sft
kind: megatron-sft
nodes: 2
gpus_per_node: 1
workdir: tests/payloads
stop_grace: 2s
{extra}
megatron:
  swift_version: 3
  program: [python3, fake_megatron.py]
  load: Qwen3-8B-mcore
  dataset: [{dataset}]
  micro_batch_size: 1
  global_batch_size: 2
  finetune: true
  save: {save}
  save_interval: 2
",
        save = save.display(),
        dataset = dataset.display()
    )
}

fn good_dataset(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("train.jsonl");
    std::fs::copy(repo_root().join("shared/tests/fixtures/datasets/messages-good.jsonl"), &path).unwrap();
    path
}

/// The job got past preflight and its processes ran.
fn assert_launched(cluster: &Cluster, job: &cohort_proto::Job) {
    assert!(!job.reason.contains("refused before launch"), "{}", job.reason);
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).to_string();
    assert!(logs.contains("fake megatron argv:"), "{}: {logs}", job.reason);
}

async fn wait_for_preflight(cluster: &Cluster) {
    // The agents probe their python at start-up; doctor shows it once reported.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.cli(&["doctor", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("no report yet") && text.contains("\"checks\"") && text.matches("\"node_name\"").count() >= 2
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no preflight reports: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_from_the_last_rank_arrive_in_order() {
    let cluster = cluster(["good", "good"]).await;
    let job = cluster
        .submit("name: m\nkind: command\nnodes: 2\ngpus_per_node: 1\nworkdir: tests/payloads\ncommand: [python3, swift4_metrics.py, '20']\n")
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded);

    let out = cluster.cli(&["metrics", &job.id, "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = doc["points"].as_array().unwrap();
    let iterations: Vec<u64> = points.iter().map(|p| p["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iterations, [1, 5, 10, 15, 20]);
    assert!(points.iter().all(|p| p["node_name"] == "node1" && p["format"] == "ms-swift-4"), "{points:?}");
    assert_eq!(points[1]["loss"].as_f64(), Some(0.4));

    let table = String::from_utf8_lossy(&cluster.cli(&["metrics", &job.id]).stdout).to_string();
    assert!(table.contains("20/20") && table.contains("0.100000"), "{table}");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.contains("progress:  iteration 20/20 (100%), loss 0.1000"), "{status}");

    let png = cluster.dir.path().join("loss.png");
    let out = cluster.cli(&["plot", &job.id, "--out", png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_transformer_engine_refuses_the_launch_with_the_table() {
    let cluster = cluster(["good", "broken"]).await;
    wait_for_preflight(&cluster).await;
    let doctor = cluster.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "doctor exits 1 when nodes disagree: {text}");
    assert!(text.contains("! transformer_engine.pytorch"), "{text}");

    let save = cluster.dir.path().join("out");
    // `cohort plan` already knows from the start-up probes: exit 4, naming the node.
    let file = cluster.dir.path().join("sft.yaml");
    std::fs::write(&file, megatron_job(&save, &good_dataset(cluster.dir.path()), "")).unwrap();
    let plan = cluster.cli(&["plan", file.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&plan.stderr);
    assert_eq!(plan.status.code(), Some(4), "{said}");
    assert!(said.contains("node node1: transformer_engine.pytorch") && !said.contains("node node0"), "{said}");
    let job = cluster.submit(&megatron_job(&save, &good_dataset(cluster.dir.path()), "")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(
        job.reason.contains(
            "node1: transformer_engine.pytorch: AttributeError: module 'transformer_engine' has no attribute 'pytorch'"
        ),
        "{}",
        job.reason
    );
    assert!(job.processes.is_empty(), "nothing was launched: {:?}", job.processes);
    let table = job.preflight.as_ref().unwrap();
    assert_eq!(table.nodes.len(), 2);
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.contains("preflight:") && status.contains("2.11.0+stub") && status.contains("✗"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flag_the_nodes_own_ms_swift_refuses_refuses_the_launch_naming_node_and_version() {
    let cluster = cluster(["good", "good"]).await;
    let save = cluster.dir.path().join("out");
    // The stand-in parser (tests/payloads/fake-python/argcheck.py) refuses --num_workers as ms-swift 4.6 does.
    let yaml = format!("{}  num_workers: 4\n", megatron_job(&save, &good_dataset(cluster.dir.path()), ""));
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
    let refusal = "(ms-swift 3.12.6+stub) refuses --num_workers: not a flag of ms-swift 3.12.6+stub's megatron sft \
                   (did you mean --dataloader_num_workers?)";
    assert!(job.reason.contains("refused before launch: node node") && job.reason.contains(refusal), "{}", job.reason);
    let problems = &job.preflight.as_ref().unwrap().problems;
    for node in ["node0", "node1"] {
        assert!(problems.contains(&format!("node {node} {refusal}")), "{problems:?}");
    }
    assert!(job.processes.is_empty(), "nothing was launched: {:?}", job.processes);
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.contains("! ms-swift argv") && status.contains("refuses --num_workers"), "{status}");

    // The same job without the flag: every node's ms-swift takes it, and it runs
    // (the fake megatron's fresh run fails after its checkpoints, by design).
    let job = cluster.submit(&megatron_job(&save, &good_dataset(cluster.dir.path()), "")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_launched(&cluster, &job);
    let checked = job.preflight.as_ref().unwrap().nodes.iter().filter_map(|r| r.swift_argcheck.as_ref());
    let versions: Vec<&str> = checked.map(|c| if c.ok { c.ms_swift.as_str() } else { "refused" }).collect();
    assert_eq!(versions, ["3.12.6+stub", "3.12.6+stub"]);

    // A command job that runs an ms-swift CLI (as the built-in pipeline steps do) is checked too.
    let yaml = format!(
        "name: infer\nkind: command\nnodes: 1\ngpus_per_node: 1\npython: {}\n\
         command: [swift, infer, --model, m, --num_workers, '4']\n",
        fake_python("good")
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
    assert!(
        job.reason
            .contains("(ms-swift 3.12.6+stub) refuses --num_workers: not a flag of ms-swift 3.12.6+stub's swift infer"),
        "{}",
        job.reason
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_job_on_transformer_engine_layers_needs_transformer_engine() {
    // Both nodes' transformer_engine is broken the same way: nothing disagrees.
    let cluster = cluster(["broken", "broken"]).await;
    let save = cluster.dir.path().join("out");
    let dataset = good_dataset(cluster.dir.path());
    let local = format!("{}  transformer_impl: local\n", megatron_job(&save, &dataset, ""));
    let job = cluster.submit(&local).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    // transformer_impl: local needs no transformer_engine.
    assert_launched(&cluster, &job);

    let job = cluster.submit(&megatron_job(&cluster.dir.path().join("out2"), &dataset, "")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(job.reason.contains("transformer_engine.pytorch: AttributeError"), "{}", job.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_check_asks_each_environments_ms_swift_without_launching() {
    let cluster = cluster(["good", "good"]).await;
    wait_for_preflight(&cluster).await;
    let save = cluster.dir.path().join("out");
    let dataset = good_dataset(cluster.dir.path());
    let refused = cluster.dir.path().join("refused.yaml");
    std::fs::write(&refused, format!("{}  num_workers: 4\n", megatron_job(&save, &dataset, ""))).unwrap();
    let out = cluster.cli(&["plan", "--check", refused.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(4), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // Both nodes report the same versions: one environment, asked once.
    assert_eq!(text.matches("  environment: ").count(), 1, "{text}");
    assert!(text.contains("    nodes: node0, node1"), "{text}");
    assert!(
        text.contains(
            "node node0 (ms-swift 3.12.6+stub) refuses --num_workers: not a flag of ms-swift 3.12.6+stub's megatron sft \
             (did you mean --dataloader_num_workers?)"
        ),
        "{text}"
    );

    let accepted = cluster.dir.path().join("accepted.yaml");
    std::fs::write(&accepted, megatron_job(&save, &dataset, "")).unwrap();
    let out = cluster.cli(&["plan", "--check", accepted.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node0 (ms-swift 3.12.6+stub): megatron-sft ok"), "{text}");
    assert!(!text.contains("exit_signal_handler"), "no preemption signal, no save on it: {text}");

    // Preempted with SIGTERM, an ms-swift 3 job saves on it: the plan shows what the attempt runs.
    let saving = cluster.dir.path().join("saving.yaml");
    std::fs::write(&saving, megatron_job(&save, &dataset, "preempt: {signal: SIGTERM, grace: 60s}")).unwrap();
    let out = cluster.cli(&["plan", saving.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(r#"--megatron_extra_kwargs '{"exit_signal_handler":true}'"#), "{text}");
    // Planning launched nothing.
    let jobs = String::from_utf8_lossy(&cluster.cli(&["list", "-o", "json"]).stdout).to_string();
    assert!(!jobs.contains("\"id\""), "{jobs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_path_that_is_local_on_one_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("not-shared");
    std::fs::create_dir_all(&local).unwrap();
    let mut nodes: Vec<NodeSpec> = (0..2).map(|i| NodeSpec::loopback(i, 1)).collect();
    // node1 sees its own empty tmpfs at that path: a node-local directory.
    nodes[1].wrapper = vec![
        "unshare".into(),
        "-m".into(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        format!("mount -t tmpfs tmpfs {} && exec \"$0\" \"$@\"", local.display()),
    ];
    let cluster = Cluster::start(nodes).await.unwrap();
    let yaml = format!(
        "name: shared\nkind: command\nnodes: 2\ngpus_per_node: 1\nshared_paths: [{}]\ncommand: ['true']\n",
        local.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    let want =
        format!("shared path {} is not shared: node node1 cannot see the marker node node0 wrote", local.display());
    assert!(job.reason.contains(&want), "{}", job.reason);

    // A path that really is shared passes, and the job runs.
    let shared = dir.path().join("shared");
    let yaml = format!(
        "name: shared-ok\nkind: command\nnodes: 2\ngpus_per_node: 1\nshared_paths: [{}]\ncommand: ['true']\n",
        shared.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_dataset_rows_refuse_the_launch_unless_the_policy_is_warn() {
    let cluster = cluster(["good", "good"]).await;
    let bad = cluster.dir.path().join("bad.jsonl");
    std::fs::copy(repo_root().join("shared/tests/fixtures/datasets/messages-bad.jsonl"), &bad).unwrap();
    let save = cluster.dir.path().join("out");
    let job = cluster.submit(&megatron_job(&save, &bad, "")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(
        job.reason.contains("7 bad row(s) of 8") && job.reason.contains("bad.jsonl:1: messages is an empty list"),
        "{}",
        job.reason
    );
    assert_eq!(job.datasets[0].bad_rows, 7);

    let job = cluster.submit(&megatron_job(&save, &bad, "dataset_policy: warn")).await.unwrap();
    let job = cluster
        .wait_job(&job.id, Duration::from_secs(60), |j| !j.processes.is_empty() || cohort_tests::is_terminal(j))
        .await
        .unwrap();
    assert!(!job.processes.is_empty(), "warn must launch: {}", job.reason);
    cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();

    let out = cluster.cli(&["dataset", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("bad.jsonl:7: row is in ShareGPT format"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_resumes_from_its_newest_complete_checkpoint() {
    let cluster = cluster(["good", "good"]).await;
    let save = cluster.dir.path().join("out");
    let job = cluster.submit(&megatron_job(&save, &good_dataset(cluster.dir.path()), "")).await.unwrap();
    let failed = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&failed), JobState::Failed, "{}", failed.reason);
    assert!(save.join("iter_0000006").exists() && save.join("iter_0000004/common.pt").exists());

    let out = cluster.cli(&["resume", &job.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&resumed), JobState::Succeeded, "{}", resumed.reason);
    assert_eq!(resumed.attempt, 2);
    let argv = &resumed.plan.as_ref().unwrap().argv;
    let load = argv.iter().position(|a| a == "--load").unwrap();
    assert_eq!(argv[load + 1], save.display().to_string(), "{argv:?}");
    let finetune = argv.iter().position(|a| a == "--finetune").unwrap();
    assert_eq!(argv[finetune + 1], "false");
    assert_eq!(resumed.attempts.len(), 2);
    assert_eq!(resumed.attempts[1].resumed_from.as_ref().unwrap().iteration, 4, "iteration 6 was half-written");
    assert_eq!(resumed.attempts[0].state, JobState::Failed as i32);
    // The tracker named the half-written iteration 6; it now names 4, the old one kept.
    assert_eq!(std::fs::read_to_string(save.join("latest_checkpointed_iteration.txt")).unwrap(), "4");
    assert_eq!(std::fs::read_to_string(save.join("latest_checkpointed_iteration.txt.cohort-bak")).unwrap(), "6");
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).to_string();
    assert!(logs.contains("at iteration 4"), "{logs}");

    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.contains("attempts:") && status.contains("iteration 4"), "{status}");
    let again = cluster.cli(&["resume", &job.id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("only a Failed or Cancelled job can be resumed"));
}

/// Issue 18, item 3: ms-swift's ModelScope route lists a hub id online even
/// when the node's cache holds the model (so a node without internet fails);
/// a `--model` naming a staged `model:` reaches each node's ms-swift as that
/// node's own copy in the ModelScope layout, a path that still ends in the id
/// (agent/tests/stage_hub.rs checks, with the real ms-swift, that such a path
/// resolves offline and is taken for the same model).
#[tokio::test(flavor = "multi_thread")]
async fn a_staged_models_id_reaches_ms_swift_as_each_nodes_own_copy() {
    let cluster = cluster(["good", "good"]).await;
    let model = cluster.dir.path().join("qwen3-8b");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), br#"{"model_type": "qwen3"}"#).unwrap();
    // A checkpoint to go on from, so that the fake trainer runs to its end on both nodes.
    let ckpt = cluster.dir.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("iter_0000002")).unwrap();
    std::fs::write(ckpt.join("iter_0000002/common.pt"), b"stub").unwrap();
    std::fs::write(ckpt.join("latest_checkpointed_iteration.txt"), b"2").unwrap();
    let stage = format!("stage: [{{model: Qwen/Qwen3-8B, source: {}}}]", model.display());
    let yaml = megatron_job(&cluster.dir.path().join("out"), &good_dataset(cluster.dir.path()), &stage)
        .replace("  load: Qwen3-8B-mcore\n", &format!("  load: {}\n  model: Qwen/Qwen3-8B\n", ckpt.display()))
        .replace("finetune: true", "finetune: false");
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).to_string();
    let mut passed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("fake megatron argv:"))
        .filter_map(|l| l.split("--model ").nth(1)?.split(' ').next())
        .collect();
    passed.sort_unstable();
    passed.dedup();
    assert_eq!(passed.len(), 2, "one copy per node: {logs}");
    for dir in passed {
        assert!(dir.ends_with("/hub/modelscope/models/Qwen/Qwen3-8B"), "{dir}");
        assert_eq!(std::fs::read(Path::new(dir).join("config.json")).unwrap(), br#"{"model_type": "qwen3"}"#);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_without_model_weights_is_not_resumed_from_and_resume_says_why() {
    let cluster = cluster(["good", "good"]).await;
    let save = cluster.dir.path().join("out");
    let yaml = megatron_job(&save, &good_dataset(cluster.dir.path()), "")
        .replace("  save_interval: 2\n", "  save_interval: 2\n  save_safetensors: true\n  no_save_optim: true\n");
    let job = cluster.submit(&yaml).await.unwrap();
    let failed = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&failed), JobState::Failed, "{}", failed.reason);
    assert!(save.join("iter_0000004/common.pt").exists() && !save.join("iter_0000004/.metadata").exists());

    let out = cluster.cli(&["resume", &job.id]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no complete checkpoint in"), "{stderr}");
    assert!(stderr.contains("iter_0000004: not resumable: it holds no model weights"), "{stderr}");
    assert!(stderr.contains("no_save_optim"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn staged_inputs_are_verified_cached_and_shared_by_jobs() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let input = cluster.dir.path().join("weights.bin");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &content).unwrap();
    let digest = sha256_hex(&content);
    let yaml = |name: &str, sha: &str| {
        format!(
            "name: {name}\nkind: command\nnodes: 2\ngpus_per_node: 1\n\
             stage: [{{name: weights, source: {}, sha256: {sha}}}]\n\
             command: [sh, -c, 'cmp \"$COHORT_STAGED_WEIGHTS\" {} && echo staged at $COHORT_STAGED_WEIGHTS']\n",
            input.display(),
            input.display()
        )
    };
    let job = cluster.submit(&yaml("stage-a", &digest)).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
    assert_eq!(job.staging.len(), 2, "{:?}", job.staging);
    assert!(
        job.staging.iter().all(|s| s.state == "ready" && s.bytes_done == content.len() as u64),
        "{:?}",
        job.staging
    );
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).to_string();
    assert!(logs.contains("staged at"), "{logs}");

    // The same content again: taken from each node's cache, not copied.
    let job = cluster.submit(&yaml("stage-b", &digest)).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
    assert!(job.staging.iter().all(|s| s.state == "cached"), "{:?}", job.staging);

    // A wrong digest refuses the launch and names both digests.
    let wrong = "0".repeat(64);
    let job = cluster.submit(&yaml("stage-c", &wrong)).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(job.reason.contains(&wrong) && job.reason.contains(&digest), "{}", job.reason);
    assert!(processes_of_job(&job.id).is_empty());
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_written_only_to_logging_jsonl_are_read_too() {
    let cluster = cluster(["good", "good"]).await;
    let out = cluster.dir.path().join("output");
    let yaml = format!(
        "
name: v4
kind: megatron-sft
nodes: 2
gpus_per_node: 1
workdir: tests/payloads
megatron:
  swift_version: 4
  program: [python3, jsonl_trainer.py]
  model: Qwen/Qwen3-8B
  dataset: [{}]
  micro_batch_size: 1
  global_batch_size: 2
  output_dir: {}
",
        good_dataset(cluster.dir.path()).display(),
        out.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
    let out = cluster.cli(&["metrics", &job.id, "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let iterations: Vec<u64> =
        doc["points"].as_array().unwrap().iter().map(|p| p["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iterations, [1, 5, 10], "from logging.jsonl, each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn ms_swift_3_eval_records_in_logging_jsonl_count_at_the_last_training_iteration() {
    let cluster = cluster(["good", "good"]).await;
    let out = cluster.dir.path().join("output");
    let yaml = format!(
        "
name: v3
kind: megatron-sft
nodes: 2
gpus_per_node: 1
workdir: tests/payloads
megatron:
  swift_version: 3
  program: [python3, jsonl_trainer.py]
  load: Qwen3-8B-mcore
  dataset: [{}]
  micro_batch_size: 1
  global_batch_size: 2
  save: {}
",
        good_dataset(cluster.dir.path()).display(),
        out.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);
    let out = cluster.cli(&["metrics", &job.id, "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points: Vec<(u64, bool)> = doc["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["iteration"].as_u64().unwrap(), p["is_eval"].as_bool().unwrap()))
        .collect();
    assert_eq!(points, [(1, false), (5, false), (5, true), (10, false)], "the eval record has no iteration of its own");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_policy_resumes_from_the_newest_complete_checkpoint_by_itself() {
    let cluster = cluster(["good", "good"]).await;
    let save = cluster.dir.path().join("out");
    let restart = "restart: {max_restarts: 1, backoff: 200ms}";
    let job = cluster.submit(&megatron_job(&save, &good_dataset(cluster.dir.path()), restart)).await.unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);
    let first = done.attempts[0].failure.as_ref().unwrap();
    assert_eq!(first.cause, "rank_failed", "{first:?}");
    assert!(first.detail.contains("illegal memory access"), "{first:?}");
    assert_eq!(done.attempts[1].resumed_from.as_ref().unwrap().iteration, 4, "iteration 6 was half-written");
    assert_ne!(done.attempts[0].master_port, done.attempts[1].master_port);
    let argv = &done.plan.as_ref().unwrap().argv;
    let finetune = argv.iter().position(|a| a == "--finetune").unwrap();
    assert_eq!(argv[finetune + 1], "false", "{argv:?}");
    assert_eq!(done.attempt, 2);
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).to_string();
    assert!(status.contains("rank_failed") && status.contains("iteration 4"), "{status}");
}
