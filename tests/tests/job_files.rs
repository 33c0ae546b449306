//! Issue 14, findings 5, 6 and 14: what a job names (its `stage:` sources,
//! its datasets, its `shared_paths`) is touched only as the job's user, never
//! as the agent's root: a source the user cannot read is refused and nothing
//! of it shows in `cohort status`; a FIFO or `/dev/zero` as a dataset fails
//! the job in seconds while the agent stays Ready and stops on SIGTERM; a
//! shared path under /etc is not created.
//!
//! Needs root (to create the user and to switch to it), as CI runs the tests.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, repo_root, state};
use sha2::{Digest, Sha256};

const RANK_USER: &str = "cohort-test-rank";

fn node_with_rank_user(i: usize) -> NodeSpec {
    let mut node = NodeSpec::loopback(i, 1);
    node.env = vec![("COHORT_ALLOW_ROOT_RANKS".into(), "false".into())];
    node.extra_args = vec![
        "--rank-user".into(),
        RANK_USER.into(),
        "--python".into(),
        repo_root().join("tests/payloads/fake-python/good").display().to_string(),
    ];
    node
}

/// A cluster whose directory the rank user may traverse (not list), as a
/// node's work dir must be for its ranks to reach their staged inputs.
async fn cluster(nodes: usize) -> (Cluster, u32) {
    assert!(cohort_tests::is_root(), "this test creates a user and switches to it: run it as root (as CI does)");
    let uid = cohort_tests::system_user(RANK_USER);
    let cluster = Cluster::start((0..nodes).map(node_with_rank_user).collect()).await.unwrap();
    chmod(cluster.dir.path(), 0o711);
    (cluster, uid)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What the job said: its reason and each attempt's decisive lines.
fn said(job: &cohort_proto::Job) -> String {
    format!("{} {:?}", job.reason, job.attempts)
}

fn status_text(cluster: &Cluster, id: &str) -> String {
    let out = cluster.cli(&["status", id]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Every regular file under `dir` whose content is `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            found.extend(files_holding(&entry.path(), needle));
        } else if kind.is_file() && std::fs::read(entry.path()).is_ok_and(|b| b == needle) {
            found.push(entry.path());
        }
    }
    found
}

fn command_job(name: &str, extra: &str, command: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\nstop_grace: 1s\n{extra}\ncommand: {command}\n")
}

/// Finding 5: a stage source inside another user's 0700 directory, and a
/// symlink to /etc/shadow, are read as the job's user: refused, named, and
/// neither their size nor their digest shows anywhere; a source the user may
/// read is staged into that user's own 0700 cache, where the rank reads it.
#[tokio::test(flavor = "multi_thread")]
async fn stage_sources_are_read_as_the_jobs_user() {
    let (cluster, uid) = cluster(1).await;
    let base = cluster.dir.path().join("inputs");
    let (secret_dir, public_dir) = (base.join("secret"), base.join("public"));
    std::fs::create_dir_all(&secret_dir).unwrap();
    std::fs::create_dir_all(&public_dir).unwrap();
    chmod(&base, 0o755);
    chmod(&secret_dir, 0o700);
    chmod(&public_dir, 0o755);
    let secret = b"the root-only secret of finding 5\n".to_vec();
    let secret_file = secret_dir.join("weights.bin");
    std::fs::write(&secret_file, &secret).unwrap();
    chmod(&secret_file, 0o644);
    let shadow_link = public_dir.join("shadow");
    std::os::unix::fs::symlink("/etc/shadow", &shadow_link).unwrap();
    let shadow_digest = sha256_hex(&std::fs::read("/etc/shadow").unwrap());

    let started = Instant::now();
    for (source, digest) in [(&secret_file, sha256_hex(&secret)), (&shadow_link, shadow_digest)] {
        let extra = format!("stage: [{{name: input, source: {}}}]", source.display());
        let job = cluster.submit(&command_job("steal", &extra, "['true']")).await.unwrap();
        let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
        let refused = said(&job);
        assert!(refused.contains(&source.display().to_string()) && refused.contains("Permission denied"), "{refused}");
        let status = status_text(&cluster, &job.id);
        assert!(!status.contains(&digest), "the digest of {} shows in cohort status:\n{status}", source.display());
        assert!(job.staging.iter().all(|s| s.bytes_total == 0 && s.bytes_done == 0), "{:?}", job.staging);
        assert!(cohort_tests::processes_of_job(&job.id).is_empty(), "nothing of the refused job runs");
    }
    let cache = cluster.dir.path().join("node0/cache");
    assert_eq!(files_holding(&cache, &secret), Vec::<std::path::PathBuf>::new(), "the secret was copied");

    // A source the user may read: staged into its own cache, which only it can read.
    let public_file = public_dir.join("tokens.txt");
    std::fs::write(&public_file, "public tokens\n").unwrap();
    chmod(&public_file, 0o644);
    let extra = format!("stage: [{{name: input, source: {}}}]", public_file.display());
    let job = cluster.submit(&command_job("read", &extra, "[sh, -c, 'cat \"$COHORT_STAGED_INPUT\"']")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", said(&job));
    let user_cache = cache.join("users").join(uid.to_string());
    let meta = std::fs::metadata(&user_cache).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700), "{}", user_cache.display());
    let copies = files_holding(&user_cache, b"public tokens\n");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::metadata(&copies[0]).unwrap().uid(), uid, "written as the job's user");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
}

fn megatron_job(dataset: &Path) -> String {
    format!(
        "name: sft\nkind: megatron-sft\nnodes: 1\ngpus_per_node: 1\nworkdir: tests/payloads\nstop_grace: 1s\n\
         megatron:\n  swift_version: 3\n  program: [python3, fake_megatron.py]\n  load: Qwen3-8B-mcore\n  \
         dataset: [{}]\n  micro_batch_size: 1\n  global_batch_size: 1\n",
        dataset.display()
    )
}

fn is_running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": a zombie (Z) or a missing entry has stopped.
    stat.rfind(')').and_then(|i| stat[i + 2..].chars().next()).is_some_and(|s| s != 'Z' && s != 'X')
}

/// Finding 6: the dataset check runs as the job's user with limits. A FIFO
/// fails the job within seconds, naming it; a symlink to /dev/zero is no
/// regular file either, and one huge line runs into the memory limit; the
/// agent stays Ready, runs a later job, and stops promptly on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_dataset_fails_the_job_fast_and_the_agent_stays() {
    let (cluster, _) = cluster(1).await;
    let dir = cluster.dir.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    let fifo = dir.join("fifo.jsonl");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    let zero = dir.join("zero.jsonl");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let huge = dir.join("one-line.jsonl");
    // Sparse: 3 GiB of zero bytes and no newline, more than the check's 2 GiB.
    std::fs::File::create(&huge).unwrap().set_len(3 << 30).unwrap();
    chmod(&huge, 0o644);

    let cases = [
        (&fifo, "is a FIFO, not a regular file"),
        (&zero, "is a character device, not a regular file"),
        (&huge, "memory limit"),
    ];
    for (path, why) in cases {
        let started = Instant::now();
        let job = cluster.submit(&megatron_job(path)).await.unwrap();
        let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
        let refused = said(&job);
        assert!(refused.contains(&format!("dataset {}", path.display())) && refused.contains(why), "{refused}");
        assert!(started.elapsed() < Duration::from_secs(20), "{}: {:?}", path.display(), started.elapsed());
        eprintln!("{}: failed in {:?}: {}", path.display(), started.elapsed(), job.reason);
    }

    let node0 = vec!["node0".to_string()];
    cluster.wait_nodes_ready(&node0, Duration::from_secs(5)).await.unwrap();
    let job = cluster.submit(&command_job("after", "", "['true']")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", said(&job));

    // A FIFO check in flight (the old agent hung here) does not keep the agent from stopping.
    let _stuck = cluster.submit(&megatron_job(&fifo)).await.unwrap();
    let agent = cluster.agent_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (sent, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(15));
    while is_running(agent) {
        assert!(Instant::now() < deadline, "the agent did not stop within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the agent stopped {:?} after SIGTERM", sent.elapsed());
}

/// Finding 14: a shared path is created, and its marker written, as the
/// job's user: `/etc/...` is refused with the field named and nothing is
/// created; a directory the user may write is proven shared as before.
#[tokio::test(flavor = "multi_thread")]
async fn shared_paths_are_created_as_the_jobs_user() {
    let (cluster, uid) = cluster(2).await;
    let evil = format!("/etc/cohort-evil-{}", std::process::id());
    let job = "name: evil\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 1s\n";
    let job = cluster.submit(&format!("{job}shared_paths: [{evil}/deep]\ncommand: [true]\n")).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(30)).await.unwrap();
    let exists = Path::new(&evil).exists();
    let _ = std::fs::remove_dir_all(&evil);
    assert!(!exists, "{evil} was created");
    assert_eq!(state(&job), JobState::Failed, "{}", job.reason);
    let refused = said(&job);
    assert!(
        refused.contains(&format!("shared path {evil}/deep")) && refused.contains("as the job's user"),
        "{refused}"
    );
    assert!(
        refused.contains("Permission denied") && refused.contains("name a directory that user may write"),
        "{refused}"
    );

    let mine = cluster.dir.path().join("shared");
    std::fs::create_dir_all(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(uid), None).unwrap();
    let job = "name: fine\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 1s\n";
    let job = cluster.submit(&format!("{job}shared_paths: [{}/runs]\ncommand: [true]\n", mine.display())).await;
    let job = cluster.wait_finished(&job.unwrap().id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded, "{}", said(&job));
    assert_eq!(std::fs::metadata(mine.join("runs")).unwrap().uid(), uid, "created as the job's user");
}

/// The checkpoint search (restart, `cohort resume`, a pipeline's sft stage)
/// runs as the job's user: a job whose `save:` names another user's run
/// (here a root-owned directory the job's user can read, not write) never
/// gets that run's tracker rewritten. The old agent searched as root and
/// repointed the tracker from the half-written iteration 6 to 4.
#[tokio::test(flavor = "multi_thread")]
async fn the_checkpoint_search_never_rewrites_another_users_tracker() {
    let (cluster, _) = cluster(1).await;
    let root = cluster.dir.path();
    let save = root.join("someone-elses-run");
    for it in [2, 4] {
        let iter = save.join(format!("iter_{it:07}"));
        std::fs::create_dir_all(&iter).unwrap();
        for name in ["__0_0.distcp", "common.pt", "metadata.json", ".metadata"] {
            std::fs::write(iter.join(name), "stub").unwrap();
        }
    }
    std::fs::create_dir_all(save.join("iter_0000006")).unwrap();
    let tracker = save.join("latest_checkpointed_iteration.txt");
    std::fs::write(&tracker, "6").unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    chmod(&data, 0o755);
    let dataset = data.join("train.jsonl");
    std::fs::copy(repo_root().join("shared/tests/fixtures/datasets/messages-good.jsonl"), &dataset).unwrap();
    chmod(&dataset, 0o644);
    let yaml = megatron_job(&dataset).replace(
        "  global_batch_size: 1\n",
        &format!("  global_batch_size: 1\n  finetune: true\n  save: {}\n  save_interval: 2\n", save.display()),
    );
    let job = cluster.submit(&yaml).await.unwrap();
    let failed = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&failed), JobState::Failed, "the job's user cannot write {}: {}", save.display(), said(&failed));

    // Resume searches the save dir: readable, so checkpoint 4 is found, but
    // the tracker is the other user's and stays as it was.
    let out = cluster.cli(&["resume", &job.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(resumed.attempt, 2, "{}", said(&resumed));
    assert_eq!(std::fs::read_to_string(&tracker).unwrap(), "6", "the tracker was rewritten");
    assert!(!save.join("latest_checkpointed_iteration.txt.cohort-bak").exists());
    assert_eq!(std::fs::metadata(&tracker).unwrap().uid(), 0);
}

/// A job cancelled while its node is still preparing (here: the preflight
/// probe of an interpreter that never answers) takes its preparation down
/// with it. The old controller sent no stop to a node without processes, and
/// the old agent let the probe run to its 120 s timeout.
#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_preparing_job_stops_its_preparation() {
    let (cluster, _) = cluster(1).await;
    let dir = cluster.dir.path().join("slow");
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o777);
    let pid_file = dir.join("probe.pid");
    let python = dir.join("python");
    std::fs::write(&python, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pid_file.display())).unwrap();
    chmod(&python, 0o755);
    let dataset = dir.join("train.jsonl");
    std::fs::copy(repo_root().join("shared/tests/fixtures/datasets/messages-good.jsonl"), &dataset).unwrap();
    chmod(&dataset, 0o644);
    let yaml = format!("python: {}\n{}", python.display(), megatron_job(&dataset));
    let job = cluster.submit(&yaml).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) {
            break pid;
        }
        assert!(Instant::now() < deadline, "the probe never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state(&cluster.job(&job.id).await.unwrap()), JobState::Preparing);
    let out = cluster.cli(&["cancel", &job.id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cancelled, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(15));
    while is_running(pid) {
        assert!(Instant::now() < deadline, "the probe (pid {pid}) still runs 15 s after the cancel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the probe was stopped {:?} after the cancel", cancelled.elapsed());
    assert_eq!(state(&cluster.job(&job.id).await.unwrap()), JobState::Cancelled);
}
