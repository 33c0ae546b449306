//! The Python client example (`examples/python-client`) against a real
//! controller and two agents on loopback, over TLS with a token as a real
//! cluster requires: it submits a pipeline of command stages, prints the
//! events and stage transitions it follows, the training metrics (checked
//! against what the Rust client gets from GetMetrics) and the final state,
//! and exits non-zero naming the stage when the pipeline fails.
//! `setup.sh` installs grpcio and grpcio-tools from PyPI into a venv the first time.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cohort_proto::{GetMetricsRequest, JobState, TrainingPoint};
use cohort_runtime::tls::{Role, files};
use cohort_tests::{Cluster, NodeSpec, repo_root, state};

fn example() -> PathBuf {
    repo_root().join("examples/python-client")
}

/// Makes the example's venv once (setup.sh is idempotent and locks against concurrent runs).
fn setup() {
    let out = Command::new("bash").arg(example().join("setup.sh")).output().unwrap();
    assert!(
        out.status.success(),
        "examples/python-client/setup.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the example against the cluster with `token`; stdout, stderr and the exit code.
async fn run_client(cluster: &Cluster, token: &str, job_file: &Path) -> (String, String, Option<i32>) {
    let tls = cluster.tls.as_ref().expect("the harness runs clusters with TLS");
    let mut command = Command::new(example().join(".venv/bin/python"));
    command
        .arg(example().join("cohort_client.py"))
        .args(["--controller", &cluster.url, "--token", token])
        .arg("--ca-cert")
        .arg(tls.dir.join(files::CA_CERT))
        .arg(job_file);
    for var in ["COHORT_CONTROLLER", "COHORT_CA_CERT", "COHORT_TOKEN", "COHORT_TOKEN_FILE", "COHORT_INSECURE"] {
        command.env_remove(var);
    }
    let out: Output = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&out.stdout), text(&out.stderr), out.status.code())
}

/// Three command stages across two nodes; `train` prints ms-swift 4.x metric
/// dicts on its last node; `check` fails with code 3 when `fail_check`.
/// Each case has its own job name: agents of clusters that run at once on this
/// machine tell their processes apart by job id and node name (the sweep of
/// escaped descendants), so two clusters must not run the same job id.
fn pipeline(out: &Path, fail_check: bool) -> String {
    let (name, exit) = if fail_check { ("pyclient-fail", "; exit 3") } else { ("pyclient-ok", "") };
    format!(
        r#"
name: {name}
kind: pipeline
output_dir: {out}
stages:
  - name: produce
    kind: command
    nodes: 2
    command: [sh, -c, 'mkdir -p ${{output}} && echo "rank $NODE_RANK" > ${{output}}/part-$NODE_RANK']
  - name: train
    kind: command
    nodes: 2
    depends_on: [produce]
    command: [python3, {metrics}, '10']
  - name: check
    kind: command
    depends_on: [train]
    command: [sh, -c, 'test "$(cat ${{stages.produce.output}}/part-* | wc -l)" -eq 2{exit}']
"#,
        out = out.display(),
        metrics = repo_root().join("tests/payloads/swift4_metrics.py").display(),
    )
}

fn two_nodes() -> Vec<NodeSpec> {
    (0..2).map(|i| NodeSpec::loopback(i, 2)).collect()
}

/// The job file, and the directory its stages write: a submit token's jobs run
/// as its submitter's own Unix account, which must be able to write there
/// (the cluster's directory is root's alone).
fn write_job(cluster: &Cluster, fail_check: bool) -> (PathBuf, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let out = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = cluster.dir.path().join("pipeline.yaml");
    std::fs::write(&path, pipeline(&out.path().join("out"), fail_check)).unwrap();
    (path, out)
}

/// The job id from "submitted job ID (pipeline) to ...".
fn submitted_id(stdout: &str) -> String {
    let line = stdout.lines().find(|l| l.starts_with("submitted job ")).unwrap_or_else(|| panic!("{stdout}"));
    line.split_whitespace().nth(2).unwrap().to_string()
}

/// The "metric JOB iteration=N ... loss=X ..." lines the example printed, as (job, iteration, loss).
fn printed_metrics(stdout: &str) -> Vec<(String, u64, Option<f64>)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("metric "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let job = words.next().unwrap().to_string();
            let field = |name: &str| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")));
            (job, field("iteration").unwrap().parse().unwrap(), field("loss").map(|v| v.parse().unwrap()))
        })
        .collect()
}

