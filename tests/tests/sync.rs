//! `sync:` (issue 16, SkyPilot's `workdir`): `cohort submit` packs the job
//! file's directory, uploads it, and every node unpacks it as the job's
//! working directory. A real loopback cluster (TLS, the CLI's own upload),
//! real agents unpacking as the job's user; and the refusals: no archive, an
//! archive the submitter did not upload, one too large, a forwarded upload
//! through a standby controller (etcd).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use cohort_proto::{GetLeaderRequest, JobFile, JobState, SubmitJobRequest, SyncArchive, SyncChunk};
use cohort_tests::etcd::EtcdCluster;
use cohort_tests::{Cluster, NodeSpec, state};
use sha2::{Digest, Sha256};

const WITHIN: Duration = Duration::from_secs(60);

/// A project directory: a job file that syncs it, a script, data, and files
/// that `.gitignore`/`.cohortignore`/`exclude` keep out.
fn project(root: &Path, job: &str) -> std::path::PathBuf {
    let dir = root.join("project");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("ckpt")).unwrap();
    std::fs::write(dir.join("data/input.txt"), "rows from the laptop\n").unwrap();
    std::fs::write(dir.join("ckpt/big.pt"), "weights").unwrap();
    std::fs::write(dir.join("secret.env"), "TOKEN=1").unwrap();
    std::fs::write(dir.join("run.log"), "old noise").unwrap();
    std::fs::write(dir.join(".cohortignore"), "secret.env\n").unwrap();
    std::fs::write(dir.join(".gitignore"), "*.log\n").unwrap();
    // Fails its first attempt after leaving a file beside the synced copy; on
    // the second, a node whose first rank got that far finds the file (the
    // copy is unpacked once per job and node). The other node's first rank
    // may be stopped before it gets there: the gang ends when one rank fails.
    let script = "#!/bin/sh\nset -e\necho \"cwd $(pwd)\"\necho \"data $(cat data/input.txt)\"\n\
                  for f in secret.env run.log ckpt/big.pt; do [ ! -e \"$f\" ] || { echo \"leaked $f\"; exit 9; }; done\n\
                  if [ \"$COHORT_ATTEMPT\" = 1 ]; then touch attempt-1.done; echo first; exit 3; fi\n\
                  kept=no; [ ! -e attempt-1.done ] || kept=yes\n\
                  echo \"second on $COHORT_NODE_NAME, kept $kept, synced $(cat .cohort-sync)\"\n";
    std::fs::write(dir.join("train.sh"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("train.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("job.yaml"), job).unwrap();
    dir
}

const JOB: &str = "name: synced\nkind: command\nnodes: 2\ngpus_per_node: 1\n\
                   sync: {dir: ., exclude: [ckpt/]}\n\
                   restart: {max_restarts: 1, backoff: 200ms}\n\
                   command: [./train.sh]\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_synced_directory_runs_on_every_node_without_what_is_ignored() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    let dir = project(cluster.dir.path(), JOB);
    let out = cluster.cli(&["submit", "--wait", dir.join("job.yaml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    // job.yaml, train.sh, data/, data/input.txt, .gitignore, .cohortignore: not ckpt/, secret.env, run.log.
    assert!(stderr.contains("sync: uploaded") && stderr.contains("6 files and directories"), "{stderr}");

    let jobs = cluster
        .client()
        .await
        .unwrap()
        .list_jobs(cohort_proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let job = jobs.iter().find(|j| j.name == "synced").unwrap();
    assert_eq!(state(job), JobState::Succeeded, "{}", job.reason);
    assert_eq!(job.attempt, 2, "{}", job.reason);
    let sha = job.file.as_ref().and_then(|f| f.sync.as_ref()).map(|s| s.sha256.clone()).unwrap();
    let logs = String::from_utf8_lossy(&cluster.cli(&["logs", &job.id]).stdout).into_owned();
    for node in ["node0", "node1"] {
        let cwd = cluster.dir.path().join(node).join("jobs").join(&job.id).join("workdir");
        assert!(logs.contains(&format!("cwd {}", cwd.display())), "{node} ran elsewhere:\n{logs}");
    }
    // The failed node's rank, one node's in the first attempt and both in the second.
    assert!(logs.matches("data rows from the laptop").count() >= 3, "{logs}");
    assert!(!logs.contains("leaked"), "{logs}");
    for node in ["node0", "node1"] {
        assert!(logs.contains(&format!("second on {node}, kept ")), "{node} did not run again:\n{logs}");
    }
    assert_eq!(logs.matches(&format!("synced {sha}")).count(), 2, "{logs}");
    // The node whose rank failed the first attempt left its file and ran again beside it.
    let failed = stderr
        .split("attempt 1 failed (rank_failed): node ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no failed node named:\n{stderr}"));
    assert!(logs.contains(&format!("second on {failed}, kept yes")), "{failed}:\n{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_are_checked_at_submit_and_at_upload() {
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--max-sync-bytes", "2KiB"]).await.unwrap();
    let dir = project(cluster.dir.path(), &JOB.replace("nodes: 2", "nodes: 1"));
    let yaml = std::fs::read_to_string(dir.join("job.yaml")).unwrap();
    let file = |sync: Option<SyncArchive>| JobFile {
        yaml: yaml.clone(),
        source_name: "job.yaml".into(),
        base_dir: dir.display().to_string(),
        sync,
        ..Default::default()
    };
    let mut client = cluster.client().await.unwrap();
    let submit = |f: JobFile| SubmitJobRequest { file: Some(f), ..Default::default() };

    let err = client.submit_job(submit(file(None))).await.unwrap_err();
    assert!(err.message().contains("upload that directory first (UploadSync)"), "{}", err.message());
    let never_uploaded = SyncArchive { sha256: "ab".repeat(32), bytes: 10, ..Default::default() };
    let err = client.submit_job(submit(file(Some(never_uploaded)))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("is not on this controller"), "{}", err.message());

    // Over --max-sync-bytes: refused before a byte is stored.
    let big = vec![7u8; 4096];
    let header = SyncArchive { sha256: format!("{:x}", Sha256::digest(&big)), bytes: 4096, ..Default::default() };
    let chunks = vec![SyncChunk { archive: Some(header), data: Vec::new() }, SyncChunk { archive: None, data: big }];
    let err = client.upload_sync(tokio_stream::iter(chunks)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    assert!(err.message().contains("--max-sync-bytes"), "{}", err.message());
    // The CLI's upload of the small project fits; a wrong digest does not.
    let bytes = b"not really a tar".to_vec();
    let lie = SyncArchive { sha256: "cd".repeat(32), bytes: bytes.len() as u64, ..Default::default() };
    let chunks = vec![SyncChunk { archive: Some(lie), data: bytes }];
    let err = client.upload_sync(tokio_stream::iter(chunks)).await.unwrap_err();
    assert!(err.message().contains("hash to"), "{}", err.message());
    // `cohort plan` packs (uploads nothing) and says where the copy goes.
    let out = cluster.cli(&["plan", dir.join("job.yaml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("each node unpacks it into <agent --work-dir>/jobs/<job id>/workdir"), "{stderr}");

    let out = cluster.cli(&["submit", dir.join("job.yaml").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Bad directories and patterns fail in the CLI, before any upload, naming the field.
    let submit_stderr_contains = |want: &str, name: &str, yaml: String| {
        std::fs::write(dir.join(name), yaml).unwrap();
        let out = cluster.cli(&["submit", dir.join(name).to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && stderr.contains(want), "{name}: {stderr}");
    };
    submit_stderr_contains(
        "nope: No such file or directory (os error 2) (`sync:` names a directory relative to the job file)",
        "elsewhere.yaml",
        yaml.replace("dir: .", "dir: ./nope"),
    );
    submit_stderr_contains(
        " is not a directory (`sync:` names a directory relative to the job file",
        "file.yaml",
        yaml.replace("dir: .", "dir: train.sh"),
    );
    submit_stderr_contains(
        " is not a gitignore pattern: ",
        "pattern.yaml",
        yaml.replace("exclude: [ckpt/]", "exclude: ['a[']"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_through_a_standby_controller_reaches_the_leader() {
    let etcd = EtcdCluster::start(1);
    let store = etcd.url();
    let cluster = Cluster::start_ha(vec![NodeSpec::loopback(0, 1)], 2, &["--store", &store]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    let mut standby = None;
    for i in 0..2u16 {
        let mut c = cluster.client_of(i).await.unwrap();
        if !c.get_leader(GetLeaderRequest {}).await.unwrap().into_inner().is_leader {
            standby = Some(c);
        }
    }
    let mut standby = standby.expect("one of two controllers is a standby");
    let dir = project(cluster.dir.path(), &JOB.replace("nodes: 2", "nodes: 1"));
    let packed = cohort_cli::sync::pack(
        &dir,
        &cohort_shared::spec::sync::SyncSpec { dir: ".".into(), exclude: vec!["ckpt/".into()] },
        1 << 20,
    )
    .unwrap();
    let mut chunks = vec![SyncChunk { archive: Some(packed.archive.clone()), data: Vec::new() }];
    chunks.extend(packed.bytes.chunks(100).map(|c| SyncChunk { archive: None, data: c.to_vec() }));
    let stored = standby.upload_sync(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    assert_eq!(stored.sha256, packed.archive.sha256);
    let file = JobFile {
        yaml: std::fs::read_to_string(dir.join("job.yaml")).unwrap(),
        source_name: "job.yaml".into(),
        base_dir: dir.display().to_string(),
        sync: Some(stored),
        ..Default::default()
    };
    let job = standby.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }).await.unwrap();
    let job = job.into_inner().job.unwrap();
    let done = cluster.wait_finished(&job.id, WITHIN).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{}", done.reason);
}
