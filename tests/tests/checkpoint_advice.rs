//! `cohort status` shows a job's checkpoint interval next to Young/Daly's
//! optimum once the job has failed and its metrics show its saves: a real
//! cluster, the goodput benchmark's trainer (saves every 5 steps, each 0.4 s
//! against 0.05 s steps, each followed by Megatron-LM's save line on rank 0),
//! one rank killed.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, children_of, state};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[tokio::test]
async fn status_shows_the_checkpoint_interval_next_to_young_daly() {
    let cluster = Cluster::start(vec![NodeSpec::loopback(0, 1), NodeSpec::loopback(1, 1)]).await.unwrap();
    let dir = cluster.dir.path();
    let log = dir.join("goodput.jsonl");
    let yaml = format!(
        "name: advice\nkind: command\nnodes: 2\ngpus_per_node: 1\nworkdir: tests/payloads\nstop_grace: 2s\n\
         command: [python3, goodput_trainer.py]\nrestart: {{max_restarts: 2, backoff: 200ms}}\n\
         env: {{STEPS: '60', STEP_S: '0.05', CKPT_EVERY: '5', SAVE_S: '0.4', START_S: '0', LOAD_S: '0', \
         CKPT_DIR: '{}', GOODPUT_LOG: '{}'}}\n",
        dir.join("checkpoints").display(),
        log.display()
    );
    let job = cluster.submit(&yaml).await.unwrap();
    // Two saves made (at steps 5 and 10): then a rank dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"iteration\": 10, \"save_s\"")) {
        assert!(Instant::now() < deadline, "no second save: {:?}", std::fs::read_to_string(&log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = cluster.job(&job.id).await.unwrap();
    let shim = running.processes.iter().find(|p| p.node_rank == 0).unwrap().pid;
    let trainer = children_of(shim)
        .into_iter()
        .find(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(7).any(|w| w == b"goodput")))
        .unwrap();
    kill(Pid::from_raw(trainer as i32), Signal::SIGKILL).unwrap();
    let done = cluster.wait_finished(&job.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(state(&done), JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 2, "{:?}", done.attempts);

    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).into_owned();
    let line = status.lines().find(|l| l.starts_with("checkpoint:")).unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("every 5 iterations") && line.contains("1 failure(s)"), "{line}");
    // From rank 0's `successfully saved checkpoint` lines, not guessed from slow iterations.
    assert!(!line.contains("inferred"), "{line}");
    assert!(status.contains("Young/Daly: every"), "{status}");
}