async fn rust_metrics(cluster: &Cluster, job: &str) -> Vec<TrainingPoint> {
    let mut client = cluster.client().await.unwrap();
    let mut stream =
        client.get_metrics(GetMetricsRequest { job: job.into(), follow: false }).await.unwrap().into_inner();
    let mut points = Vec::new();
    while let Some(point) = stream.message().await.unwrap() {
        points.push(point);
    }
    points
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_submits_a_pipeline_follows_it_and_prints_its_metrics() {
    tokio::task::spawn_blocking(setup).await.unwrap();
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let token = cluster.tls.as_ref().unwrap().token(Role::Submit, "alice");
    let (job_file, _out) = write_job(&cluster, false);
    let (stdout, stderr, code) = run_client(&cluster, &token, &job_file).await;
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(code, Some(0), "{all}");

    let id = submitted_id(&stdout);
    let job = cluster.job(&id).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{job:#?}");
    assert_eq!(job.file.as_ref().unwrap().submitted_by, "alice", "the token's user submitted it");
    // Events as they came, the stage transitions among them, the terminal state last.
    assert!(stdout.lines().any(|l| l.starts_with("event ") && l.contains(&format!("job {id} "))), "{all}");
    // "stage NAME: OLD -> NEW": the line number of the first transition of
    // `stage` into `to`, or past it: a stage that ran and ended before the
    // client's watch began shows first as "none -> Succeeded" in the
    // current-state event, and its Running could not be seen.
    let transition = |stage: &str, to: &str| {
        let prefix = format!("stage {stage}: ");
        let states: &[&str] = if to == "Running" { &["Running", "Succeeded"] } else { &[to] };
        let into = |l: &str, state: &str| l.ends_with(&format!(" -> {state}")) || l.contains(&format!(" -> {state} ("));
        stdout
            .lines()
            .position(|l| l.starts_with(&prefix) && states.iter().any(|state| into(l, state)))
            .unwrap_or_else(|| panic!("no transition of {stage} to {to} in {all}"))
    };
    for stage in ["produce", "train", "check"] {
        transition(stage, "Running");
        transition(stage, "Succeeded");
    }
    assert!(transition("produce", "Succeeded") < transition("train", "Running"), "{all}");
    assert!(transition("train", "Succeeded") < transition("check", "Running"), "{all}");
    assert!(stdout.lines().any(|l| l.starts_with("event ") && l.contains(&format!("job {id} Succeeded"))), "{all}");
    assert!(stdout.lines().last().unwrap_or_default().starts_with(&format!("final: job {id} Succeeded")), "{all}");

    // The metrics it printed are what the controller reports for the train stage's run.
    let run = format!("{id}.train");
    let expected: Vec<(String, u64, Option<f64>)> =
        rust_metrics(&cluster, &run).await.into_iter().map(|p| (run.clone(), p.iteration, p.loss)).collect();
    assert_eq!(expected.iter().map(|p| p.1).collect::<Vec<_>>(), [1, 5, 10], "{expected:?}");
    assert_eq!(printed_metrics(&stdout), expected, "{all}");
    assert!(stdout.contains(&format!("metrics {run}: 3 points")), "{all}");
    assert!(stdout.contains(&format!("metrics {id}.produce: 0 points")), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_exits_non_zero_naming_the_failed_stage() {
    tokio::task::spawn_blocking(setup).await.unwrap();
    let cluster = Cluster::start(two_nodes()).await.unwrap();
    let token = cluster.tls.as_ref().unwrap().token(Role::Submit, "alice");
    let (job_file, _out) = write_job(&cluster, true);
    let (stdout, stderr, code) = run_client(&cluster, &token, &job_file).await;
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(code, Some(1), "{all}");
    let id = submitted_id(&stdout);
    assert_eq!(state(&cluster.job(&id).await.unwrap()), JobState::Failed);
    assert!(stdout.lines().any(|l| l.starts_with("stage check: ") && l.contains(" -> Failed")), "{all}");
    assert!(stdout.lines().any(|l| l.starts_with(&format!("final: job {id} Failed: stage check failed:"))), "{all}");
    assert!(stderr.contains("failed stage: check") && stderr.contains("code 3"), "{all}");
    // The metrics of the stages that ran are printed all the same.
    assert_eq!(printed_metrics(&stdout).len(), 3, "{all}");

    // What cannot be submitted says why, with exit status 2.
    let (job_file, _out) = write_job(&cluster, false);
    let (_, stderr, code) = run_client(&cluster, "cohort1.bogus.token", &job_file).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused the token"), "{stderr}");
    let viewer = cluster.tls.as_ref().unwrap().token(Role::View, "bob");
    let (_, stderr, code) = run_client(&cluster, &viewer, &job_file).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused SubmitJob"), "{stderr}");
    let (_, stderr, code) = run_client(&cluster, &token, &cluster.dir.path().join("missing.yaml")).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read job file") && stderr.contains("missing.yaml"), "{stderr}");
    let bad = cluster.dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nkind: pipeline\nstages:\n  - {name: a, kind: comand}\n").unwrap();
    let (_, stderr, code) = run_client(&cluster, &token, &bad).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("bad.yaml was refused"), "{stderr}");
}
