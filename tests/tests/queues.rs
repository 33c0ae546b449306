//! Queues and backfill with real agents on loopback nodes of one fake GPU
//! each (issue 17): a short job backfills past a blocked head job and a long
//! one does not; a queue at its quota keeps its next job pending, saying so,
//! while another queue's job runs; `cohort queues`, `jobs --queue` and
//! `usage`; a queue changed through the admin API; fair-share usage across a
//! controller restart.
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

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], "cohort.v1", "{doc}");
    doc
}

/// The queue named `name` of `cohort queues -o json`.
fn queue_of(cluster: &Cluster, name: &str) -> serde_json::Value {
    let queues = json_of(&cluster.cli(&["queues", "-o", "json"]));
    let all = queues["queues"].as_array().unwrap().clone();
    all.into_iter().find(|q| q["spec"]["name"] == name).unwrap_or_else(|| panic!("no queue {name} in {queues}"))
}

fn two_queues(dir: &std::path::Path) -> std::path::PathBuf {
    let queues = dir.join("queues.toml");
    std::fs::write(
        &queues,
        "default = \"team-b\"\n\
         [[queue]]\nname = \"team-a\"\ngpus = 1\nborrow = false\nweight = 2\n\
         [[queue]]\nname = \"team-b\"\n",
    )
    .unwrap();
    queues
}

/// Two 1-GPU nodes under [`two_queues`]: a1 runs in team-a, a2 waits at team-a's quota.
async fn team_a_at_quota(dir: &std::path::Path) -> (Cluster, Job, Job) {
    let queues = two_queues(dir);
    let nodes = (0..2).map(|i| NodeSpec::loopback(i, 1)).collect();
    let cluster = Cluster::start_with(nodes, &["--queues", queues.to_str().unwrap()]).await.unwrap();
    let a1 = cluster.submit(&sleeper("a1", 1, "queue: team-a\n")).await.unwrap();
    running(&cluster, &a1).await;
    let a2 = cluster.submit(&sleeper("a2", 1, "queue: team-a\n")).await.unwrap();
    pending_with(&cluster, &a2, "queue team-a at quota 1/1 GPUs").await;
    (cluster, a1, a2)
}

