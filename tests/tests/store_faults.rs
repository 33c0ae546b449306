//! The controller's embedded store under faults (issue 14: 11, 13), against
//! the real controller binary: a full data disk (a small tmpfs, needs root;
//! skipped with the reason otherwise), a state file with a flipped byte, and a
//! job record that does not decode.
//!
//! The figure (how long the store takes to write again once space is freed)
//! is printed by `cargo test -p cohort-tests --test store_faults full_data_disk -- --nocapture`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cohort_tests::store_faults::{fill, healthz, job_ids, seq, wait_healthz, write_raw_record};
use cohort_tests::{Cluster, SparePort, Tmpfs, is_root};

/// The job file of a job that waits for a node (the test clusters have none).
fn job(name: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: ['true']\n")
}

/// A job whose record needs more room than the state file has spare.
fn big_job(name: &str) -> String {
    format!("{}# {}\n", job(name), "x".repeat(600 * 1024))
}

#[tokio::test(flavor = "multi_thread")]
async fn full_data_disk_refuses_submits_cleanly_and_recovers_when_space_is_freed() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs as the data dir needs root");
        return;
    }
    let http = SparePort::take();
    let mut cluster = Cluster::prepare(&["--insecure", "--http", &http.addr()]).unwrap();
    let data_dir = cluster.data_dir();
    let disk = match Tmpfs::mount(&data_dir, "8m") {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("skipped: {e:#}");
            return;
        }
    };
    cluster.start_controller().unwrap();
    wait_healthz(&http, 200, Duration::from_secs(20)).await;
    let first = cluster.submit(&job("before")).await.unwrap();

    let filler = data_dir.join("filler");
    fill(&filler);
    let refused = cluster.submit(&big_job("while-full")).await.expect_err("a submit on a full disk must fail");
    let message = format!("{refused:#}");
    assert!(message.contains("the controller's store cannot write"), "{message}");
    assert!(message.contains(&format!("free space on {}", data_dir.display())), "{message}");
    // Nothing of the refused job stays, in the API or in `cohort jobs`.
    assert_eq!(job_ids(&cluster).await, std::slice::from_ref(&first.id));
    let listed = cluster.cli(&["jobs"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains("while-full"), "{listed}");
    let (code, body) = healthz(&http).await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot write") && body.contains(&data_dir.display().to_string()), "{body}");

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_healthz(&http, 200, Duration::from_secs(30)).await;
    eprintln!("figure: the store wrote again {:?} after space was freed (no restart)", freed.elapsed());
    let second = cluster.submit(&big_job("after")).await.unwrap();
    assert!(seq(&second.id) > seq(&first.id), "{} after {}", second.id, first.id);

    // A restart finds exactly the jobs that were accepted, and hands out no id twice.
    assert!(cluster.stop_controller().is_some_and(|s| s.success()));
    cluster.start_controller().unwrap();
    wait_healthz(&http, 200, Duration::from_secs(20)).await;
    assert_eq!(job_ids(&cluster).await, [first.id.clone(), second.id.clone()]);
    let third = cluster.submit(&job("after-restart")).await.unwrap();
    assert!(seq(&third.id) > seq(&second.id), "{} after {}", third.id, second.id);
    // Unmounted first (lazily, the controller may still hold it): the cluster's directory then goes with it.
    drop(disk);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_byte_in_the_state_file_is_repaired_or_refused_by_name_never_a_panic() {
    let http = SparePort::take();
    let mut cluster = Cluster::prepare(&["--insecure", "--http", &http.addr()]).unwrap();
    cluster.start_controller().unwrap();
    wait_healthz(&http, 200, Duration::from_secs(20)).await;
    for i in 0..3 {
        cluster.submit(&job(&format!("kept{i}"))).await.unwrap();
    }
    assert!(cluster.stop_controller().is_some_and(|s| s.success()));
    let file = cluster.data_dir().join("state.redb");
    let pristine = std::fs::read(&file).unwrap();
    let len = pristine.len();
    // The header, its commit slots, the first pages (8192: a page type redb
    // panics on in debug builds; 12363, 16437: a key and the allocator state
    // it panicked on when this was written), the middle and the end.
    let offsets = [0, 9, 40, 200, 600, 4096, 8192, 12363, 16437, len / 2, 3 * len / 4, len - 1];
    let (mut served, mut refused) = (0, 0);
    for offset in offsets {
        let mut bytes = pristine.clone();
        bytes[offset] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let log_from = cluster.controller_log().len();
        cluster.start_controller().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            if let Some(status) = cluster.controller_exited() {
                break Some(status);
            }
            if matches!(healthz(&http).await, Some((200, _))) {
                break None;
            }
            assert!(Instant::now() < deadline, "offset {offset}: neither serving nor exited within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = cluster.controller_log()[log_from..].to_string();
        assert!(!log.contains("' panicked at"), "offset {offset}: {log}");
        match exited {
            Some(status) => {
                assert!(!status.success(), "offset {offset}: exited 0: {log}");
                assert!(log.contains(&format!("the state file {}", file.display())), "offset {offset}: {log}");
                assert!(log.contains(&format!("mv {}", file.display())), "offset {offset}: {log}");
                refused += 1;
            }
            None => {
                // Repaired (or the byte was unused): it serves, and lists its jobs.
                job_ids(&cluster).await;
                assert!(cluster.stop_controller().is_some_and(|s| s.success()), "offset {offset}");
                served += 1;
            }
        }
    }
    eprintln!("one flipped byte at {} offsets: {served} served, {refused} refused by name", offsets.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_job_record_is_quarantined_and_reported_and_the_rest_loads() {
    let http = SparePort::take();
    let mut cluster = Cluster::prepare(&["--insecure", "--http", &http.addr()]).unwrap();
    cluster.start_controller().unwrap();
    wait_healthz(&http, 200, Duration::from_secs(20)).await;
    let kept = vec![cluster.submit(&job("kept")).await.unwrap().id, cluster.submit(&job("also")).await.unwrap().id];
    assert!(cluster.stop_controller().is_some_and(|s| s.success()));

    // A raw write into the controller's redb file, as the store lays it out.
    write_raw_record(&cluster.data_dir().join("state.redb"), "jobs/broken-7", 1_000_000, &[0xffu8; 12]);
    let log_from = cluster.controller_log().len();
    cluster.start_controller().unwrap();
    let body = wait_healthz(&http, 200, Duration::from_secs(20)).await;
    assert!(body.contains("warning: store key jobs/broken-7: undecodable job record"), "{body}");
    assert!(body.contains("moved to quarantine/jobs/broken-7"), "{body}");
    assert_eq!(job_ids(&cluster).await, kept);
    let log = cluster.controller_log()[log_from..].to_string();
    assert!(log.contains("jobs/broken-7") && log.contains("quarantine/jobs/broken-7"), "{log}");

    // Moved aside for good: the next start loads clean.
    assert!(cluster.stop_controller().is_some_and(|s| s.success()));
    cluster.start_controller().unwrap();
    let body = wait_healthz(&http, 200, Duration::from_secs(20)).await;
    assert!(!body.contains("warning"), "{body}");
    assert_eq!(job_ids(&cluster).await, kept);
}
