#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};

use cohort_proto::{Checkpoint, EnvVar, GangPlan, ProcessSpec, StageStatus};
use cohort_shared::spec::JobSpec;

use super::test_support::node_at as node;
use super::*;

/// 8 GPUs in two NVLink islands (0-3, 4-7), minus `busy_or_unhealthy`.
fn two_islands(name: &str, busy_or_unhealthy: &[u32]) -> NodeView {
    let free: Vec<u32> = (0..8).filter(|g| !busy_or_unhealthy.contains(g)).collect();
    let mut n = node(name, "10.0.0.1", &free, 8);
    n.islands = (0..8).map(|g| (g, g / 4)).collect();
    n
}

fn spec(yaml: &str) -> JobSpec {
    JobSpec::from_yaml(yaml, "test.yaml").unwrap()
}

fn env_of(p: &ProcessSpec) -> BTreeMap<String, String> {
    p.env.iter().map(|v| (v.name.clone(), v.value.clone())).collect()
}

const QWEN: &str = include_str!("../../../shared/tests/fixtures/jobs/qwen3-8b-sft-2node.yaml");

#[test]
fn the_two_node_qwen3_job_renders_the_hand_written_command_and_env() {
    let spec = spec(QWEN);
    let mut n1 = node("gpu-a", "10.0.0.11", &[0, 1], 2);
    n1.node_env = vec![EnvVar { name: "MODELSCOPE_CACHE".into(), value: "/mnt/shared/modelscope".into() }];
    let nodes = [n1, node("gpu-b", "10.0.0.12", &[0, 1], 2)];
    let placement = place(&spec, &nodes, &[]).unwrap();
    let plan = render(
        &spec,
        &placement,
        &nodes,
        &RenderInput { job_id: "qwen3-8b-sft-1", attempt: 1, master_port: 29517, workdir: None },
    );

    let hand_written = "megatron sft --load Qwen3-8B-mcore --dataset /root/dataset/multi_round_output.jsonl \
        /root/dataset/output_messages.jsonl --split_dataset_ratio 0.01 --tensor_model_parallel_size 2 \
        --sequence_parallel true --micro_batch_size 2 --global_batch_size 16 --recompute_granularity full \
        --recompute_method uniform --recompute_num_layers 3 --finetune true --cross_entropy_loss_fusion true \
        --lr 1e-5 --lr_warmup_fraction 0.05 --min_lr 1e-6 --max_epochs 3 --save /mnt/shared/megatron_output/Qwen3-8B-sft \
        --save_interval 50 --max_length 2048 --add_version false --system 'You are a helpful assistant.' \
        --num_workers 4 --dataset_num_proc 4 --model_author swift --model_name swift-robot";
    let expected: Vec<String> = shell_words_split(hand_written);

    assert_eq!(plan.master_addr, "10.0.0.11");
    assert_eq!(plan.nodes.len(), 2);
    for (rank, assignment) in plan.nodes.iter().enumerate() {
        assert_eq!(assignment.node_rank, rank as u32);
        assert_eq!(assignment.processes.len(), 1, "megatron sft runs once per node (it wraps torchrun)");
        let p = &assignment.processes[0];
        assert_eq!(p.argv, expected);
        let env = env_of(p);
        assert_eq!(env["NNODES"], "2");
        assert_eq!(env["NODE_RANK"], rank.to_string());
        assert_eq!(env["NPROC_PER_NODE"], "2");
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["MASTER_ADDR"], "10.0.0.11");
        assert_eq!(env["MASTER_PORT"], "29517");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(env["PYTORCH_CUDA_ALLOC_CONF"], "expandable_segments:True");
        assert_eq!(env["MEGATRON_LM_PATH"], "/root/Megatron-LM");
        assert_eq!(env["COHORT_NODE_IPS"], "10.0.0.11,10.0.0.12");
        assert_eq!(env["COHORT_JOB_ID"], "qwen3-8b-sft-1");
        assert!(!env.contains_key("RANK"), "per-node launches leave RANK to torchrun");
    }
    assert_eq!(env_of(&plan.nodes[0].processes[0])["MODELSCOPE_CACHE"], "/mnt/shared/modelscope");
    assert!(!env_of(&plan.nodes[1].processes[0]).contains_key("MODELSCOPE_CACHE"));
}