#[tokio::test(flavor = "multi_thread")]
async fn cohort_queues_jobs_queue_and_usage_show_each_queues_jobs_and_gpu_hours() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a1, a2) = team_a_at_quota(dir.path()).await;
    let b1 = cluster.submit(&sleeper("b1", 1, "")).await.unwrap();
    running(&cluster, &b1).await;

    let a = queue_of(&cluster, "team-a");
    assert_eq!(a["spec"]["gpus"], 1);
    assert_eq!(a["spec"]["weight"], 2.0);
    assert_eq!(
        (a["used_gpus"].as_u64(), a["running_jobs"].as_u64(), a["pending_jobs"].as_u64()),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(a["borrowed_gpus"], 0, "zero values are present, as numbers");
    let b = queue_of(&cluster, "team-b");
    assert_eq!((b["is_default"].as_bool(), b["spec"]["gpus"].is_null()), (Some(true), true), "{b}");
    assert!((b["target_share"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9, "{b}");
    let table = String::from_utf8_lossy(&cluster.cli(&["queues"]).stdout).to_string();
    assert!(table.contains("BORROWED") && table.contains("team-b (default)"), "{table}");

    let jobs = json_of(&cluster.cli(&["jobs", "--queue", "team-a", "-o", "json"]));
    let ids: Vec<&str> = jobs["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [a1.id.as_str(), a2.id.as_str()]);
    assert_eq!(jobs["jobs"][0]["queue"], "team-a");
    let table = String::from_utf8_lossy(&cluster.cli(&["jobs", "--queue", "team-b"]).stdout).to_string();
    assert!(table.contains("QUEUE") && table.contains("team-b") && !table.contains(&a1.id), "{table}");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &a2.id]).stdout).to_string();
    assert!(status.contains("queue:     team-a"), "{status}");

    // GPU time accrues while a1 and b1 run.
    let usage = json_of(&cluster.cli(&["usage", "--by", "queue", "-o", "json"]));
    let rows = usage["rows"].as_array().unwrap();
    let queues: Vec<&str> = rows.iter().map(|r| r["queue"].as_str().unwrap()).collect();
    assert_eq!(queues, ["team-a", "team-b"], "{usage}");
    assert!(rows.iter().all(|r| r["gpu_hours"].as_f64().unwrap() > 0.0 && r["running_gpus"] == 1), "{usage}");
    assert_eq!(rows[0]["jobs"], 1, "a2 has not run: {usage}");
    let csv = cluster.cli(&["usage", "--by", "user", "-o", "csv", "--since", "1h"]);
    let text = String::from_utf8_lossy(&csv.stdout);
    assert!(text.starts_with("user,gpu_hours,jobs,attempts,running_gpus\n"), "{text}");
    let bad = cluster.cli(&["usage", "--since", "yesterday-ish"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since \"yesterday-ish\": give a duration"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_changed_through_the_admin_api_takes_effect_and_a_non_admin_is_refused() {
    use cohort_runtime::tls::Role;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, _a1, a2) = team_a_at_quota(dir.path()).await;

    let tls = cluster.tls.as_ref().unwrap();
    let mut alice = tls.client(&cluster.controller_url(0), Some(&tls.token(Role::Submit, "alice"))).await.unwrap();
    let spec = cohort_proto::QueueSpec { name: "team-a".into(), gpus: Some(2), ..Default::default() };
    let refused = alice.set_queue(spec).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().starts_with("SetQueue needs an admin token"), "{}", refused.message());
    let refused = alice.delete_queue(cohort_proto::DeleteQueueRequest { name: "team-a".into() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    let set = cluster.cli(&["queue", "set", "team-a", "--gpus", "2"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    running(&cluster, &a2).await;
    let a = queue_of(&cluster, "team-a");
    assert_eq!((a["spec"]["gpus"].as_u64(), a["spec"]["weight"].as_f64()), (Some(2), Some(2.0)), "the rest kept: {a}");

    let refused = cluster.cli(&["queue", "delete", "team-a"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("queue team-a has 2 active job(s)"));
    let made = cluster.cli(&["queue", "set", "team-c", "--weight", "3", "--users", "alice"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let c = cluster.submit(&sleeper("c", 1, "queue: team-c\n")).await.unwrap();
    assert_eq!(c.queue, "team-c", "a queue made through the API admits jobs at once");
}

/// Waits until a controller leads and answers `cohort queues`.
async fn answers(cluster: &Cluster) {
    let deadline = std::time::Instant::now() + WITHIN;
    while !cluster.cli(&["queues"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "no controller answered within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sets a queue through the API, runs a 7 s job, restarts the controller
/// (SIGKILL), and checks that its fair-share usage and the queue came back
/// from the store.
async fn usage_and_queues_survive_a_restart(mut cluster: Cluster) {
    answers(&cluster).await;
    let made = cluster.cli(&["queue", "set", "team-x", "--weight", "4"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // Longer than the 5 s between stores of the usage: one store falls while it runs.
    let job = cluster
        .submit("name: short\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sleep, '7']\n")
        .await
        .unwrap();
    let done = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded);
    let before = queue_of(&cluster, "default")["fair_share_usage"].as_f64().unwrap();
    assert!(before > 5.0, "7 GPU-seconds or so: {before}");

    cluster.kill_controller_at(0);
    cluster.restart_controller_at(0).unwrap();
    answers(&cluster).await;
    // No job runs now: whatever usage the controller has, it loaded.
    let after = queue_of(&cluster, "default")["fair_share_usage"].as_f64().unwrap();
    assert!(after > 4.0 && after <= before, "stored at least 5 s into the job: {after} (before the restart: {before})");
    assert_eq!(queue_of(&cluster, "team-x")["spec"]["weight"].as_f64(), Some(4.0), "the API's queue is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn fair_share_usage_and_queues_survive_a_controller_restart() {
    let cluster = Cluster::start((0..1).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    usage_and_queues_survive_a_restart(cluster).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fair_share_usage_and_queues_survive_a_controller_restart_on_etcd() {
    let etcd = cohort_tests::etcd::EtcdCluster::start(1);
    let nodes = (0..1).map(|i| NodeSpec::loopback(i, 1)).collect();
    let cluster = Cluster::start_ha(nodes, 1, &["--store", &etcd.url(), "--leader-ttl", "2s"]).await.unwrap();
    usage_and_queues_survive_a_restart(cluster).await;
    drop(etcd);
}
