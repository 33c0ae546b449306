//! Queues and backfill with real agents on loopback nodes of one fake GPU
//! each (issue 17): a short job backfills past a blocked head job and a long
//! one does not; a queue at its quota keeps its next job pending, saying so,
//! while another queue's job runs.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(30);

fn sleeper(name: &str, nodes: u32, extra: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\n{extra}command: [sleep, '300']\n")
}

async fn running(cluster: &Cluster, job: &Job) -> Job {
    cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Running).await.unwrap()
}

/// Waits until the job is pending with a reason that contains `reason`.
async fn pending_with(cluster: &Cluster, job: &Job, reason: &str) -> Job {
    cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Pending && j.reason.contains(reason)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_job_backfills_past_a_blocked_head_job_and_a_long_one_waits_behind_it() {
    let cluster = Cluster::start((0..3).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into(), "node1".into(), "node2".into()], WITHIN).await.unwrap();
    let busy = cluster.submit(&sleeper("busy", 1, "time_limit: 30m\n")).await.unwrap();
    running(&cluster, &busy).await;

    // The 3-node head waits for the busy node, whose time limit ends it in 30 minutes at the latest.
    let head = cluster.submit(&sleeper("head", 3, "time_limit: 1h\n")).await.unwrap();
    let head = pending_with(&cluster, &head, "reserved nodes node0,node1,node2 from").await;
    assert!(head.reason.starts_with("waiting for free GPUs"), "{}", head.reason);

    // One hour would run past the reservation: it waits, naming the head job.
    let long = cluster.submit(&sleeper("long", 1, "time_limit: 1h\n")).await.unwrap();
    let long = pending_with(&cluster, &long, &format!("behind job {} (reserved nodes", head.id)).await;
    assert!(long.reason.contains("time_limit 1h would run past the reservation's start"), "{}", long.reason);

    // Ten minutes ends before it: it starts now on an idle node.
    let short = cluster.submit(&sleeper("short", 1, "time_limit: 10m\n")).await.unwrap();
    running(&cluster, &short).await;
    let status = cluster.cli(&["status", &long.id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("behind job {}", head.id)), "cohort status shows the reason: {text}");
    assert_eq!(state(&cluster.job(&head.id).await.unwrap()), JobState::Pending);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_at_its_quota_keeps_its_next_job_pending_while_another_queues_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let queues = dir.path().join("queues.toml");
    std::fs::write(
        &queues,
        "default = \"team-b\"\n\
         [[queue]]\nname = \"team-a\"\ngpus = 1\nborrow = false\n\
         [[queue]]\nname = \"team-b\"\n",
    )
    .unwrap();
    let nodes = (0..3).map(|i| NodeSpec::loopback(i, 1)).collect();
    let cluster = Cluster::start_with(nodes, &["--queues", queues.to_str().unwrap()]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into(), "node1".into(), "node2".into()], WITHIN).await.unwrap();

    let a1 = cluster.submit(&sleeper("a1", 1, "queue: team-a\n")).await.unwrap();
    running(&cluster, &a1).await;
    let a2 = cluster.submit(&sleeper("a2", 1, "queue: team-a\n")).await.unwrap();
    let b1 = cluster.submit(&sleeper("b1", 1, "")).await.unwrap();
    running(&cluster, &b1).await;
    let a2 = pending_with(&cluster, &a2, "queue team-a at quota 1/1 GPUs").await;
    assert_eq!(a2.reason, "queue team-a at quota 1/1 GPUs (this job needs 1)");

    let refused = cluster.submit(&sleeper("c", 1, "queue: team-c\n")).await.unwrap_err();
    let status = refused.downcast_ref::<tonic::Status>().expect("a gRPC refusal");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let text = status.message();
    assert!(text.contains("queue: \"team-c\" is not a queue of this cluster"), "{text}");
    assert!(text.contains("team-a, team-b"), "the refusal names the queues: {text}");
}