/// Splits like a POSIX shell (quotes only), enough for the hand-written command.
fn shell_words_split(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut has = false;
    for c in text.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                has = true;
            }
            c if c.is_whitespace() && !quoted => {
                if has {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => {
                cur.push(c);
                has = true;
            }
        }
    }
    if has {
        out.push(cur);
    }
    out
}

#[test]
fn placement_is_all_or_nothing_and_explains_itself() {
    let spec = spec("name: big\nkind: command\nnodes: 3\ngpus_per_node: 2\ncommand: [x]\n");
    let mut lost = node("c", "10.0.0.3", &[0, 1], 2);
    lost.unavailable = Some("lost".into());
    let nodes = [node("a", "10.0.0.1", &[0, 1], 2), node("b", "10.0.0.2", &[1], 2), lost];
    let err = place(&spec, &nodes, &[]).unwrap_err();
    assert_eq!(err.found, 1);
    assert!(!err.never_fits, "the cluster has three 2-GPU nodes");
    let text = err.to_string();
    assert!(text.contains("b has 1 of 2 GPUs free") && text.contains("c is lost"), "{text}");

    let too_big = spec_nodes(4);
    assert!(place(&too_big, &nodes, &[]).unwrap_err().never_fits);
}

fn spec_nodes(n: u32) -> JobSpec {
    spec(&format!("name: x\nkind: command\nnodes: {n}\ngpus_per_node: 2\ncommand: [x]\n"))
}

#[test]
fn best_fit_keeps_whole_nodes_free_and_ranks_follow_names() {
    let spec = spec("name: small\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [x]\n");
    let nodes = [
        node("z-busy", "10.0.0.9", &[3], 4),
        node("a-idle", "10.0.0.1", &[0, 1, 2, 3], 4),
        node("m-half", "10.0.0.5", &[2, 3], 4),
    ];
    let placement = place(&spec, &nodes, &[]).unwrap();
    assert_eq!(placement.nodes, vec![("m-half".to_string(), vec![2]), ("z-busy".to_string(), vec![3])]);
}

#[test]
fn node_selector_filters_on_labels() {
    let spec = spec("name: s\nkind: command\nnodes: 1\ngpus_per_node: 1\nnode_selector: {gpu: h100}\ncommand: [x]\n");
    let mut h100 = node("b", "10.0.0.2", &[0], 1);
    h100.labels.insert("gpu".into(), "h100".into());
    let nodes = [node("a", "10.0.0.1", &[0], 1), h100];
    assert_eq!(place(&spec, &nodes, &[]).unwrap().nodes[0].0, "b");
    let err = place(&spec, &nodes[..1], &[]).unwrap_err().to_string();
    assert!(err.contains("a lacks label gpu=h100"), "{err}");
}

#[test]
fn per_rank_launch_renders_rank_and_local_rank() {
    let spec = spec("name: r\nkind: command\nnodes: 2\ngpus_per_node: 2\nlaunch: per-rank\ncommand: [python3, t.py]\n");
    let nodes = [node("a", "10.0.0.1", &[0, 1], 2), node("b", "10.0.0.2", &[0, 1], 2)];
    let placement = place(&spec, &nodes, &[]).unwrap();
    let plan = render(
        &spec,
        &placement,
        &nodes,
        &RenderInput { job_id: "r-1", attempt: 2, master_port: 29600, workdir: Some("/w") },
    );
    let ranks: Vec<(String, String, String)> = plan
        .nodes
        .iter()
        .flat_map(|n| n.processes.iter())
        .map(|p| {
            let env = env_of(p);
            (env["RANK"].clone(), env["LOCAL_RANK"].clone(), env["COHORT_ATTEMPT"].clone())
        })
        .collect();
    let want: Vec<(String, String, String)> = [("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")]
        .iter()
        .map(|(r, l)| (r.to_string(), l.to_string(), "2".to_string()))
        .collect();
    assert_eq!(ranks, want);
    assert_eq!(plan.nodes[1].processes[1].global_rank, Some(3));
    assert!(plan.nodes.iter().all(|n| n.workdir == "/w"));
}

