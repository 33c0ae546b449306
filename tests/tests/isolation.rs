//! Per-job isolation on a node (issue 14, finding 9) with real processes,
//! real cgroups and real users: each job's processes run in a cgroup of their
//! own with the node's per-job limits, which stop a fork bomb and an
//! allocation with a reason that names the setting, and the cgroup is gone
//! once the job is.
//!
//! Needs root (cgroups, users), as CI and this repository's machines run the tests.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, children_of, state};

/// The job cgroup directory of `pid` in the hierarchy that has `controller`
/// (v1: /sys/fs/cgroup/<controller>/...; v2: the one unified hierarchy).
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unified = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let path = text
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let wanted = if unified { controllers.is_empty() } else { controllers.split(',').any(|c| c == controller) };
            wanted.then(|| path.trim_start_matches('/').to_owned())
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}: {text}"));
    if unified {
        PathBuf::from("/sys/fs/cgroup").join(path)
    } else {
        PathBuf::from("/sys/fs/cgroup").join(controller).join(path)
    }
}

fn said(job: &cohort_proto::Job) -> String {
    format!("{} {:?}", job.reason, job.attempts)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_cgroup_has_the_nodes_limits_stops_a_fork_bomb_and_an_allocation_and_goes_with_the_job() {
    assert!(cohort_tests::is_root(), "this test creates cgroups: run it as root (as CI does)");
    let mut node = NodeSpec::loopback(0, 1);
    node.extra_args =
        ["--job-pids-max", "24", "--job-memory-max", "128MiB", "--job-cpus", "1.5"].map(String::from).to_vec();
    let cluster = Cluster::start(vec![node]).await.unwrap();

    // A running job: its rank is in a cgroup of its own with the limits.
    let job = cluster
        .submit("name: held\nkind: command\nnodes: 1\ngpus_per_node: 1\nstop_grace: 1s\ncommand: [sleep, '60']\n")
        .await
        .unwrap();
    let running = cluster
        .wait_job(&job.id, Duration::from_secs(30), |j| !j.processes.is_empty() && j.processes[0].pid > 0)
        .await
        .unwrap();
    let shim = running.processes[0].pid;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The rank once it is `sleep`: before its exec the shim's child is still the shim's helper.
    let rank = loop {
        let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if let Some(pid) = children_of(shim).into_iter().find(|&pid| comm(pid).trim() == "sleep") {
            break pid;
        }
        assert!(Instant::now() < deadline, "no rank under the shim {shim}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pids = cgroup_dir(rank, "pids");
    let memory = cgroup_dir(rank, "memory");
    assert!(pids.display().to_string().contains("/cohort/"), "the rank is not in a job cgroup: {}", pids.display());
    assert!(!cgroup_dir(shim, "pids").starts_with(&pids), "the shim stays outside the job's limits");
    assert!(pids.display().to_string().ends_with(&format!("{}.1", job.id)), "{}", pids.display());
    assert_eq!(std::fs::read_to_string(pids.join("pids.max")).unwrap().trim(), "24");
    let memory_limit = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(memory.join(f)).ok())
        .unwrap();
    assert_eq!(memory_limit.trim(), (128u64 << 20).to_string());
    let cpu = cgroup_dir(rank, "cpu");
    let cpu_limit = std::fs::read_to_string(cpu.join("cpu.max"))
        .or_else(|_| std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")))
        .unwrap();
    assert!(cpu_limit.starts_with("150000"), "1.5 cores: {cpu_limit}");
    cluster.cli(&["cancel", &job.id]);
    cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.exists() || memory.exists() || cpu.exists() {
        assert!(Instant::now() < deadline, "the job's cgroup outlived the job: {}", pids.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A fork bomb stops at the pids limit, and the job says which setting stopped it.
    let bomb = cluster
        .submit(
            "name: bomb\nkind: command\nnodes: 1\ngpus_per_node: 1\n\
             command: [sh, -c, 'i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); done; wait']\n",
        )
        .await
        .unwrap();
    let bomb = cluster.wait_finished(&bomb.id, Duration::from_secs(60)).await.unwrap();
    println!("fork bomb: {}", said(&bomb));
    assert_eq!(state(&bomb), JobState::Failed, "{}", said(&bomb));
    assert!(said(&bomb).contains("job-pids-max") && said(&bomb).contains("24"), "{}", said(&bomb));

    // So does an allocation over the memory limit (dd's 512 MiB block is touched as it reads).
    let hog = cluster
        .submit(
            "name: hog\nkind: command\nnodes: 1\ngpus_per_node: 1\n\
             command: [dd, if=/dev/zero, of=/dev/null, bs=512M, count=1]\n",
        )
        .await
        .unwrap();
    let hog = cluster.wait_finished(&hog.id, Duration::from_secs(60)).await.unwrap();
    println!("allocation: {}", said(&hog));
    assert_eq!(state(&hog), JobState::Failed, "{}", said(&hog));
    assert!(said(&hog).contains("OOM killer") && said(&hog).contains("job-memory-max"), "{}", said(&hog));
    // The kernel's own line is kept because it names the job's cgroup: the
    // agent keeps only its launch's kills from the host's log (another
    // process's OOM kill must not make a rank's failure `kernel_oom`).
    let failure = hog.failure.clone().unwrap_or_default();
    assert_eq!(failure.cause, "kernel_oom", "{}", said(&hog));
    if std::fs::File::open("/dev/kmsg").is_ok() {
        let cgroup = format!("/{}.1,", hog.id);
        assert!(
            failure.decisive_lines.iter().any(|l| l.contains("oom-kill:") && l.contains(&cgroup)),
            "no kernel line naming {cgroup}: {:?}",
            failure.decisive_lines
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_cannot_see_another_users_jobs_processes_nor_read_its_secrets() {
    assert!(cohort_tests::is_root(), "this test creates users: run it as root (as CI does)");
    let (alice, bob) = ("cohort-test-iso-a", "cohort-test-iso-b");
    cohort_tests::system_user(alice);
    cohort_tests::system_user(bob);
    let mut node = NodeSpec::loopback(0, 1);
    node.extra_args = ["--allowed-rank-users", "*"].map(String::from).to_vec();
    let cluster = Cluster::start(vec![node]).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();

    let victim = cluster
        .submit(&format!(
            "name: victim\nkind: command\nnodes: 1\ngpus_per_node: 0\nuser: {bob}\nstop_grace: 1s\n\
             env:\n  BOB_TOKEN: {{value: hunter2-secret, secret: true}}\ncommand: [sleep, '120']\n"
        ))
        .await
        .unwrap();
    let victim_pid = cluster.rank_of(&victim.id).await;
    // The secret is in the victim's environment (so the check below means something).
    let environ = std::fs::read(format!("/proc/{victim_pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("hunter2-secret"));

    let snoop = format!(
        "echo $$ > {o}/self; ls /proc > {o}/ls; cat /proc/{victim_pid}/environ > {o}/environ 2> {o}/environ.err; \
         cat /proc/{victim_pid}/cmdline > {o}/cmdline 2>/dev/null; true",
        o = out.path().display()
    );
    let spy = cluster
        .submit(&format!(
            "name: spy\nkind: command\nnodes: 1\ngpus_per_node: 0\nuser: {alice}\ncommand: [sh, -c, {snoop:?}]\n"
        ))
        .await
        .unwrap();
    let spy = cluster.wait_finished(&spy.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&spy), JobState::Succeeded, "{}", spy.reason);

    let read = |name: &str| std::fs::read_to_string(out.path().join(name)).unwrap_or_default();
    let listed: Vec<String> = read("ls").lines().map(str::to_owned).collect();
    let own = read("self").trim().to_owned();
    assert!(listed.contains(&own), "the spy's /proc lists its own process {own}: {listed:?}");
    assert!(
        !listed.contains(&victim_pid.to_string()),
        "the spy lists the other user's job process {victim_pid} in /proc: {listed:?}"
    );
    assert!(!read("environ").contains("hunter2"), "the spy read the other job's secret");
    assert!(read("cmdline").is_empty(), "the spy read the other job's command line: {}", read("cmdline"));
    cluster.cli(&["cancel", &victim.id]);
    cluster.wait_finished(&victim.id, Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_may_run_jobs_only_as_the_users_it_is_allowed() {
    use cohort_proto::{JobFile, SubmitJobRequest};
    use cohort_runtime::tls::Role;
    let cluster =
        Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--allow-run-as", "carol=svc-train"]).await.unwrap();
    let tls = cluster.tls.as_ref().unwrap();
    let submit = |token: String, user: &'static str| {
        let url = cluster.url.clone();
        async move {
            let mut client = tls.client(&url, Some(&token)).await.unwrap();
            let line = if user.is_empty() { String::new() } else { format!("user: {user}\n") };
            let yaml = format!("name: as-{user}x\nkind: command\nnodes: 1\n{line}command: ['true']\n");
            let file = JobFile { yaml, source_name: "run-as.yaml".into(), ..JobFile::default() };
            client.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }).await
        }
    };
    let alice = tls.token(Role::Submit, "alice");
    let refused = submit(alice.clone(), "root-ish-other").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    for part in ["`user: root-ish-other`", "\"alice\"", "--allow-run-as alice=root-ish-other"] {
        assert!(refused.message().contains(part), "{part} missing from: {}", refused.message());
    }
    // The node's rank-user and the token's own name are always allowed; a rule adds more.
    submit(alice.clone(), "").await.unwrap();
    submit(alice.clone(), "alice").await.unwrap();
    assert_eq!(submit(alice, "svc-train").await.unwrap_err().code(), tonic::Code::PermissionDenied);
    submit(tls.token(Role::Submit, "carol"), "svc-train").await.unwrap();
    // Admin tokens are not bound (the nodes' allowed-rank-users still are).
    submit(tls.admin_token.clone(), "root-ish-other").await.unwrap();
}
