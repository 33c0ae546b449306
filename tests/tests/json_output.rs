//! `-o json` keeps the `cohort.v1` schema (docs/src/cli.md, "JSON output") on real
//! output of a small cluster: snake_case keys, zero values present, 64-bit
//! integers as numbers, states as the tables spell them, one document per
//! call, JSON lines only with `--follow`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};
use serde_json::Value;

fn document(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(doc["schema"], "cohort.v1", "{doc}");
    doc
}

/// Every line one JSON object; none carries the document's `schema`.
fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .inspect(|v| assert!(v.is_object() && v.get("schema").is_none(), "{v}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_output_keeps_the_cohort_v1_schema() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let job = cluster
        .submit("name: m\nkind: command\nnodes: 2\ngpus_per_node: 1\nworkdir: tests/payloads\ncommand: [python3, swift4_metrics.py, '20']\n")
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", job.reason);

    // jobs: the state as the table spells it, 64-bit times as numbers, zero values present.
    let jobs = document(&cluster.cli(&["jobs", "-o", "json"]));
    let listed = &jobs["jobs"][0];
    assert_eq!(listed["state"], "Succeeded", "{listed}");
    assert!(listed["submitted_unix_ms"].as_i64().is_some_and(|ms| ms > 0), "{listed}");
    assert_eq!(listed["not_before_unix_ms"], 0, "{listed}");
    assert_eq!(listed["output_dropped_bytes"], 0, "{listed}");
    assert_eq!(listed["priority"], 0, "{listed}");

    // status: node rank 0 is there as a number.
    let status = document(&cluster.cli(&["status", &job.id, "-o", "json"]));
    let mut ranks: Vec<u64> =
        status["plan"]["nodes"].as_array().unwrap().iter().map(|n| n["node_rank"].as_u64().unwrap()).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1], "{status}");

    // nodes and gpus: GPU 0 has its index, the node its table state.
    for verb in ["nodes", "gpus"] {
        let nodes = document(&cluster.cli(&[verb, "-o", "json"]));
        for node in nodes["nodes"].as_array().unwrap() {
            assert_eq!(node["state"], "Ready", "{verb}: {node}");
            assert_eq!(node["info"]["gpus"][0]["index"], 0, "{verb}: {node}");
            assert!(node["last_heartbeat_unix_ms"].is_i64(), "{verb}: {node}");
        }
    }

    // metrics: one document; with --follow, JSON lines of the same records.
    let metrics = document(&cluster.cli(&["metrics", &job.id, "-o", "json"]));
    let points = metrics["points"].as_array().unwrap();
    let iterations: Vec<u64> = points.iter().map(|p| p["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iterations, [1, 5, 10, 15, 20]);
    assert_eq!(points[0]["total_iterations"], 20);
    assert_eq!(points[1]["loss"].as_f64(), Some(0.4));
    assert_eq!(points[0]["is_eval"], false);
    let out = cluster.cli_within(&["metrics", &job.id, "-f", "-o", "json"], Duration::from_secs(30)).await.unwrap();
    let followed = json_lines(&out);
    assert_eq!(&followed, points, "--follow prints the document's records, one a line");

    // plot writes to --out; the old `-o PATH` still works, with a warning.
    for (flag, name) in [("--out", "a.svg"), ("-o", "b.svg")] {
        let path = cluster.dir.path().join(name);
        let out = cluster.cli(&["plot", &job.id, flag, path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && path.exists(), "{flag}: {err}");
        assert_eq!(err.contains("`cohort plot -o PATH` is deprecated: use `--out PATH`"), flag == "-o", "{err}");
    }

    // logs: one document; with -f, JSON lines.
    let logs = document(&cluster.cli(&["logs", &job.id, "-o", "json"]));
    let lines = logs["lines"].as_array().unwrap();
    assert!(lines.iter().any(|l| l["line"]["text"] == "node 0 up"), "{logs}");
    let out = cluster.cli_within(&["logs", &job.id, "-f", "-o", "json"], Duration::from_secs(30)).await.unwrap();
    assert_eq!(json_lines(&out).len(), lines.len());

    // plan of a megatron-sft job without a workdir: where the ranks run, and a
    // warning (stderr and `warnings`) for the relative save path.
    let file = cluster.dir.path().join("sft.yaml");
    std::fs::write(
        &file,
        "name: sft\nkind: megatron-sft\nnodes: 2\ngpus_per_node: 1\nmegatron:\n  swift_version: 3\n  load: /models/Qwen3-8B-mcore\n  dataset: [/data/train.jsonl]\n  finetune: true\n  micro_batch_size: 1\n  global_batch_size: 2\n  save: out/run\n",
    )
    .unwrap();
    let out = cluster.cli(&["plan", file.to_str().unwrap()]);
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Each node's line names its agent's real --work-dir.
    for node in ["node0", "node1"] {
        let line = format!("workdir: {}/jobs/<job id>/workdir (none set", cluster.dir.path().join(node).display());
        assert!(text.contains(&line), "{text}{err}");
    }
    assert!(err.contains("warning: megatron.save: \"out/run\" is relative"), "{err}");
    assert!(err.contains("<agent --work-dir>/jobs/<job id>/workdir/out/run"), "{err}");
    // ... and the agents' real --work-dir, per node.
    for node in ["node0", "node1"] {
        let work_dir = cluster.dir.path().join(node);
        assert!(err.contains(&format!("{} on {node}", work_dir.display())), "{err}");
    }
    let out = cluster.cli(&["plan", file.to_str().unwrap(), "-o", "json"]);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["schema"], "cohort.v1");
    let warnings = plan["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w.as_str().unwrap().starts_with("megatron.save: \"out/run\" is relative")),
        "{plan}"
    );
    assert_eq!(plan["plan"]["nodes"][0]["workdir"], "", "{plan}");
}