#[test]
fn cpu_only_command_jobs_get_one_process_and_no_gpus() {
    let spec = spec("name: cpu\nkind: command\nnodes: 2\ncommand: [x]\n");
    let nodes = [node("a", "10.0.0.1", &[], 0), node("b", "10.0.0.2", &[], 0)];
    let placement = place(&spec, &nodes, &[]).unwrap();
    let plan = render(
        &spec,
        &placement,
        &nodes,
        &RenderInput { job_id: "cpu-1", attempt: 1, master_port: 29500, workdir: None },
    );
    let env = env_of(&plan.nodes[0].processes[0]);
    assert_eq!(env["NPROC_PER_NODE"], "1");
    assert_eq!(env["WORLD_SIZE"], "2");
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "");
}

#[test]
fn a_job_gets_gpus_from_one_nvlink_island_and_the_plan_says_so() {
    let four = spec("name: t\nkind: command\nnodes: 1\ngpus_per_node: 4\ncommand: [x]\n");
    // GPU 1 busy: island 0 has 3 free, island 1 all 4.
    let placement = place(&four, &[two_islands("n", &[1])], &[]).unwrap();
    assert_eq!(placement.nodes[0].1, vec![4, 5, 6, 7]);
    assert_eq!(placement.notes, vec!["n: GPUs 4,5,6,7 share NVLink island 1 (4 free there)".to_string()]);

    // Best fit: a 2-GPU job takes the island with fewer free GPUs, keeping island 1 whole.
    let two = spec("name: t\nkind: command\nnodes: 1\ngpus_per_node: 2\ncommand: [x]\n");
    let placement = place(&two, &[two_islands("n", &[1])], &[]).unwrap();
    assert_eq!(placement.nodes[0].1, vec![0, 2]);

    // GPU 5 unhealthy (never free) and GPU 1 busy: no island has 4, so the job spans two and the plan warns.
    let placement = place(&four, &[two_islands("n", &[1, 5])], &[]).unwrap();
    assert_eq!(placement.nodes[0].1.len(), 4);
    assert!(!placement.nodes[0].1.contains(&5) && !placement.nodes[0].1.contains(&1));
    assert!(placement.notes[0].contains("span 2 islands"), "{:?}", placement.notes);
}

#[test]
fn without_nvlink_there_is_nothing_to_explain() {
    let two = spec("name: t\nkind: command\nnodes: 1\ngpus_per_node: 2\ncommand: [x]\n");
    let mut n = node("n", "10.0.0.1", &[0, 1, 2], 3);
    n.islands = (0..3).map(|g| (g, g)).collect();
    let placement = place(&two, &[n], &[]).unwrap();
    assert_eq!(placement.nodes[0].1, vec![0, 1]);
    assert!(placement.notes.is_empty());
}

#[test]
fn the_recorded_layout_grows_linearly_and_each_node_renders_its_own_processes() {
    // A 1,024-node gang: rendering every node's env into the record (each env
    // names all 1,024 addresses) made it O(N^2), about 12 MB, over etcd's 2 MiB limit.
    let n = 1024u32;
    let spec = spec_nodes(n);
    let nodes: Vec<NodeView> =
        (0..n).map(|i| node(&format!("node-{i:04}"), &format!("10.1.{}.{}", i / 256, i % 256), &[0, 1], 2)).collect();
    let placement = place(&spec, &nodes, &[]).unwrap();
    let input = RenderInput { job_id: "x-1", attempt: 3, master_port: 29501, workdir: None };
    let plan = layout(&spec, &placement, &nodes, &input);
    assert!(plan.nodes.iter().all(|a| a.processes.is_empty()));
    let bytes = prost::Message::encoded_len(&plan);
    assert!(bytes < 64 * n as usize, "the layout of {n} nodes takes {bytes} bytes");

    let full = render(&spec, &placement, &nodes, &input);
    let rank = 700usize;
    let processes = node_processes(&spec, &plan, &plan.nodes[rank], &nodes[rank].node_env, &input);
    assert_eq!(processes, full.nodes[rank].processes);
    let env = env_of(&processes[0]);
    assert_eq!(env["NODE_RANK"], "700");
    assert_eq!(env["COHORT_NODE_NAME"], plan.nodes[rank].node_name);
    assert_eq!(env["MASTER_ADDR"], plan.nodes[0].address);
    assert_eq!(env["COHORT_NODE_IPS"].split(',').count(), n as usize);
    assert_eq!(env["COHORT_ATTEMPT"], "3");
}

