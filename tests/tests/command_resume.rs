//! A `command` job that declares `checkpoints:` resumes after a failure
//! (issue 16): the restart looks the newest complete checkpoint up in that
//! directory, and the next attempt is told where it is
//! (`COHORT_RESUME_FROM`, `COHORT_RESUME_ITERATION`); `cohort status` shows
//! the attempt resumed from it. A real loopback cluster and the simulated
//! trainer of the preemption tests, which crashes once after its second save.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(60);

fn trainer(dir: &std::path::Path, checkpoints_line: &str) -> String {
    with_restarts(dir, checkpoints_line, 1)
}

fn with_restarts(dir: &std::path::Path, checkpoints_line: &str, restarts: u32) -> String {
    format!(
        "name: resumer\nkind: command\nnodes: 1\ngpus_per_node: 1\nworkdir: tests/payloads\nstop_grace: 2s\n\
         {checkpoints_line}restart: {{max_restarts: {restarts}, backoff: 200ms}}\n\
         command: [python3, preempt_trainer.py]\n\
         env: {{STEPS: '16', STEP_S: '0.05', CKPT_EVERY: '5', FAIL_AT: '12', CKPT_DIR: '{ckpts}', LOG: '{log}'}}\n",
        ckpts = dir.join("ckpt").display(),
        log = dir.join("trainer.jsonl").display(),
    )
}

fn resumed_events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("trainer.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "resumed")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_job_with_checkpoints_is_told_where_to_resume_after_a_crash() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let dir = cluster.dir.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let ckpts = dir.join("ckpt");
    let job = cluster.submit(&trainer(&dir, &format!("checkpoints: {}\n", ckpts.display()))).await.unwrap();
    let done = cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Succeeded).await.unwrap();
    assert_eq!(done.attempt, 2, "one crash, one restart: {}", done.reason);
    assert_eq!(done.attempts[1].resumed_from.as_ref().map(|c| c.iteration), Some(10), "{:?}", done.attempts[1]);

    let resumed = resumed_events(&dir);
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert!(resumed[0]["cohort_from"].is_null(), "a fresh start is told nothing: {resumed:?}");
    assert_eq!(resumed[1]["cohort_iteration"], "10", "{resumed:?}");
    assert_eq!(resumed[1]["cohort_from"], ckpts.join("iter_0000010").display().to_string(), "{resumed:?}");
    assert_eq!(resumed[1]["iteration"], 10, "its own lookup agrees: {resumed:?}");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).into_owned();
    assert!(status.contains("iteration 10"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cohort_resume_starts_a_failed_command_job_from_its_newest_checkpoint() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let dir = cluster.dir.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let ckpts = dir.join("ckpt");
    // No restart: the crash after the second save fails the job.
    let job = cluster.submit(&with_restarts(&dir, &format!("checkpoints: {}\n", ckpts.display()), 0)).await.unwrap();
    cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Failed && j.live_processes == 0).await.unwrap();
    let out = cluster.cli(&["resume", &job.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let done = cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Succeeded).await.unwrap();
    assert_eq!(done.attempts[1].resumed_from.as_ref().map(|c| c.iteration), Some(10), "{:?}", done.attempts);
    let resumed = resumed_events(&dir);
    assert_eq!(resumed.last().unwrap()["cohort_iteration"], "10", "{resumed:?}");

    // Without checkpoints: refused, naming the field.
    let other = cluster.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let plain = cluster.submit(&with_restarts(&other, "", 0).replace("name: resumer", "name: plain")).await.unwrap();
    cluster.wait_job(&plain.id, WITHIN, |j| state(j) == JobState::Failed && j.live_processes == 0).await.unwrap();
    let out = cluster.cli(&["resume", &plain.id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("declares `checkpoints: /shared/dir`"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_must_be_absolute_and_only_on_command_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, trainer(dir.path(), "checkpoints: ckpt\n")).unwrap();
    let out = std::process::Command::new(cohort_tests::bin("cohort")).args(["validate"]).arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("checkpoints") && text.contains("must be an absolute path"),
        "{text}"
    );
}
