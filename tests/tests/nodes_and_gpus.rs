//! Node scheduling states and GPU health through real processes: cordon,
//! drain and uncordon; an XID injected on a (fake-backend) GPU makes it
//! unhealthy at once, the planner stops granting it, an operator clears it.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

use cohort_proto::{GpuHealthState, JobState, ListNodesRequest};
use cohort_tests::{Cluster, NodeSpec, state};

#[tokio::test(flavor = "multi_thread")]
async fn cordon_drain_and_uncordon_steer_new_work() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    assert!(cluster.cli(&["cordon", "node1"]).status.success());
    let nodes = String::from_utf8_lossy(&cluster.cli(&["nodes"]).stdout).to_string();
    assert!(nodes.contains("Ready,Cordoned"), "{nodes}");

    // `submit --wait` and `--follow` say why the job waits, and go on once it can run.
    for (flag, printed) in [("--wait", "Succeeded"), ("--follow", "hello from both")] {
        if flag == "--follow" {
            assert!(cluster.cli(&["cordon", "node1"]).status.success());
        }
        let out = says_why_it_waits_until_uncordoned(&cluster, flag).await;
        assert!(out.contains(printed), "{flag}: {out}");
    }
    // Drain: the running job goes on, the node shows Draining, then merely Cordoned.
    let flag = cluster.dir.path().join("release");
    let yaml = format!(
        "name: long\nkind: command\nnodes: 1\ngpus_per_node: 1\nnode_selector: {{}}\ncommand: [sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']\n",
        flag.display()
    );
    let long = cluster.submit(&yaml).await.unwrap();
    let running = cluster.wait_job(&long.id, Duration::from_secs(10), |j| state(j) == JobState::Running).await.unwrap();
    let host = running.plan.as_ref().unwrap().nodes[0].node_name.clone();
    assert!(cluster.cli(&["drain", &host]).status.success());
    let nodes = String::from_utf8_lossy(&cluster.cli(&["nodes"]).stdout).to_string();
    assert!(nodes.contains("Ready,Draining"), "{nodes}");
    std::fs::write(&flag, "").unwrap();
    let out = cluster.cli(&["drain", &host, "--wait"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Ready,Cordoned"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(state(&cluster.wait_finished(&long.id, Duration::from_secs(10)).await.unwrap()), JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xid_makes_a_gpu_unhealthy_at_once_and_the_planner_skips_it_until_cleared() {
    let events = tempfile::NamedTempFile::new().unwrap();
    let mut node = NodeSpec::loopback(0, 2);
    // The fake runs in a GPU reader process, as NVML does on a GPU node: the
    // event crosses the reader's pipe, the agent's stream and the controller.
    node.extra_args = ["--fake-gpu-events", &events.path().display().to_string(), "--gpu-reader", "process"]
        .map(String::from)
        .to_vec();
    let cluster = Cluster::start(vec![node]).await.unwrap();

    let injected = Instant::now();
    writeln!(events.as_file(), "xid 1 79").unwrap();
    let mut client = cluster.client().await.unwrap();
    let delay = loop {
        let nodes = client.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let unhealthy = nodes[0]
            .telemetry
            .iter()
            .any(|t| t.index == 1 && t.health.as_ref().is_some_and(|h| h.state == GpuHealthState::Unhealthy as i32));
        if unhealthy {
            break injected.elapsed();
        }
        assert!(injected.elapsed() < Duration::from_secs(10), "GPU 1 never became unhealthy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("figures: XID injected -> GPU shown unhealthy by the controller in {} ms", delay.as_millis());

    let gpus = String::from_utf8_lossy(&cluster.cli(&["gpus"]).stdout).to_string();
    assert!(gpus.contains("Unhealthy") && gpus.contains("79"), "{gpus}");
    let wide = String::from_utf8_lossy(&cluster.cli(&["nodes", "-o", "wide"]).stdout).to_string();
    assert!(wide.contains("1 ("), "{wide}");

    let job =
        cluster.submit("name: two\nkind: command\nnodes: 1\ngpus_per_node: 2\ncommand: ['true']\n").await.unwrap();
    let pending = cluster.wait_job(&job.id, Duration::from_secs(10), |j| j.reason.contains("GPUs free")).await.unwrap();
    assert_eq!(state(&pending), JobState::Pending);
    assert!(pending.reason.contains("node0 has 1 of 2 GPUs free"), "{}", pending.reason);
    assert!(cluster.cli(&["clear-gpu", "node0", "1"]).status.success());
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    assert_eq!(done.plan.unwrap().nodes[0].gpu_indices, vec![0, 1]);
}

/// Submits a two-node job with `flag` while node1 is cordoned; checks the CLI
/// says the pending reason, uncordons, and returns what it printed to stdout.
async fn says_why_it_waits_until_uncordoned(cluster: &Cluster, flag: &str) -> String {
    let file = cluster.dir.path().join("both.yaml");
    let job = "name: both\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [echo, hello from both]\n";
    std::fs::write(&file, job).unwrap();
    let mut waiter = cluster.cli_command(&["submit", flag, file.to_str().unwrap()]).spawn().unwrap();
    let mut said = tokio::io::BufReader::new(waiter.stderr.take().unwrap()).lines();
    let mut heard = Vec::new();
    let reason = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = said.next_line().await.unwrap() {
            heard.push(line.clone());
            if line.contains("Pending") && line.contains("node1 is cordoned") {
                return line;
            }
        }
        panic!("`submit {flag}` ended without saying why the job waits: {heard:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("`submit {flag}` said nothing about the pending reason within 20 s: {heard:?}"));
    let id = heard.iter().find_map(|l| l.strip_prefix("submitted job ")).unwrap().to_owned();
    assert!(reason.starts_with(&format!("job {id}: Pending: waiting for free GPUs")), "{reason}");
    let mut client = cluster.client().await.unwrap();
    let pending = client.get_job(cohort_proto::GetJobRequest { job: id.clone() }).await.unwrap().into_inner();
    assert_eq!(state(&pending), JobState::Pending, "{}", pending.reason);
    assert!(cluster.cli(&["uncordon", "node1"]).status.success());
    let out = tokio::time::timeout(Duration::from_secs(30), waiter.wait_with_output()).await.unwrap().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "`submit {flag}` of {id}: {printed}");
    printed
}