/// Two nodes, each with its own MODELSCOPE_CACHE, laid out for `spec`.
fn laid_out(spec: &JobSpec) -> (Vec<NodeView>, GangPlan) {
    let mut nodes = vec![node("a", "10.0.0.1", &[0, 1], 2), node("b", "10.0.0.2", &[0, 1], 2)];
    for n in &mut nodes {
        n.node_env = vec![EnvVar { name: "MODELSCOPE_CACHE".into(), value: format!("/cache/{}", n.name) }];
    }
    let placement = place(spec, &nodes, &[]).unwrap();
    let input = RenderInput { job_id: "j-1", attempt: 1, master_port: 29500, workdir: spec.workdir.as_deref() };
    let plan = layout(spec, &placement, &nodes, &input);
    (nodes, plan)
}

/// The launch plan of `layout`, resuming from `resume_from`, with `staged`, and
/// prepare commands when `marker` is given.
fn plan_of(
    spec: &JobSpec,
    nodes: &[NodeView],
    layout: &GangPlan,
    resume_from: Option<&Checkpoint>,
    staged: &[StageStatus],
    marker: Option<&str>,
) -> LaunchPlan {
    let node_env: HashMap<&str, &[EnvVar]> = nodes.iter().map(|n| (n.name.as_str(), n.node_env.as_slice())).collect();
    let inputs = AttemptInputs {
        job_id: "j-1",
        attempt: 1,
        resume_from,
        staged,
        node_env: &node_env,
        prepare_marker: marker,
        sync: None,
    };
    launch_plan(spec, layout, &inputs)
}

const MARKER: Option<&str> = Some("j-1-1-00000000");

const MEGATRON_RELATIVE: &str = "name: m\nkind: megatron-sft\nnodes: 2\ngpus_per_node: 2\nworkdir: /w\nmegatron:\n  swift_version: 3\n  load: /models/m\n  dataset: [/d/a.jsonl]\n  save: out/run\n";

#[test]
fn the_output_dir_is_resolved_against_the_workdir_the_same_way_everywhere() {
    assert_eq!(output_dir(&spec(MEGATRON_RELATIVE)).as_deref(), Some("/w/out/run"));
    let absolute = MEGATRON_RELATIVE.replace("save: out/run", "save: /mnt/s/run");
    assert_eq!(output_dir(&spec(&absolute)).as_deref(), Some("/mnt/s/run"));
    let no_workdir = MEGATRON_RELATIVE.replace("workdir: /w\n", "");
    assert_eq!(output_dir(&spec(&no_workdir)), None, "a relative directory needs a workdir");
    assert_eq!(output_dir(&spec_nodes(2)), None, "a command job has none");

    let spec = spec(MEGATRON_RELATIVE);
    let (nodes, layout) = laid_out(&spec);
    let plan = plan_of(&spec, &nodes, &layout, None, &[], MARKER);
    let metrics: Vec<&str> = plan.nodes.iter().map(|n| n.launch.metrics_dir.as_str()).collect();
    assert_eq!(metrics, ["", "/w/out/run"], "only the last node rank reads ms-swift's metrics");
    for node in &plan.nodes {
        let prepare = node.prepare.as_ref().unwrap();
        assert_eq!(prepare.output_dir, "/w/out/run");
        // Rank 0's MODELSCOPE_CACHE, the output dir and the absolute model are proved shared.
        assert_eq!(prepare.shared_paths, ["/cache/a", "/models/m", "/w/out/run"]);
        assert_eq!(prepare.datasets, ["/d/a.jsonl"]);
        assert_eq!(prepare.env, node.launch.processes[0].env);
    }
}

