//! The quickstart's tiny SFT job end to end: a real two-node torchrun run
//! (gloo on CPU) through the real controller and agents. Needs the example's
//! virtualenv (`examples/tiny-sft/setup-venv.sh`, which tests/run.sh runs) or
//! COHORT_PYTHON pointing at an interpreter with torch and transformers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::JobState;
use cohort_shared::metrics::{LogFormat, parse_line};
use cohort_tests::{Cluster, NodeSpec, processes_of_job, repo_root, state};

#[tokio::test(flavor = "multi_thread")]
async fn tiny_sft_trains_across_two_nodes_and_the_loss_falls() {
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists() || std::env::var_os("COHORT_PYTHON").is_some(),
        "{} missing: run examples/tiny-sft/setup-venv.sh (or bash tests/run.sh)",
        venv.display()
    );
    let nodes = (0..2)
        .map(|i| {
            let mut node = NodeSpec::loopback(i, 1);
            node.extra_args = vec!["--net-ifname".into(), "lo".into()];
            node
        })
        .collect();
    let cluster = Cluster::start(nodes).await.unwrap();
    let out = cluster.cli(&["submit", "examples/jobs/tiny-sft.yaml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let job = match cluster.wait_finished(&id, Duration::from_secs(300)).await {
        Ok(job) => job,
        // Everything there is to know about a run that did not end: where each rank was.
        Err(e) => panic!(
            "{e}\n{}\n{}",
            String::from_utf8_lossy(&cluster.cli(&["status", &id]).stdout),
            String::from_utf8_lossy(&cluster.cli(&["logs", &id]).stdout)
        ),
    };
    assert_eq!(
        state(&job),
        JobState::Succeeded,
        "{job:?}\n{}",
        String::from_utf8_lossy(&cluster.cli(&["logs", &id]).stdout)
    );

    // Metrics come from the LAST node only, in ms-swift 3.x format, and the
    // same parser the agent will use reads them.
    let metrics_of = |node: &str| {
        let out = cluster.cli(&["logs", &id, "--node", node, "-o", "json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["lines"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["line"]["text"].as_str().and_then(parse_line))
            .collect::<Vec<_>>()
    };
    assert!(metrics_of("node0").is_empty(), "rank 0 must not print metrics");
    let metrics = metrics_of("node1");
    assert!(metrics.len() >= 3, "{metrics:?}");
    assert!(metrics.iter().all(|m| m.format == LogFormat::MsSwift3));
    assert!(metrics.windows(2).all(|w| w[0].iteration < w[1].iteration));
    let (first, last) = (metrics[0].loss.unwrap(), metrics[metrics.len() - 1].loss.unwrap());
    assert!(last < first, "loss must fall: first {first}, last {last}");
    assert_eq!(metrics[metrics.len() - 1].iteration, metrics[0].total_iterations.unwrap());
    assert!(processes_of_job(&id).is_empty());

    // Status shows where training ended, and no hang clock for a job that is over.
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &id]).stdout).into_owned();
    assert!(status.contains("progress:  iteration 60/60 (100%)"), "{status}");
    assert!(!status.contains("hang:"), "a finished job cannot hang:\n{status}");
}
