//! Ranks run as the node's unprivileged rank-user, read back from the rank's
//! own /proc entry, and a job that asks for root on a node that does not
//! allow root ranks is refused, naming the job's `user` field.
//!
//! Needs root (to create the user and to switch to it), as CI and this
//! repository's machines run the tests.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, children_of, state};

const RANK_USER: &str = "cohort-test-rank";

/// The uid of `RANK_USER`, created (a system user, no home) when absent.
fn rank_user_uid() -> u32 {
    cohort_tests::system_user(RANK_USER)
}

/// The `Uid:` line of /proc/<pid>/status: real, effective, saved, filesystem.
fn uids_of(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

fn node_with_rank_user() -> NodeSpec {
    let mut node = NodeSpec::loopback(0, 1);
    // The harness allows root ranks (tests run as root); this node does not.
    node.env = vec![("COHORT_ALLOW_ROOT_RANKS".into(), "false".into())];
    node.extra_args = vec!["--rank-user".into(), RANK_USER.into(), "--allowed-rank-users".into(), "*".into()];
    node
}

#[tokio::test(flavor = "multi_thread")]
async fn ranks_run_as_the_rank_user_and_root_is_refused() {
    if !nix_is_root() {
        panic!("this test switches users: run it as root (as CI does)");
    }
    let uid = rank_user_uid();
    assert_ne!(uid, 0, "{RANK_USER} must not be root");
    let cluster = Cluster::start(vec![node_with_rank_user()]).await.unwrap();

    let job = cluster
        .submit(
            "name: as-rank-user\nkind: command\nnodes: 1\ngpus_per_node: 1\nstop_grace: 1s\ncommand: [sleep, '60']\n",
        )
        .await
        .unwrap();
    let running =
        cluster.wait_job(&job.id, Duration::from_secs(30), |j| !j.processes.is_empty() && j.processes[0].pid > 0).await;
    let running = running.unwrap();
    assert_eq!(state(&running), JobState::Running, "{}", running.reason);
    // The reported pid leads the process group: the shim, whose child is the
    // rank (exec-as execs the program in place, so it is `sleep` itself).
    let shim = running.processes[0].pid;
    let deadline = Instant::now() + Duration::from_secs(10);
    let rank = loop {
        if let Some(pid) = children_of(shim).into_iter().find(|&pid| comm(pid) == "sleep") {
            break pid;
        }
        assert!(Instant::now() < deadline, "no `sleep` under the shim {shim}: {:?}", children_of(shim));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let uids = uids_of(rank);
    assert_ne!(uids_of(shim), vec![uid; 4], "the shim itself stays root (it must signal and reap the rank)");
    assert_eq!(uids, vec![uid; 4], "the rank's real, effective, saved and filesystem uids");
    assert!(uids.iter().all(|&u| u != 0));
    cluster.cli(&["cancel", &job.id]);
    cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();

    let job = cluster
        .submit("name: as-root\nkind: command\nnodes: 1\ngpus_per_node: 1\nuser: root\ncommand: [sleep, '60']\n")
        .await
        .unwrap();
    let refused = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&refused), JobState::Failed, "{}", refused.reason);
    let said = format!("{} {:?}", refused.reason, refused.attempts);
    assert!(said.contains("`user: root`") && said.contains("allow-root-ranks"), "{said}");
    assert!(cohort_tests::processes_of_job(&job.id).is_empty(), "nothing of the refused job runs");
}

