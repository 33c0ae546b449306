//! A controller that is paused (SIGSTOP, a VM freeze, a starved CPU) for
//! longer than the node TTL but less than the agents' fence must not fail
//! running jobs as node_lost when it resumes: no agent fenced, no rank died,
//! only the controller was away (issue 14, item 8).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const TTL: Duration = Duration::from_secs(3);
const PAUSE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_paused_past_the_node_ttl_keeps_its_running_jobs() {
    let nodes: Vec<NodeSpec> = (0..2)
        .map(|i| {
            let mut node = NodeSpec::loopback(i, 1);
            node.extra_args = vec!["--fence-after".into(), "30s".into()];
            node
        })
        .collect();
    let cluster = Cluster::start_with(nodes, &["--node-ttl", "3s", "--heartbeat-interval", "500ms"]).await.unwrap();
    let (job, flag) = cluster.submit_held("steady", 2).await.unwrap();

    let pid = Pid::from_raw(cluster.controller_pid().unwrap() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    tokio::time::sleep(PAUSE).await;
    kill(pid, Signal::SIGCONT).unwrap();

    // Two TTLs after resuming: still the first attempt, running on both nodes.
    let deadline = tokio::time::Instant::now() + TTL * 2;
    while tokio::time::Instant::now() < deadline {
        let now = cluster.job(&job.id).await.unwrap();
        assert_eq!(state(&now), JobState::Running, "{}; failure {:?}", now.reason, now.failure);
        assert_eq!(now.attempt, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&flag, b"").unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}; failure {:?}", done.reason, done.failure);
    assert_eq!(done.attempt, 1);
    assert!(cluster.controller_log().contains("the liveness sweep ran late"), "the pause went unnoticed");
}
