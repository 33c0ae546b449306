//! The production control plane with real processes: fencing of a partitioned
//! agent, leader failover between two controllers on a real etcd, and an etcd
//! member lost under load.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use cohort_proto::{GetLeaderRequest, JobState, ListJobsRequest, ListNodesRequest, NodeState};
use cohort_tests::etcd::EtcdCluster;
use cohort_tests::{Cluster, NodeSpec, state};

fn stamp(dir: &Path, node: &str, job: &str, what: &str) -> Option<f64> {
    std::fs::read_to_string(dir.join(format!("{node}.{job}.{what}"))).ok().and_then(|s| s.trim().parse().ok())
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn timestamps_job(name: &str, nodes: usize, out: &Path) -> String {
    format!(
        "name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\nworkdir: tests/payloads\nstop_grace: 2s\n\
         command: [python3, timestamps.py, {}]\n",
        out.display()
    )
}

async fn wait_until(within: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_agent_fences_itself_and_attempts_never_overlap() {
    let mut nodes: Vec<NodeSpec> = (0..3).map(|i| NodeSpec::loopback(i, 1)).collect();
    for node in &mut nodes {
        node.extra_args = vec!["--fence-after".into(), "5s".into()];
    }
    nodes[2].partitionable = true;
    let cluster = Cluster::start_with(nodes, &["--node-ttl", "3s"]).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let job = cluster.submit(&timestamps_job("fenced", 3, out.path())).await.unwrap();
    cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();
    wait_until(Duration::from_secs(10), "every rank to start", async || {
        (0..3).all(|i| stamp(out.path(), &format!("node{i}"), &job.id, "start").is_some())
    })
    .await;

    let cut_at = now();
    for p in &cluster.partitions[2] {
        p.cut();
    }
    let failed = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Failed).await.unwrap();
    assert!(failed.reason.contains("node2") && failed.reason.contains("lost"), "{}", failed.reason);
    let detected = now() - cut_at;

    // The reachable nodes are stopped right away; the cut-off one by its own agent at its fence deadline.
    wait_until(Duration::from_secs(10), "node0 and node1 to stop", async || {
        stamp(out.path(), "node0", &job.id, "stop").is_some() && stamp(out.path(), "node1", &job.id, "stop").is_some()
    })
    .await;
    wait_until(Duration::from_secs(15), "node2 to fence its rank", async || {
        stamp(out.path(), "node2", &job.id, "stop").is_some()
    })
    .await;
    let fenced = stamp(out.path(), "node2", &job.id, "stop").unwrap() - cut_at;
    let others = stamp(out.path(), "node0", &job.id, "stop").unwrap() - cut_at;
    eprintln!(
        "figures: loss detected {detected:.1}s after the cut; other nodes stopped at {others:.1}s; node2 fenced at {fenced:.1}s"
    );
    assert!(fenced >= 3.0, "node2's agent stopped its rank after {fenced:.1}s, before it could know it was cut off");
    assert!(fenced <= 10.0, "node2's agent fenced only after {fenced:.1}s (--fence-after 5s)");

    let nodes = cluster.client().await.unwrap().list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let node2 = nodes.iter().find(|n| n.info.as_ref().unwrap().name == "node2").unwrap();
    assert_eq!(node2.state, NodeState::Lost as i32);
    let deadline = node2.fence_deadline_unix_ms as f64 / 1000.0;
    assert!(
        stamp(out.path(), "node2", &job.id, "stop").unwrap() <= deadline + 1.0,
        "fenced after the deadline the controller assumed"
    );

    // Healed: node2 is back, and the next run on all three nodes starts only
    // after every rank of the first was gone.
    for p in &cluster.partitions[2] {
        p.heal();
    }
    cluster.wait_nodes_ready(&["node0".into(), "node1".into(), "node2".into()], Duration::from_secs(30)).await.unwrap();
    std::fs::write(out.path().join("release"), "").unwrap();
    let second = cluster.submit(&timestamps_job("after", 3, out.path())).await.unwrap();
    let second = cluster.wait_finished(&second.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&second), JobState::Succeeded, "{}", second.reason);
    let first_gone =
        (0..3).map(|i| stamp(out.path(), &format!("node{i}"), &job.id, "stop").unwrap()).fold(0.0, f64::max);
    let second_began =
        (0..3).map(|i| stamp(out.path(), &format!("node{i}"), &second.id, "start").unwrap()).fold(f64::MAX, f64::min);
    assert!(second_began > first_gone, "the runs overlapped: {second_began} <= {first_gone}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standby_takes_over_and_the_job_keeps_its_processes() {
    let etcd = EtcdCluster::start(1);
    let store = etcd.url();
    let nodes: Vec<NodeSpec> = (0..3).map(|i| NodeSpec::loopback(i, 1)).collect();
    let mut cluster = Cluster::start_ha(nodes, 2, &["--store", &store, "--leader-ttl", "2s"]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into(), "node1".into(), "node2".into()], Duration::from_secs(30)).await.unwrap();

    let out = tempfile::tempdir().unwrap();
    // Submitted by `cohort submit --wait`, which must wait through the failover.
    let file = out.path().join("ha.yaml");
    let payloads = cohort_tests::repo_root().join("tests/payloads");
    let spec = timestamps_job("ha", 3, out.path())
        .replace("workdir: tests/payloads", &format!("workdir: {}", payloads.display()));
    std::fs::write(&file, spec).unwrap();
    let waiter = cluster.cli_command(&["submit", "--wait", file.to_str().unwrap()]).spawn().unwrap();
    let mut job = None;
    wait_until(Duration::from_secs(20), "the job to be submitted", async || {
        let Ok(mut c) = cluster.client().await else { return false };
        job = c.list_jobs(ListJobsRequest::default()).await.ok().and_then(|r| r.into_inner().jobs.into_iter().next());
        job.is_some()
    })
    .await;
    let job = job.unwrap();
    let before = cluster.wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running).await.unwrap();
    wait_until(Duration::from_secs(10), "output before the failover", async || {
        String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).contains("node2 tick 10")
    })
    .await;

    let leader_index = leader_index(&cluster).await;
    let survivor = 1 - leader_index;
    let killed_at = Instant::now();
    cluster.kill_controller_at(leader_index);
    let mut takeover = Duration::ZERO;
    wait_until(Duration::from_secs(10), "the standby to lead", async || {
        let Ok(mut c) = cluster.client_of(survivor as u16).await else {
            return false;
        };
        let leads = c.get_leader(GetLeaderRequest {}).await.map(|r| r.into_inner().is_leader).unwrap_or(false);
        takeover = killed_at.elapsed();
        leads
    })
    .await;
    eprintln!("figures: the standby led {:.2}s after the leader was killed", takeover.as_secs_f64());
    assert!(takeover < Duration::from_secs(5), "takeover took {takeover:?}");

    cluster.wait_nodes_ready(&["node0".into(), "node1".into(), "node2".into()], Duration::from_secs(30)).await.unwrap();
    let after =
        cluster.wait_job(&job.id, Duration::from_secs(20), |j| j.processes.iter().all(|p| p.pid > 0)).await.unwrap();
    assert_eq!(state(&after), JobState::Running, "{}", after.reason);
    let pids = |j: &cohort_proto::Job| j.processes.iter().map(|p| p.pid).collect::<Vec<_>>();
    assert_eq!(pids(&after), pids(&before), "the ranks were adopted, not restarted");

    std::fs::write(out.path().join("release"), "").unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).to_string();
    assert!(logs.contains("node2 tick 10"), "output from before the failover must survive it:\n{logs}");
    assert_eq!(done.attempts.len(), 1);
    let waited = tokio::time::timeout(Duration::from_secs(60), waiter.wait_with_output()).await.unwrap().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&waited.stdout), String::from_utf8_lossy(&waited.stderr));
    assert!(waited.status.success() && said.contains("Succeeded"), "`submit --wait` across the failover: {said}");
}