/// Issue 14 finding 2: the package probe and the ms-swift argument check run the
/// job's `python:` (anything the submitter names) as the job's user, with the
/// job's environment, never as the agent's root.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_runs_the_jobs_python_as_the_rank_user_with_the_jobs_env() {
    if !nix_is_root() {
        panic!("this test switches users: run it as root (as CI does)");
    }
    let uid = rank_user_uid();
    let cluster = Cluster::start(vec![node_with_rank_user()]).await.unwrap();
    let whoami = cohort_tests::repo_root().join("tests/payloads/fake-python/whoami");
    let yaml = format!(
        "name: probe-as-user\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\npython: {}\n\
         env: {{PROBE_MARK: from-the-job}}\n\
         megatron:\n  swift_version: 3\n  load: /nonexistent/model\n  dataset: [/nonexistent/train.jsonl]\n",
        whoami.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    // whoami reports no torch: the launch is refused, with the table.
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
    let report = &job.preflight.as_ref().unwrap().nodes[0];
    let check = |name: &str| report.checks.iter().find(|c| c.name == name).map(|c| c.value.clone());
    let uids = format!("{uid} {uid} {uid} {uid}");
    assert_eq!(
        check("uids").as_deref(),
        Some(uids.as_str()),
        "the probe's real, effective, saved, fs uids: {report:?}"
    );
    assert_eq!(check("mark").as_deref(), Some("from-the-job"), "the job's env reaches the probe: {report:?}");
    let out = std::process::Command::new("id").args(["-G", RANK_USER]).output().unwrap();
    let groups = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(check("groups").as_deref(), Some(groups.as_str()), "the user's groups, not root's: {report:?}");
    let argcheck = report.swift_argcheck.as_ref().unwrap();
    assert_eq!(argcheck.ms_swift, format!("uids {uids}"), "the argument check runs as the user too: {argcheck:?}");
}

fn nix_is_root() -> bool {
    cohort_tests::is_root()
}

/// A library that appends "<uid> <euid> <exe>" to $PRELOAD_OUT in every process that loads it.
const PRELOAD_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    const char *out = getenv("PRELOAD_OUT");
    if (!out) return;
    FILE *f = fopen(out, "a");
    if (!f) return;
    char exe[512] = {0};
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) < 0) exe[0] = '?';
    fprintf(f, "%u %u %s\n", (unsigned)getuid(), (unsigned)geteuid(), exe);
    fclose(f);
}
"#;

/// Issue 14, finding 1: `env: {LD_PRELOAD: ...}` ran the library as root in the shim and
/// its exec helper, which started with the job's environment and dropped privileges only
/// afterwards. Now only the rank itself, already the rank user, may load it.
#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_ld_preload_never_runs_as_root() {
    if !nix_is_root() {
        panic!("this test switches users: run it as root (as CI does)");
    }
    let uid = rank_user_uid();
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let source = dir.path().join("preload.c");
    let library = dir.path().join("preload.so");
    let marks = dir.path().join("marks.txt");
    std::fs::write(&source, PRELOAD_C).unwrap();
    // Writable by every process that may load the library, whatever its user.
    std::fs::write(&marks, "").unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o666)).unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .expect("a C compiler (cc) builds the test's LD_PRELOAD library");
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cluster = Cluster::start(vec![node_with_rank_user()]).await.unwrap();
    let job = cluster
        .submit(&format!(
            "name: preload\nkind: command\nnodes: 1\ngpus_per_node: 1\nenv:\n  LD_PRELOAD: {}\n  PRELOAD_OUT: {}\ncommand: [/bin/true]\n",
            library.display(),
            marks.display()
        ))
        .await
        .unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
    let marks = std::fs::read_to_string(&marks).unwrap_or_default();
    let loads: Vec<(u32, u32, &str)> = marks
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, ' ');
            (f.next().unwrap().parse().unwrap(), f.next().unwrap().parse().unwrap(), f.next().unwrap_or(""))
        })
        .collect();
    assert!(
        loads.iter().any(|(_, _, exe)| exe.ends_with("/true")),
        "the rank gets the job's environment, LD_PRELOAD included: {marks}"
    );
    assert!(
        loads.iter().all(|&(real, effective, _)| real == uid && effective == uid),
        "every process that loaded the job's LD_PRELOAD runs as the rank user {uid}, none as root: {marks}"
    );
}