#[test]
fn staged_inputs_reach_only_the_node_that_holds_them_ready() {
    let spec = spec(&format!(
        "{}stage:\n  - name: weights\n    source: /s/w.bin\n",
        "name: s\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [run]\n"
    ));
    let (nodes, layout) = laid_out(&spec);
    let status = |node: &str, state: &str, path: &str| StageStatus {
        node_name: node.into(),
        item: "weights".into(),
        state: state.into(),
        path: path.into(),
        ..StageStatus::default()
    };
    let staged = [status("a", "cached", "/c/a/w.bin"), status("b", "copying", "/c/b/w.bin")];
    let plan = plan_of(&spec, &nodes, &layout, None, &staged, MARKER);
    let staged_env = |n: &NodeLaunch| env_of(&n.launch.processes[0]).get("COHORT_STAGED_WEIGHTS").cloned();
    assert_eq!(staged_env(&plan.nodes[0]).as_deref(), Some("/c/a/w.bin"));
    assert_eq!(staged_env(&plan.nodes[1]), None, "b has not finished copying");
    assert_eq!(plan.nodes[0].prepare.as_ref().unwrap().stage[0].source, "/s/w.bin");
}

#[test]
fn a_staged_model_points_the_hub_library_at_each_nodes_own_cache_layout() {
    let text = MEGATRON_RELATIVE.replace("load: /models/m", "model: Qwen/Qwen3-8B")
        + "stage:\n  - {model: Qwen/Qwen3-8B, source: /nfs/qwen3}\n  - {model: Qwen/Qwen3-0.6B, source: /nfs/small, layout: huggingface}\n";
    let spec = spec(&text);
    let (nodes, layout) = laid_out(&spec);
    let status = |node: &str, item: &str, hub: &str| StageStatus {
        node_name: node.into(),
        item: item.into(),
        state: "ready".into(),
        path: format!("/c/{node}/sha256/x"),
        hub_cache: hub.into(),
        ..StageStatus::default()
    };
    let staged = [
        status("a", "Qwen_Qwen3-8B", "/c/a/hub/modelscope"),
        status("b", "Qwen_Qwen3-8B", "/c/b/hub/modelscope"),
        status("a", "Qwen_Qwen3-0_6B", "/c/a/hub/huggingface"),
    ];
    let plan = plan_of(&spec, &nodes, &layout, None, &staged, MARKER);
    let prepare = plan.nodes[0].prepare.as_ref().unwrap();
    assert_eq!(prepare.stage[0].model, "Qwen/Qwen3-8B");
    assert_eq!((prepare.stage[0].layout.as_str(), prepare.stage[1].layout.as_str()), ("modelscope", "huggingface"));
    // Each node's own layout, not a shared cache to prove shared.
    assert_eq!(prepare.shared_paths, ["/w/out/run"]);
    let (a, b) = (env_of(&plan.nodes[0].launch.processes[0]), env_of(&plan.nodes[1].launch.processes[0]));
    assert_eq!(
        (a["MODELSCOPE_CACHE"].as_str(), b["MODELSCOPE_CACHE"].as_str()),
        ("/c/a/hub/modelscope", "/c/b/hub/modelscope")
    );
    assert_eq!(a["HF_HUB_CACHE"], "/c/a/hub/huggingface");
    assert_eq!(a["COHORT_STAGED_QWEN_QWEN3_8B"], "/c/a/sha256/x");
    assert!(!b.contains_key("HF_HUB_CACHE"), "b has not staged the second model");

    // `--model` names the node's own copy in the ModelScope layout (ms-swift
    // would list the id online), and stays the id where the node holds none.
    let model_arg = |n: &NodeLaunch| {
        let argv = &n.launch.processes[0].argv;
        argv.iter().position(|a| a == "--model").map(|i| argv[i + 1].clone()).unwrap()
    };
    assert_eq!(model_arg(&plan.nodes[0]), "/c/a/hub/modelscope/models/Qwen/Qwen3-8B");
    assert_eq!(model_arg(&plan.nodes[1]), "/c/b/hub/modelscope/models/Qwen/Qwen3-8B");
    let only_a = plan_of(&spec, &nodes, &layout, None, &staged[..1], MARKER);
    assert_eq!(model_arg(&only_a.nodes[1]), "Qwen/Qwen3-8B");
    // The Hugging Face layout is found by its id offline: left as written.
    let hf_spec = self::spec(&text.replace("model: Qwen/Qwen3-8B\n", "model: Qwen/Qwen3-0.6B\n"));
    let hf = plan_of(&hf_spec, &nodes, &layout, None, &staged, MARKER);
    assert_eq!(model_arg(&hf.nodes[0]), "Qwen/Qwen3-0.6B");
}

