//! Job arrays (`array:`, `cohort submit --array`, Slurm's `--array`) on a real
//! controller and two real agents: one submit makes a job per index with
//! COHORT_ARRAY_ID and COHORT_ARRAY_INDEX, `%N` keeps at most N running while
//! nodes are free, `cohort jobs --array` lists them, `cohort cancel ARRAY`
//! cancels them all.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(60);

/// An array element that writes its array id and index to `dir/out-INDEX`,
/// then runs until `dir/release` exists.
fn element_job(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "name: sweep\nkind: command\nnodes: 1\ngpus_per_node: 1\n\
         command: [sh, -c, 'echo \"$COHORT_ARRAY_ID $COHORT_ARRAY_INDEX\" > {dir}/out-$COHORT_ARRAY_INDEX; \
         while [ ! -e {dir}/release ]; do sleep 0.1; done']\n"
    )
}

fn run(cluster: &Cluster, args: &[&str]) -> (Option<i32>, String, String) {
    let out = cluster.cli(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_array_runs_a_job_per_index_within_its_limit_and_cancels_as_one() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let dir = cluster.dir.path().join("a");
    std::fs::create_dir_all(&dir).unwrap();
    let file = cluster.dir.path().join("sweep.yaml");
    std::fs::write(&file, element_job(&dir)).unwrap();
    let (code, stdout, stderr) = run(&cluster, &["submit", file.to_str().unwrap(), "--array", "0-3%1"]);
    assert_eq!(code, Some(0), "{stderr}");
    let array = stdout.trim().to_owned();
    assert!(stderr.contains(&format!("submitted job array {array}: 4 job(s)")), "{stderr}");

    // Two nodes are free, but %1 keeps the second element waiting.
    cluster.wait_job(&format!("{array}_0"), WITHIN, |j| state(j) == JobState::Running).await.unwrap();
    let second = cluster
        .wait_job(&format!("{array}_1"), WITHIN, |j| j.reason.starts_with("waiting for room in array"))
        .await
        .unwrap();
    assert_eq!(state(&second), JobState::Pending);
    assert_eq!(second.reason, format!("waiting for room in array {array}: at most 1 of its elements run at once (%1)"));
    assert_eq!(second.name, "sweep");

    std::fs::write(dir.join("release"), "").unwrap();
    let mut previous_end = 0;
    for index in 0..4 {
        let job = cluster.wait_finished(&format!("{array}_{index}"), WITHIN).await.unwrap();
        assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
        assert!(job.running_unix_ms >= previous_end, "element {index} ran beside the one before it: {job:?}");
        previous_end = job.finished_unix_ms;
        let out = std::fs::read_to_string(dir.join(format!("out-{index}"))).unwrap();
        assert_eq!(out.trim(), format!("{array} {index}"));
    }

    let (code, stdout, stderr) = run(&cluster, &["jobs", "--array", &array, "-o", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let jobs = doc["jobs"].as_array().unwrap();
    let indices: Vec<u64> = jobs.iter().map(|j| j["array_index"].as_u64().unwrap()).collect();
    assert_eq!(indices, [0, 1, 2, 3], "{doc}");
    assert!(jobs.iter().all(|j| j["array_id"] == array && j["array_size"] == 4 && j["array_max_running"] == 1));

    // An array id is not a job: said, with how to name one.
    let (code, _, stderr) = run(&cluster, &["status", &array]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("{array} is a job array: name one of its jobs, e.g. {array}_0")), "{stderr}");

    // Cancel by the array id: every element, running or pending.
    let dir = cluster.dir.path().join("b");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&file, format!("{}array: 0-2\n", element_job(&dir))).unwrap();
    let (_, stdout, stderr) = run(&cluster, &["submit", file.to_str().unwrap()]);
    let array = stdout.trim().to_owned();
    assert!(!array.is_empty(), "{stderr}");
    for index in 0..2 {
        cluster.wait_job(&format!("{array}_{index}"), WITHIN, |j| state(j) == JobState::Running).await.unwrap();
    }
    let (code, stdout, stderr) = run(&cluster, &["cancel", &array]);
    assert_eq!(code, Some(0), "{stderr}");
    for index in 0..3 {
        assert!(stdout.contains(&format!("job {array}_{index}: Cancelled")), "{stdout}");
        let job = cluster.wait_finished(&format!("{array}_{index}"), WITHIN).await.unwrap();
        assert_eq!(state(&job), JobState::Cancelled, "{job:?}");
    }
}

#[test]
fn a_bad_array_is_named_with_the_form_to_write() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("job.yaml");
    std::fs::write(&file, "name: a\nkind: command\nnodes: 1\ncommand: [true]\narray: 0-5000\n").unwrap();
    let out = std::process::Command::new(cohort_tests::bin("cohort"))
        .args(["validate", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("job.yaml:5: array: \"0-5000\": more than 1000 elements; split it into several arrays"),
        "{stderr}"
    );
    let out = std::process::Command::new(cohort_tests::bin("cohort"))
        .args(["submit", file.to_str().unwrap(), "--array", "3-1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the range 3-1 runs backwards; write 1-3"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_gives_each_element_one_combination_as_env() {
    let cluster = Cluster::start((0..2).map(|i| NodeSpec::loopback(i, 1)).collect()).await.unwrap();
    let dir = cluster.dir.path().display().to_string();
    let yaml = format!(
        "name: lr\nkind: command\nnodes: 1\ngpus_per_node: 1\narray: '%2'\nsweep:\n  LR: [1e-4, 3e-4]\n  SEED: [1, 2]\n\
         command: [sh, -c, 'echo \"$LR $SEED\" > {dir}/out-$COHORT_ARRAY_INDEX']\n"
    );
    let first = cluster.submit(&yaml).await.unwrap();
    assert_eq!((first.array_size, first.array_max_running), (4, 2), "{first:?}");
    let mut seen = Vec::new();
    for index in 0..4 {
        let job = cluster.wait_finished(&format!("{}_{index}", first.array_id), WITHIN).await.unwrap();
        assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
        seen.push(std::fs::read_to_string(cluster.dir.path().join(format!("out-{index}"))).unwrap().trim().to_owned());
    }
    // Numbers become their text, as in `env` (quote a value to keep its spelling).
    assert_eq!(seen, ["0.0001 1", "0.0001 2", "0.0003 1", "0.0003 2"]);
    // A swept name that env sets too: named, with the fix.
    let clash = yaml.replace("array: '%2'\n", "env: {LR: '1'}\n");
    let err = cluster.submit(&clash).await.unwrap_err().to_string();
    assert!(err.contains("sweep.LR: LR is set by Cohort or by `env`; sweep another name"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_of_an_array_waits_for_every_element_and_fails_if_one_does() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    let file = cluster.dir.path().join("exit.yaml");
    // Element i exits with code i: element 0 succeeds, element 1 fails.
    std::fs::write(&file, "name: exit\nkind: command\nnodes: 1\ncommand: [sh, -c, 'exit $COHORT_ARRAY_INDEX']\n")
        .unwrap();
    let out =
        cluster.cli_within(&["submit", file.to_str().unwrap(), "--array", "0-1", "--wait"], WITHIN).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let array = stderr.split_whitespace().nth(3).unwrap().trim_end_matches(':').to_owned();
    assert!(stdout.contains(&format!("job {array}_0: Succeeded")), "{stdout}");
    assert!(stdout.contains(&format!("job {array}_1: Failed")), "{stdout}");
    let out = cluster.cli_within(&["submit", file.to_str().unwrap(), "--array", "0", "--wait"], WITHIN).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
