//! Gang launch and teardown with a real controller and real agents as separate
//! processes on loopback addresses.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::{JobState, ProcessPhase};
use cohort_tests::{Cluster, NodeSpec, live_groups, processes_of_job, state};

const RENDEZVOUS: &str = "
name: hello
kind: command
nodes: 3
gpus_per_node: 1
workdir: tests/payloads
command: [python3, rendezvous.py]
";

fn three_nodes() -> Vec<NodeSpec> {
    (0..3).map(|i| NodeSpec::loopback(i, 1)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_node_rendezvous_proves_the_environment_contract() {
    let cluster = Cluster::start(three_nodes()).await.unwrap();
    let job = cluster.submit(RENDEZVOUS).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
    assert_eq!(job.processes.len(), 3);
    assert!(job.processes.iter().all(|p| p.exit_code == Some(0)));

    let plan = job.plan.as_ref().unwrap();
    assert_eq!(plan.master_addr, "127.0.0.2");
    let ranks: Vec<(String, u32)> = plan.nodes.iter().map(|n| (n.node_name.clone(), n.node_rank)).collect();
    assert_eq!(ranks, [("node0".into(), 0), ("node1".into(), 1), ("node2".into(), 2)]);

    // Rank 0's own verdict, read back through the CLI.
    let logs = cluster.cli(&["logs", &job.id, "--node", "node0"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.status.success());
    assert!(text.contains("rendezvous complete: ranks [1, 2] + 0"), "{text}");
    assert!(!text.contains("node1/"), "--node must filter: {text}");
    assert!(processes_of_job(&job.id).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_rank_stops_the_whole_gang() {
    let cluster = Cluster::start(three_nodes()).await.unwrap();
    let yaml = format!("{RENDEZVOUS}env: {{FAIL_NODE_RANK: '1', FAIL_CODE: '3'}}\n");
    let job = cluster.submit(&yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();

    assert_eq!(state(&job), JobState::Failed);
    let failure = job.failure.as_ref().unwrap();
    assert_eq!(failure.node_name, "node1");
    assert_eq!(failure.exit_code, Some(3));
    assert!(job.reason.contains("node1") && job.reason.contains("code 3"), "{}", job.reason);

    // Every other process was stopped by its agent within 2 s of the failure.
    let failed_at = job.processes.iter().find(|p| p.node_name == "node1").unwrap().ended_unix_ms;
    for p in job.processes.iter().filter(|p| p.node_name != "node1") {
        assert_eq!(p.phase, ProcessPhase::Exited as i32, "{p:?}");
        assert!(p.stopped_by_agent || p.exit_code != Some(0), "{p:?}");
        let after = p.ended_unix_ms - failed_at;
        assert!(after <= 2000, "{} ended {after} ms after the failure", p.node_name);
    }
    assert!(live_groups(&job).is_empty(), "process groups left: {:?}", live_groups(&job));
    assert!(processes_of_job(&job.id).is_empty());

    let status = cluster.cli(&["status", &job.id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("Failed") && text.contains("node1") && text.contains("code 3"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_leaves_nothing_behind_even_processes_that_ignore_sigterm() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    // Each node: a shell that ignores SIGTERM, with a child that also ignores
    // it, so only the SIGKILL after the grace period ends them.
    let job = cluster
        .submit(
            "
name: stubborn
kind: command
nodes: 2
gpus_per_node: 1
stop_grace: 1s
command: [sh, -c, \"trap '' TERM; sleep 600 & while true; do sleep 1; done\"]
",
        )
        .await
        .unwrap();
    let running = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();
    assert_eq!(running.processes.iter().filter(|p| p.pid > 0).count(), 2);
    assert!(!processes_of_job(&job.id).is_empty());

    let out = cluster.cli(&["cancel", &job.id, "--wait"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Cancelled);
    for p in &job.processes {
        assert_eq!(p.signal, Some(9), "SIGTERM is ignored, so SIGKILL must have ended it: {p:?}");
        assert!(p.stopped_by_agent);
    }
    assert!(live_groups(&running).is_empty());
    assert!(processes_of_job(&job.id).is_empty(), "left: {:?}", processes_of_job(&job.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_too_big_for_the_free_gpus_waits_then_runs() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 2), NodeSpec::loopback(1, 2)]).await.unwrap();
    let flag = cluster.dir.path().join("release-first");
    let first = cluster
        .submit(&format!(
            "
name: first
kind: command
nodes: 2
gpus_per_node: 2
command: [sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']
",
            flag.display()
        ))
        .await
        .unwrap();
    cluster.wait_job(&first.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();

    let second_yaml = "
name: second
kind: command
nodes: 2
gpus_per_node: 1
command: [true]
";
    let second = cluster.submit(second_yaml).await.unwrap();
    let pending = cluster
        .wait_job(&second.id, Duration::from_secs(10), |j| j.reason.contains("waiting for free GPUs"))
        .await
        .unwrap();
    assert_eq!(state(&pending), JobState::Pending, "{pending:?}");
    assert!(pending.reason.contains("node0 has 0 of 2 GPUs free"), "{}", pending.reason);

    std::fs::write(&flag, "").unwrap();
    let first = cluster.wait_finished(&first.id, Duration::from_secs(20)).await.unwrap();
    let second = cluster.wait_finished(&second.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&first), JobState::Succeeded);
    assert_eq!(state(&second), JobState::Succeeded, "{second:?}");
    assert!(second.started_unix_ms >= first.finished_unix_ms);
    assert_ne!(
        first.plan.unwrap().master_port,
        second.plan.unwrap().master_port,
        "a port just released is not handed out again at once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_restart_keeps_jobs_nodes_and_running_processes() {
    let mut cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    let done = cluster.submit("name: done\nkind: command\nnodes: 1\ncommand: ['true']\n").await.unwrap();
    cluster.wait_finished(&done.id, Duration::from_secs(20)).await.unwrap();

    let flag = cluster.dir.path().join("release");
    let yaml = format!(
        "name: long\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sh, -c, 'while [ ! -e {} ]; do sleep 0.05; done']\n",
        flag.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let before = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();

    cluster.kill_controller();
    cluster.start_controller().unwrap();
    cluster.wait_nodes_ready(&["node0".into(), "node1".into()], Duration::from_secs(20)).await.unwrap();

    // The restarted controller may show the job Starting until both agents
    // have reported their processes again; it must come back to Running.
    let after = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();
    let pids = |j: &cohort_proto::Job| j.processes.iter().map(|p| p.pid).collect::<Vec<_>>();
    assert_eq!(pids(&after), pids(&before), "the same processes, adopted");
    assert_eq!(state(&cluster.job(&done.id).await.unwrap()), JobState::Succeeded);

    // The adopted job still finishes normally.
    std::fs::write(&flag, "").unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_fails_its_jobs_and_stops_the_other_nodes() {
    let mut cluster =
        Cluster::start_with(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)], &["--node-ttl", "2s"])
            .await
            .unwrap();
    let job = cluster
        .submit("name: lost\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sleep, '600']\n")
        .await
        .unwrap();
    let running = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();
    cluster.kill_agent(1);
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(job.reason.contains("node1") && job.reason.contains("lost"), "{}", job.reason);
    let node0 = job.processes.iter().find(|p| p.node_name == "node0").unwrap();
    assert!(node0.stopped_by_agent, "{node0:?}");
    // node1's agent is gone, so its rank is orphaned until fencing (a later
    // issue) exists; node0's must be gone now.
    let node0_pid = running.processes.iter().find(|p| p.node_name == "node0").unwrap().pid;
    assert!(nix::sys::signal::killpg(nix::unistd::Pid::from_raw(node0_pid as i32), None).is_err());
    for pid in processes_of_job(&job.id) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spawn_failure_and_missing_workdir_fail_the_job_with_the_reason() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    let job = cluster
        .submit("name: nope\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [/nonexistent/binary]\n")
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(job.reason.contains("/nonexistent/binary"), "{}", job.reason);

    let job = cluster
        .submit(
            "name: nodir\nkind: command\nnodes: 2\ngpus_per_node: 1\nworkdir: /nonexistent/dir\ncommand: ['true']\n",
        )
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed);
    assert!(job.reason.contains("workdir /nonexistent/dir does not exist"), "{}", job.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_rank_launch_gives_each_process_its_rank() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 2), NodeSpec::loopback(1, 2)]).await.unwrap();
    let job = cluster
        .submit(
            "name: ranks\nkind: command\nnodes: 2\ngpus_per_node: 2\nlaunch: per-rank\n\
             command: [sh, -c, 'echo rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE node=$NODE_RANK gpus=$CUDA_VISIBLE_DEVICES \
             local_world=$LOCAL_WORLD_SIZE group=$GROUP_RANK']\n",
        )
        .await
        .unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
    let out = cluster.cli(&["logs", &job.id]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (rank, local, node) in [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)] {
        let want = format!("rank={rank} local={local} world=4 node={node} gpus=0,1 local_world=2 group={node}");
        assert!(text.contains(&want), "missing {want:?} in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_past_its_time_limit_is_stopped_failed_and_not_restarted() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    let job = cluster
        .submit(
            "name: limited\nkind: command\nnodes: 2\ngpus_per_node: 1\ntime_limit: 2s\nstop_grace: 2s\n\
             restart: {max_restarts: 3, backoff: 100ms}\ncommand: [sleep, '60']\n",
        )
        .await
        .unwrap();
    let running = cluster
        .wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running && j.live_processes == 2)
        .await
        .unwrap();
    assert_eq!(running.time_limit_ms, 2000);
    let status = cluster.cli(&["status", &job.id]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("time_limit 2s,") && text.contains("left"), "status shows the limit and time left:\n{text}");

    // Every process gone, a few seconds after the limit (not after sleep's 60 s).
    let job = cluster.wait_finished(&job.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
    let failure = job.failure.clone().unwrap();
    assert_eq!(failure.cause, "time_limit", "{failure:?}");
    assert!(failure.message.contains("time_limit 2s"), "{}", failure.message);
    assert!(job.reason.contains("not restarted"), "{}", job.reason);
    // The limit counts from the attempt's placement (as Slurm's from the
    // allocation), not from Running: staging and the ranks' start count.
    let ran_ms = job.finished_unix_ms - job.attempts[0].started_unix_ms;
    assert!(ran_ms >= 2000, "stopped {ran_ms} ms after its placement, before its limit");
    assert!(live_groups(&running).is_empty(), "no process of the job is left: {:?}", live_groups(&running));
    assert_eq!((job.attempt, job.attempts.len()), (1, 1), "no new attempt");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_job_files_are_refused_naming_file_field_and_line() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nkind: command\nnodes: two\ncommand: [x]\n").unwrap();
    let out = cluster.cli(&["plan", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.yaml:3") && err.contains("nodes"), "{err}");

    let out = cluster.cli(&["submit", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let jobs = cluster.cli(&["jobs", "-o", "json"]);
    assert!(!String::from_utf8_lossy(&jobs.stdout).contains("bad-"), "an invalid job must not be stored");

    let out = cluster.cli(&["plan", "/nonexistent/job.yaml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read job file /nonexistent/job.yaml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_controller_gracefully() {
    let mut cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let status = cluster.stop_controller().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(cluster.controller_log().contains("controller stopped"));
}

/// The verbs an `sbatch`/`srun` user reaches for: an inline command, flags
/// over a job file, an offline check, and `jobs` filters (issue 16, finding 7).
#[tokio::test(flavor = "multi_thread")]
async fn run_inline_override_a_file_validate_offline_and_filter_jobs() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let dir = cluster.dir.path().to_str().unwrap().to_owned();
    // `cohort run -N 2 ... -- CMD`: a two-node command job in the given directory, its output printed.
    let out = cluster.cli(&[
        "run",
        "-N",
        "2",
        "--gpus-per-node",
        "1",
        "--env",
        "GREETING=hi",
        "--workdir",
        &dir,
        "--follow",
        "--",
        "sh",
        "-c",
        "echo $GREETING from $NODE_RANK in $(pwd)",
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
    for rank in 0..2 {
        assert!(printed.contains(&format!("hi from {rank} in {dir}")), "{printed}");
    }

    // Flags over a file: the file says 1 node, WHO=file; the flags win.
    let file = cluster.dir.path().join("over.yaml");
    std::fs::write(
        &file,
        "name: over\nkind: command\nnodes: 1\nenv:\n  WHO: file\ncommand: [sh, -c, 'echo who=$WHO']\n",
    )
    .unwrap();
    let out = cluster.cli(&[
        "submit",
        "--nodes",
        "2",
        "-e",
        "WHO=flag",
        "--name",
        "flagged",
        "--wait",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jobs = cluster.cli(&["jobs", "--name", "flagged", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    let flagged = &listed["jobs"][0];
    assert_eq!((flagged["nodes"].as_u64(), listed["jobs"].as_array().unwrap().len()), (Some(2), 1), "{listed}");
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", flagged["id"].as_str().unwrap()]).stdout).to_string();
    assert_eq!(logs.matches("who=flag").count(), 2, "{logs}");

    // A failing job, then the filters.
    let out = cluster.cli(&["run", "--name", "broken", "--wait", "--", "false"]);
    assert_eq!(out.status.code(), Some(1));
    let jobs = cluster.cli(&["jobs", "--state", "failed"]);
    let table = String::from_utf8_lossy(&jobs.stdout);
    assert!(table.contains("broken-") && !table.contains("flagged-") && !table.contains("sh-"), "{table}");
    let jobs = cluster.cli(&["jobs", "--limit", "1", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);
    assert!(listed["jobs"][0]["id"].as_str().unwrap().starts_with("broken-"), "{listed}");
    let out = cluster.cli(&["jobs", "--state", "done"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a job state"));

    // Offline: no controller at all.
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nkind: command\nnodes: two\ncommand: [x]\n").unwrap();
    let out = std::process::Command::new(cohort_tests::bin("cohort"))
        .args(["--controller", "127.0.0.1:1", "validate", file.to_str().unwrap(), bad.to_str().unwrap()])
        .output()
        .unwrap();
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{said}{err}");
    assert!(said.contains("over.yaml: ok: command job \"over\""), "{said}");
    assert!(err.contains("bad.yaml:3: nodes:") && err.contains("expected a whole number"), "{err}");
}
