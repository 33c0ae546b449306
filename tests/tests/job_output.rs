//! Hostile job output against the real binaries (issue 14 findings 10, 12,
//! 15): a rank printing 200 MB without a newline, a rank printing terminal
//! escapes and NUL bytes, and the controller's memory over many chatty jobs.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cohort_proto::{JobState, ListNodesRequest, NodeState};
use cohort_tests::{Cluster, NodeSpec, state};

fn write_job(cluster: &Cluster, name: &str, script: &str) -> String {
    let yaml = format!("name: {name}\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sh, -c, '{script}']\n");
    let path = cluster.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// Watches the nodes until dropped: true once any node was seen other than Ready.
async fn watch_nodes(cluster: &Cluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let seen_unready = Arc::new(AtomicBool::new(false));
    let flag = seen_unready.clone();
    let mut client = cluster.client().await.unwrap();
    let task = tokio::spawn(async move {
        loop {
            if let Ok(nodes) = client.list_nodes(ListNodesRequest {}).await
                && nodes.into_inner().nodes.iter().any(|n| n.state != NodeState::Ready as i32)
            {
                flag.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (seen_unready, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_megabytes_without_a_newline_leave_the_session_up_and_show_a_gap() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    let file = write_job(
        &cluster,
        "flood",
        // A quiet second refills the budget: the last line must pass it.
        "head -c 200000000 /dev/zero | tr \"\\\\000\" x; echo; sleep 1; echo after-the-flood",
    );
    let (seen_unready, watcher) = watch_nodes(&cluster).await;

    // Before: one LogBatch of 1000 pieces of 64 KiB (64 MiB) broke the session
    // at the controller's 16 MiB limit, and submit --wait never returned.
    let out = cluster
        .cli_within(&["submit", "--wait", &file], Duration::from_secs(240))
        .await
        .expect("submit --wait did not return within 240 s");
    watcher.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Succeeded"), "{stdout}");
    assert!(stdout.contains("bytes of output dropped"), "submit --wait does not tell of the gap: {stdout}");
    assert!(
        !seen_unready.load(Ordering::SeqCst),
        "the node was seen not Ready (Suspect or Lost: heartbeats stopped) during the flood"
    );
    let log = cluster.controller_log();
    assert!(!log.contains("agent stream broke"), "the agent's session broke:\n{log}");

    let id = stdout.split_whitespace().nth(1).unwrap().trim_end_matches(':').to_string();
    let job = cluster.job(&id).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded);
    // 8 MiB of burst and about 1 MiB/s pass; nearly all of the rest is dropped.
    assert!(job.output_dropped_bytes > 150_000_000, "dropped {} bytes", job.output_dropped_bytes);

    let logs = cluster.cli_within(&["logs", &id], Duration::from_secs(120)).await.unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("bytes of output dropped on node node0 process 0"), "no gap record in cohort logs");
    assert!(logs.contains("[cohort: line over 64 KiB, continued on the next line]"), "no split marker");
    let longest = logs.lines().map(str::len).max().unwrap();
    assert!(longest < 65 * 1024, "a line of {longest} bytes reached cohort logs");
    let tail = cluster.cli(&["logs", &id, "--tail", "1"]);
    assert_eq!(String::from_utf8_lossy(&tail.stdout).trim(), "node0/0 | after-the-flood");
    let status = String::from_utf8_lossy(&cluster.cli(&["status", &id]).stdout).into_owned();
    assert!(status.contains("bytes dropped by the agents"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn escapes_and_nul_bytes_are_stripped_unless_raw() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1)]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    let yaml = "name: colours\nkind: command\nnodes: 1\ngpus_per_node: 1\n\
                command: [sh, -c, 'printf \"\\033[31mred\\033[0m nul:\\000: bell\\007 osc:\\033]0;title\\007 end\\n\"']\n";
    let job = cluster.submit(yaml).await.unwrap();
    let job = cluster.wait_finished(&job.id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(state(&job), JobState::Succeeded);

    let shown = cluster.cli(&["logs", &job.id]);
    assert!(shown.status.success());
    assert_eq!(String::from_utf8_lossy(&shown.stdout), "node0/0 | red nul:: bell osc: end\n");
    let raw = cluster.cli(&["logs", &job.id, "--raw"]).stdout;
    assert_eq!(raw, b"node0/0 | \x1b[31mred\x1b[0m nul:\0: bell\x07 osc:\x1b]0;title\x07 end\n");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The figure of finding 10: the controller's RSS before and after
/// COHORT_OUTPUT_JOBS jobs (default 20) that each print 100 MB of 100-byte
/// lines, with the agent's --output-rate COHORT_OUTPUT_RATE (default 0: no
/// limit, so that every byte goes through the controller). Run with
/// `cargo test -p cohort-tests --test job_output -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a figure, not a check: prints the controller's RSS over many chatty jobs"]
async fn controller_rss_over_many_jobs_of_100_mb_output() {
    let jobs: usize = std::env::var("COHORT_OUTPUT_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let rate = std::env::var("COHORT_OUTPUT_RATE").unwrap_or_else(|_| "0".into());
    let mut node = NodeSpec::loopback(0, 1);
    node.extra_args = vec!["--output-rate".into(), rate.clone()];
    let cluster = Cluster::start(vec![node]).await.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], Duration::from_secs(30)).await.unwrap();
    let pid = cluster.controller_pid().unwrap();
    // 100 MB of 100-byte lines.
    let file = write_job(
        &cluster,
        "chatty",
        "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -c 100000000",
    );
    let before = rss_kib(pid);
    let started = std::time::Instant::now();
    let mut dropped = 0;
    for i in 0..jobs {
        let out =
            cluster.cli_within(&["submit", "--wait", "-o", "json", &file], Duration::from_secs(600)).await.unwrap();
        assert!(out.status.success(), "job {i}: {}", String::from_utf8_lossy(&out.stderr));
        let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        dropped += job["output_dropped_bytes"].as_u64().unwrap_or(0);
    }
    let after = rss_kib(pid);
    let logs_dir = cluster.dir.path().join("controller").join("logs");
    let on_disk: u64 = std::fs::read_dir(&logs_dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    println!(
        "{jobs} jobs x 100 MB of output, agent --output-rate {rate}, in {:.0} s: controller RSS {} MiB before, \
         {} MiB after; {} MiB of log records on the controller's disk, {} MiB dropped by the agent (budget or full queue)",
        started.elapsed().as_secs_f64(),
        before / 1024,
        after / 1024,
        on_disk >> 20,
        dropped >> 20
    );
}