#[test]
fn a_resumed_attempt_launches_and_checks_the_resume_flags_and_no_marker_means_no_preparation() {
    let spec = spec(MEGATRON_RELATIVE);
    let (nodes, layout) = laid_out(&spec);
    let checkpoint =
        cohort_proto::Checkpoint { iteration: 40, path: "/w/out/run/v0-1".into(), layout: "megatron-iter".into() };
    let fresh = plan_of(&spec, &nodes, &layout, None, &[], MARKER);
    let resumed = plan_of(&spec, &nodes, &layout, Some(&checkpoint), &[], MARKER);
    let names_checkpoint = |argv: &[String]| argv.iter().any(|a| a == "/w/out/run/v0-1");
    for (fresh, resumed) in fresh.nodes.iter().zip(&resumed.nodes) {
        assert!(!names_checkpoint(&fresh.launch.processes[0].argv));
        assert!(names_checkpoint(&resumed.launch.processes[0].argv), "{:?}", resumed.launch.processes[0].argv);
        let check = resumed.prepare.as_ref().unwrap().swift_argcheck.as_ref().unwrap();
        assert!(names_checkpoint(&check.argv), "the node's ms-swift checks the argv that launches");
    }
    let launch_only = plan_of(&spec, &nodes, &layout, None, &[], None);
    assert!(launch_only.nodes.iter().all(|n| n.prepare.is_none()));
    let launches = |p: &LaunchPlan| p.nodes.iter().map(|n| n.launch.clone()).collect::<Vec<_>>();
    assert_eq!(launches(&launch_only), launches(&fresh));
}

#[test]
fn a_megatron_job_preempted_with_sigterm_gets_megatrons_save_on_that_signal() {
    let argv_of = |yaml: &str| {
        let spec = spec(yaml);
        let (nodes, layout) = laid_out(&spec);
        let plan = plan_of(&spec, &nodes, &layout, None, &[], MARKER);
        plan.nodes[0].launch.processes[0].argv.join(" ")
    };
    let saving = argv_of(&format!("{MEGATRON_RELATIVE}preempt: {{grace: 5m}}\n"));
    assert!(saving.contains(r#"--megatron_extra_kwargs {"exit_signal_handler":true}"#), "{saving}");
    let other = argv_of(&format!("{MEGATRON_RELATIVE}preempt: {{signal: SIGUSR1}}\n"));
    assert!(!other.contains("exit_signal_handler"), "Megatron saves on SIGTERM only: {other}");
    assert!(!argv_of(MEGATRON_RELATIVE).contains("exit_signal_handler"), "only with preempt:");
    let v4 = MEGATRON_RELATIVE
        .replace("swift_version: 3\n  load: /models/m", "swift_version: 4\n  model: /models/m")
        .replace("save: out/run", "output_dir: out/run");
    let v4 = argv_of(&format!("{v4}preempt: {{grace: 5m}}\n"));
    assert!(!v4.contains("exit_signal_handler"), "ms-swift 4's own loop has no signal handler: {v4}");
}
