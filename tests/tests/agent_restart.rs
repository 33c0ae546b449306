//! An agent killed with SIGKILL (or SIGTERM'd with --keep-ranks-on-exit) and
//! started again: its ranks run on under their shims, the new agent adopts
//! them, and exits that happened while it was away reach the controller.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, processes_of_job, state};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn two_nodes() -> Vec<NodeSpec> {
    (0..2).map(|i| NodeSpec::loopback(i, 1)).collect()
}

/// Every node prints a line every 100 ms until `flag` exists, then prints
/// "done" and exits with `code` (node rank 1) or 0 (the others).
fn ticker(name: &str, flag: &Path, code: u32) -> String {
    let script = format!(
        "i=0; while [ ! -e {flag} ]; do i=$((i+1)); echo node$NODE_RANK tick $i; sleep 0.1; done; \
         echo node$NODE_RANK done; if [ $NODE_RANK = 1 ]; then exit {code}; fi; exit 0",
        flag = flag.display()
    );
    format!("name: {name}\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sh, -c, '{script}']\n")
}

fn pids(job: &Job) -> Vec<u32> {
    job.processes.iter().map(|p| p.pid).collect()
}

/// Where node `node`'s agent keeps process 0's files of the job's attempt.
fn process_file(cluster: &Cluster, node: &str, job: &Job, ext: &str) -> PathBuf {
    cluster.dir.path().join(node).join("jobs").join(&job.id).join(format!("attempt-{}/0.{ext}", job.attempt))
}

fn logs(cluster: &Cluster, job: &Job) -> String {
    String::from_utf8_lossy(&cluster.cli(&["logs", &job.id, "--node", "node1"]).stdout).into_owned()
}

async fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "no {what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The highest "node1 tick N" in `text`.
fn last_tick(text: &str) -> u32 {
    text.lines().filter_map(|l| l.rsplit_once("node1 tick ")?.1.trim().parse().ok()).max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn ranks_outlive_a_killed_agent_and_are_adopted_by_the_next_one() {
    let mut cluster = Cluster::start(two_nodes()).await.unwrap();
    let flag = cluster.dir.path().join("finish");
    let job = cluster.submit(&ticker("survive", &flag, 0)).await.unwrap();
    let before = cluster
        .wait_job(&job.id, Duration::from_secs(20), |j| {
            state(j) == JobState::Running && j.processes.iter().all(|p| p.pid > 0)
        })
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "output from node1", || last_tick(&logs(&cluster, &before)) >= 3).await;

    cluster.restart_agent(1);
    // What node1 printed up to the restart, at the latest.
    let tick_at_restart = last_tick(&std::fs::read_to_string(process_file(&cluster, "node1", &before, "out")).unwrap());
    cluster.wait_nodes_ready(&["node0".into(), "node1".into()], Duration::from_secs(20)).await.unwrap();

    let after = cluster.job(&job.id).await.unwrap();
    assert_eq!(state(&after), JobState::Running, "{}", after.reason);
    assert_eq!(pids(&after), pids(&before), "the same processes, adopted");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).into_owned();
    assert!(status.contains("Running"), "{status}");
    for pid in pids(&before) {
        assert!(status.contains(&pid.to_string()), "pid {pid} in:\n{status}");
    }

    // Lines printed after the restart reach the controller.
    wait_until(Duration::from_secs(10), "output printed after the restart", || {
        last_tick(&logs(&cluster, &before)) >= tick_at_restart + 5
    })
    .await;

    std::fs::write(&flag, "").unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    let node1 = done.processes.iter().find(|p| p.node_name == "node1").unwrap();
    assert_eq!((node1.exit_code, node1.signal), (Some(0), None), "from the shim's exit file: {node1:?}");
    assert!(logs(&cluster, &done).contains("node1 done"));
    assert!(processes_of_job(&job.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exit_while_the_agent_is_down_reaches_the_controller_when_it_returns() {
    let mut cluster = Cluster::start(two_nodes()).await.unwrap();
    let flag = cluster.dir.path().join("fail");
    let job = cluster.submit(&ticker("away", &flag, 3)).await.unwrap();
    let running = cluster
        .wait_job(&job.id, Duration::from_secs(20), |j| {
            state(j) == JobState::Running && j.processes.iter().all(|p| p.pid > 0)
        })
        .await
        .unwrap();

    cluster.kill_agent(1);
    std::fs::write(&flag, "").unwrap();
    // node1's rank exits 3 with no agent watching; its shim records it. (node0's
    // exits 0 and is reported at once.)
    let exit_file = process_file(&cluster, "node1", &running, "exit");
    wait_until(Duration::from_secs(10), "exit file from node1's shim", || exit_file.exists()).await;
    assert_eq!(state(&cluster.job(&job.id).await.unwrap()), JobState::Running, "node1 has not told yet");

    cluster.restart_agent(1);
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    let failure = job.failure.as_ref().unwrap();
    assert_eq!((failure.node_name.as_str(), failure.exit_code), ("node1", Some(3)), "{failure:?}");
    assert!(job.reason.contains("node1") && job.reason.contains("code 3"), "{}", job.reason);
    let node1 = job.processes.iter().find(|p| p.node_name == "node1").unwrap();
    assert_eq!((node1.exit_code, node1.stopped_by_agent), (Some(3), false));
    assert!(processes_of_job(&job.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_keep_ranks_on_exit_a_sigtermed_agent_leaves_its_ranks_to_the_next_one() {
    let mut nodes = two_nodes();
    nodes[1].extra_args = vec!["--keep-ranks-on-exit".into()];
    let mut cluster = Cluster::start(nodes).await.unwrap();
    let flag = cluster.dir.path().join("finish");
    let job = cluster.submit(&ticker("upgrade", &flag, 0)).await.unwrap();
    let before = cluster
        .wait_job(&job.id, Duration::from_secs(20), |j| {
            state(j) == JobState::Running && j.processes.iter().all(|p| p.pid > 0)
        })
        .await
        .unwrap();

    // An upgrade: SIGTERM, the agent exits, its ranks stay.
    let agent = cluster.agent_pids()[1];
    kill(Pid::from_raw(agent as i32), Signal::SIGTERM).unwrap();
    wait_until(Duration::from_secs(10), "node1's agent to exit", || exited(agent)).await;
    let node1 = before.processes.iter().find(|p| p.node_name == "node1").unwrap().pid;
    assert!(kill(Pid::from_raw(node1 as i32), None).is_ok(), "node1's process must outlive its agent");

    cluster.restart_agent(1);
    cluster.wait_nodes_ready(&["node0".into(), "node1".into()], Duration::from_secs(20)).await.unwrap();
    let after = cluster.job(&job.id).await.unwrap();
    assert_eq!((state(&after), pids(&after)), (JobState::Running, pids(&before)), "{}", after.reason);
    std::fs::write(&flag, "").unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
}

/// Whether a child of this test has exited (a zombie until the harness reaps it).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}