async fn leader_index(cluster: &Cluster) -> usize {
    for i in 0..2u16 {
        if let Ok(mut c) = cluster.client_of(i).await
            && c.get_leader(GetLeaderRequest {}).await.map(|r| r.into_inner().is_leader).unwrap_or(false)
        {
            return i as usize;
        }
    }
    panic!("no controller leads");
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_an_etcd_member_is_invisible_to_the_cli() {
    let mut etcd = EtcdCluster::start(3);
    let store = etcd.url();
    let nodes: Vec<NodeSpec> = (0..2).map(|i| NodeSpec::loopback(i, 1)).collect();
    let cluster = Cluster::start_ha(nodes, 1, &["--store", &store]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into(), "node1".into()], Duration::from_secs(30)).await.unwrap();
    let job = "name: small\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sh, -c, 'echo done']\n";
    let file = cluster.dir.path().join("small.yaml");
    std::fs::write(&file, job).unwrap();
    let mut ids = Vec::new();
    for round in 0..6 {
        if round == 3 {
            etcd.kill(1);
        }
        let out = cluster.cli(&["submit", "--wait", file.to_str().unwrap()]);
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        ids.push(String::from_utf8_lossy(&out.stdout).to_string());
    }
    let jobs = cluster.cli(&["jobs", "-o", "json"]);
    assert!(jobs.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    let states: Vec<&str> = listed["jobs"].as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!(states, vec!["Succeeded"; 6]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_changed_in_etcd_behind_the_leaders_back_is_taken_from_the_store() {
    use cohort_controller::store::{EtcdStore, Expect, Store};
    use prost::Message;
    let etcd = EtcdCluster::start(1);
    let cluster = Cluster::start_ha(vec![NodeSpec::loopback(0, 1)], 1, &["--store", &etcd.url()]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    // No node takes work: it stays Pending, and nothing rewrites its priority.
    assert!(cluster.cli(&["cordon", "node0"]).status.success());
    let job = cluster.submit("name: big\nkind: command\nnodes: 1\ncommand: ['true']\n").await.unwrap();

    let endpoints: Vec<String> = etcd.url().trim_start_matches("etcd://").split(',').map(String::from).collect();
    let store = EtcdStore::connect(&endpoints, "/cohort/").await.unwrap();
    let key = format!("jobs/{}", job.id);
    let stored = store.get(&key).await.unwrap().unwrap();
    let mut record = cohort_proto::JobRecord::decode(stored.value.as_slice()).unwrap();
    record.job.as_mut().unwrap().priority = 7;
    store.put(&key, record.encode_to_vec(), Expect::Revision(stored.revision)).await.unwrap();

    let seen = cluster.wait_job(&job.id, Duration::from_secs(10), |j| j.priority == 7).await.unwrap();
    assert_eq!(state(&seen), JobState::Pending);
}
