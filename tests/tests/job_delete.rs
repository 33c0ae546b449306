//! `cohort delete` on a real controller and agent: a finished job's record,
//! output file and metrics go; a job still running is refused, naming `cohort
//! cancel`, and a refusal deletes nothing of the other jobs asked for.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(60);

fn said(out: &std::process::Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_are_deleted_with_their_output_and_live_ones_are_refused() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 2)]).await.unwrap();
    let done = cluster
        .submit(
            "name: done\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sh, -c, 'echo iteration 1/1 loss 0.5']\n",
        )
        .await
        .unwrap();
    let done = cluster.wait_finished(&done.id, WITHIN).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{done:?}");
    let log = cluster.data_dir().join("logs").join(format!("{}.log", done.id));
    assert!(log.exists(), "{} missing", log.display());
    let (held, release) = cluster.submit_held("held", 1).await.unwrap();

    // One live job among those named: nothing is deleted.
    let (code, stdout, stderr) = said(&cluster.cli(&["delete", &done.id, &held.id]));
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: job {0} is Running; only finished jobs are deleted: `cohort cancel {0}` first",
            held.id
        )),
        "{stderr}"
    );
    assert_eq!(state(&cluster.job(&done.id).await.unwrap()), JobState::Succeeded);
    assert!(log.exists());

    let (code, stdout, stderr) = said(&cluster.cli(&["delete", &done.id, "-o", "json"]));
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["deleted"], serde_json::json!([done.id]), "{doc}");
    assert!(!log.exists(), "{} still there", log.display());
    let (code, _, stderr) = said(&cluster.cli(&["status", &done.id]));
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("no job \"{}\"", done.id)), "{stderr}");
    let (_, stdout, _) = said(&cluster.cli(&["jobs"]));
    assert!(!stdout.contains(&done.id) && stdout.contains(&held.id), "{stdout}");

    // Once ended, the held job goes too.
    std::fs::write(&release, "").unwrap();
    cluster.wait_finished(&held.id, WITHIN).await.unwrap();
    let (code, stdout, stderr) = said(&cluster.cli(&["delete", "held"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), format!("deleted job {}", held.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_finished_jobs_past_their_age() {
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--retain-finished", "2s"]).await.unwrap();
    let (held, release) = cluster.submit_held("held", 1).await.unwrap();
    let done = cluster.submit("name: done\nkind: command\nnodes: 1\ncommand: [sh, -c, 'echo hi']\n").await.unwrap();
    let done = cluster.wait_finished(&done.id, WITHIN).await.unwrap();
    let log = cluster.data_dir().join("logs").join(format!("{}.log", done.id));
    assert!(log.exists(), "{} missing", log.display());
    // Gone once it ended 2 s ago (polled, with a deadline well past the age).
    let deadline = tokio::time::Instant::now() + WITHIN;
    while cluster.job(&done.id).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "job {} kept past --retain-finished", done.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = cohort_proto::now_unix_ms() - done.finished_unix_ms;
    assert!(gone >= 2000, "deleted {gone} ms after it ended, before its age");
    assert!(!log.exists(), "{} still there", log.display());
    // A running job is kept however old.
    assert_eq!(state(&cluster.job(&held.id).await.unwrap()), JobState::Running);
    std::fs::write(&release, "").unwrap();
}
