//! Jobs that wait for other jobs outside pipelines (`after:`, `cohort submit
//! --after`, Slurm's `--dependency`), on a real controller and two real
//! agents: a dependent job stays Pending with the job it waits for in its
//! reason while a node is free, starts only once the condition is met, and is
//! Cancelled with the reason once it can never be met; submit refuses an
//! unknown job and a condition already ruled out.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(60);

/// A one-node job that runs until `release` exists, then exits with `code`.
fn held(name: &str, release: &Path, code: u8) -> String {
    format!(
        "name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\n\
         command: [sh, -c, 'while [ ! -e {} ]; do sleep 0.1; done; exit {code}']\n",
        release.display()
    )
}

/// A one-node job that exits at once, with `after` lines appended.
fn quick(name: &str, extra: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [true]\n{extra}")
}

fn write(cluster: &Cluster, name: &str, yaml: &str) -> PathBuf {
    let path = cluster.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `cohort submit FILE ARGS`: the new job's id (its last stdout line).
fn submit_cli(cluster: &Cluster, file: &Path, args: &[&str]) -> String {
    let mut all = vec!["submit", file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = cluster.cli(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().last().unwrap().trim().to_owned()
}

async fn wait_reason(cluster: &Cluster, id: &str, reason: &str) -> Job {
    cluster.wait_job(id, WITHIN, |j| state(j) == JobState::Pending && j.reason == reason).await.unwrap()
}

async fn wait_ended(cluster: &Cluster, id: &str, want: JobState) -> Job {
    let job = cluster.wait_finished(id, WITHIN).await.unwrap();
    assert_eq!(state(&job), want, "{job:?}");
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn dependent_jobs_wait_start_after_their_job_and_are_cancelled_when_it_can_never_be_met() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let release = cluster.dir.path().join("release-first");
    let first = cluster.submit(&held("first", &release, 0)).await.unwrap();
    cluster.wait_job(&first.id, WITHIN, |j| state(j) == JobState::Running).await.unwrap();

    // By name on the command line (resolved to the id at submit), in the file, of each condition.
    let ok = submit_cli(&cluster, &write(&cluster, "ok", &quick("ok", "")), &["--after", "first"]);
    let any = cluster.submit(&quick("any", &format!("after: {}:any\n", first.id))).await.unwrap().id;
    let notok = cluster.submit(&quick("notok", &format!("after: [\"{}:notok\"]\n", first.id))).await.unwrap().id;
    // Node1 is free, yet none of them starts while `first` runs.
    let waiting = format!("waiting for job {} (Running)", first.id);
    for id in [&ok, &any, &notok] {
        let job = wait_reason(&cluster, id, &waiting).await;
        assert_eq!((job.attempt, job.started_unix_ms), (0, 0), "{job:?}");
    }
    let job = cluster.job(&ok).await.unwrap();
    assert_eq!((job.after[0].job.as_str(), job.after[0].condition.as_str()), (first.id.as_str(), "ok"));
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &ok]).stdout).into_owned();
    assert!(status.contains(&format!("after:     {}:ok", first.id)), "{status}");
    let json: serde_json::Value = serde_json::from_slice(&cluster.cli(&["status", &any, "-o", "json"]).stdout).unwrap();
    assert_eq!(json["after"], serde_json::json!([{"job": first.id, "condition": "any"}]), "{json}");

    std::fs::write(&release, "").unwrap();
    let first = wait_ended(&cluster, &first.id, JobState::Succeeded).await;
    for id in [&ok, &any] {
        let job = wait_ended(&cluster, id, JobState::Succeeded).await;
        assert!(job.running_unix_ms >= first.finished_unix_ms, "{job:?} started before {first:?} ended");
    }
    let job = wait_ended(&cluster, &notok, JobState::Cancelled).await;
    assert_eq!(
        job.reason,
        format!(
            "dependency never satisfied: job {0} succeeded, so it can never fail (after: {0}:notok); \
             submit it again without it",
            first.id
        )
    );
    assert_eq!(job.attempt, 0, "never placed: {job:?}");

    // A failure: afterok is cancelled, afternotok runs.
    let release = cluster.dir.path().join("release-broken");
    let broken = cluster.submit(&held("broken", &release, 3)).await.unwrap().id;
    let on_ok = cluster.submit(&quick("on-ok", &format!("after: {broken}\n"))).await.unwrap().id;
    let on_fail = cluster.submit(&quick("on-fail", &format!("after: {broken}:notok\n"))).await.unwrap().id;
    wait_reason(&cluster, &on_fail, &format!("waiting for job {broken} (Running)")).await;
    std::fs::write(&release, "").unwrap();
    wait_ended(&cluster, &broken, JobState::Failed).await;
    let job = wait_ended(&cluster, &on_ok, JobState::Cancelled).await;
    assert!(job.reason.contains(&format!("job {broken} failed, so it can never succeed")), "{}", job.reason);
    wait_ended(&cluster, &on_fail, JobState::Succeeded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_refuses_an_unknown_job_and_a_condition_already_ruled_out() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let done = cluster.submit(&quick("done", "")).await.unwrap();
    wait_ended(&cluster, &done.id, JobState::Succeeded).await;
    let file = write(&cluster, "late", &quick("late", ""));
    let file = file.to_str().unwrap();
    let refused = |args: &[&str]| {
        let mut all = vec!["submit", file];
        all.extend_from_slice(args);
        let out = cluster.cli(&all);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--after", "nope-99"]);
    assert!(
        err.contains(
            "job late: after: no job \"nope-99\"; name a job id that `cohort jobs` lists, e.g. `--after prep-3`"
        ),
        "{err}"
    );
    let err = refused(&["--after", &format!("{}:notok", done.id)]);
    assert!(
        err.contains(&format!(
            "job late: after: {0}:notok: job {0} succeeded, so it can never fail; wait on `:any`, or drop it",
            done.id
        )),
        "{err}"
    );
    // A condition that is not one: clap names the flag and the forms (exit 2, no connection).
    let out = cluster.cli(&["submit", file, "--after", "done:afterok"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"afterok\" is not a condition; write JOB, JOB:ok, JOB:any or JOB:notok"), "{err}");
    // Nothing was made by the refusals.
    let out = cluster.cli(&["jobs", "--name", "late"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("late-"), "{out:?}");
}
