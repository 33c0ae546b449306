//! Preemption that checkpoints first (issue 17), with real agents on one
//! loopback node of one fake GPU: a job of a queue without quota borrows the
//! GPU; a job of the queue that owns it reclaims it. The borrower is asked to
//! save (SIGUSR1), recorded `Preempted`, queued again behind the reclaimer,
//! and once the GPU is free it resumes from its newest complete checkpoint:
//! the one it saved on the signal (no work lost), or, when it ignores the
//! signal, the older periodic one (work lost, shown by `cohort status`); with
//! `preempt.checkpoint_wait`, the periodic one it writes after it was chosen.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, state};

const WITHIN: Duration = Duration::from_secs(60);

async fn owner_and_borrower_cluster(dir: &Path) -> Cluster {
    let queues = dir.join("queues.toml");
    std::fs::write(
        &queues,
        "default = \"shared\"\n[[queue]]\nname = \"team-a\"\ngpus = 1\n[[queue]]\nname = \"shared\"\n",
    )
    .unwrap();
    let cluster = Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--queues", queues.to_str().unwrap()]).await;
    let cluster = cluster.unwrap();
    cluster.wait_nodes_ready(&["node0".into()], WITHIN).await.unwrap();
    cluster
}

/// The borrower: the trainer with its checkpoints and event log under `dir`.
fn borrower(dir: &Path, save_on_signal: bool, ckpt: (u32, u32)) -> String {
    format!(
        "name: borrower\nkind: command\nnodes: 1\ngpus_per_node: 1\nworkdir: tests/payloads\nstop_grace: 2s\n\
         preempt: {{signal: SIGUSR1, grace: 3s, checkpoints: {ckpts}}}\n\
         command: [python3, preempt_trainer.py]\n\
         env: {{STEP_S: '0.1', CKPT_EVERY: '{every}', CKPT_MAX: '{max}', SAVE_ON_SIGNAL: '{save}', \
         CKPT_DIR: '{ckpts}', LOG: '{log}'}}\n",
        ckpts = dir.join("ckpt").display(),
        every = ckpt.0,
        max = ckpt.1,
        save = u8::from(save_on_signal),
        log = dir.join("trainer.jsonl").display(),
    )
}

const OWNER: &str =
    "name: owner\nkind: command\nnodes: 1\ngpus_per_node: 1\nqueue: team-a\nstop_grace: 1s\ncommand: [sleep, '300']\n";

/// The trainer's events (one JSON object a line).
fn events(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("trainer.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn event_iterations(dir: &Path, attempt: u64, event: &str) -> Vec<u64> {
    events(dir)
        .iter()
        .filter(|e| e["attempt"] == attempt && e["event"] == event)
        .map(|e| e["iteration"].as_u64().unwrap())
        .collect()
}

/// Waits until attempt `attempt` of the trainer logged step `iteration`.
async fn wait_step(dir: &Path, attempt: u64, iteration: u64) {
    let deadline = Instant::now() + WITHIN;
    while !event_iterations(dir, attempt, "step").contains(&iteration) {
        assert!(Instant::now() < deadline, "no step {iteration} of attempt {attempt}: {:?}", events(dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits the owner's job, checks the borrower is preempted and queued behind
/// it, then cancels the owner's job; returns the borrower once it runs again.
async fn reclaim_then_release(cluster: &Cluster, borrower: &Job) -> Job {
    let owner = cluster.submit(OWNER).await.unwrap();
    let owner = cluster.wait_job(&owner.id, WITHIN, |j| state(j) == JobState::Running).await.unwrap();
    let waiting = cluster
        .wait_job(&borrower.id, WITHIN, |j| state(j) == JobState::Pending && j.reason.starts_with("preempted by job"))
        .await
        .unwrap();
    assert!(
        waiting.reason.starts_with(&format!("preempted by job {} (queue team-a reclaiming quota)", owner.id)),
        "{}",
        waiting.reason
    );
    let first = &waiting.attempts[0];
    assert_eq!(first.state, JobState::Preempted as i32, "{first:?}");
    assert!(waiting.failure.is_none(), "a preemption is no failure: {:?}", waiting.failure);
    assert!(cluster.cli(&["cancel", &owner.id]).status.success());
    cluster.wait_job(&borrower.id, WITHIN, |j| state(j) == JobState::Running && j.attempt == 2).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_borrower_that_saves_on_the_signal_resumes_from_that_save_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = owner_and_borrower_cluster(dir.path()).await;
    // No periodic checkpoint: only the save on the signal can be resumed from.
    let job = cluster.submit(&borrower(dir.path(), true, (100_000, 0))).await.unwrap();
    wait_step(dir.path(), 1, 5).await;

    let resumed = reclaim_then_release(&cluster, &job).await;
    let saved = event_iterations(dir.path(), 1, "saved");
    assert_eq!(saved.len(), 1, "one save, on the signal: {:?}", events(dir.path()));
    let preemption = resumed.attempts[0].preemption.clone().unwrap();
    assert_eq!(preemption.iteration, Some(saved[0]), "{preemption:?}");
    assert_eq!(preemption.resumed_iteration, Some(saved[0]));
    assert_eq!(preemption.lost_iterations, Some(0));
    assert_eq!(resumed.attempts[1].resumed_from.as_ref().map(|c| c.iteration), Some(saved[0]));
    wait_step(dir.path(), 2, saved[0] + 1).await;
    assert_eq!(event_iterations(dir.path(), 2, "step")[0], saved[0] + 1, "the next attempt continues after the save");

    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).into_owned();
    assert!(
        status.contains("Preempted") && status.contains("preempted 1 time(s), 0 iteration(s) of work lost"),
        "{status}"
    );
    // Not counted against its restart budget: it had none.
    assert_eq!(resumed.attempts.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_borrower_that_ignores_the_signal_is_stopped_after_the_grace_and_loses_work() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = owner_and_borrower_cluster(dir.path()).await;
    // One periodic checkpoint, at step 5; it ignores SIGUSR1.
    let job = cluster.submit(&borrower(dir.path(), false, (5, 1))).await.unwrap();
    wait_step(dir.path(), 1, 8).await;

    let resumed = reclaim_then_release(&cluster, &job).await;
    assert_eq!(event_iterations(dir.path(), 1, "saved"), [5], "{:?}", events(dir.path()));
    let preemption = resumed.attempts[0].preemption.clone().unwrap();
    let at = preemption.iteration.unwrap();
    // It went on stepping through the grace until the SIGTERM.
    assert!(at >= 8, "{preemption:?}");
    assert_eq!(preemption.resumed_iteration, Some(5));
    assert_eq!(preemption.lost_iterations, Some(at - 5));
    wait_step(dir.path(), 2, 6).await;
    assert_eq!(event_iterations(dir.path(), 2, "step")[0], 6);

    let status = String::from_utf8_lossy(&cluster.cli(&["status", &job.id]).stdout).into_owned();
    assert!(status.contains(&format!("preempted 1 time(s), {} iteration(s) of work lost", at - 5)), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_borrower_that_cannot_save_on_a_signal_is_stopped_after_its_next_periodic_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = owner_and_borrower_cluster(dir.path()).await;
    // A checkpoint every 30 steps (3 s); SIGTERM (the default signal) ends it at once, unsaved.
    let yaml = borrower(dir.path(), false, (30, 1000))
        .replace("preempt: {signal: SIGUSR1, grace: 3s, ", "preempt: {checkpoint_wait: 20s, grace: 3s, ");
    assert!(yaml.contains("checkpoint_wait"), "{yaml}");
    let job = cluster.submit(&yaml).await.unwrap();
    wait_step(dir.path(), 1, 32).await;

    let owner = cluster.submit(OWNER).await.unwrap();
    // The owner waits while the borrower runs on to its next checkpoint.
    let owner_waits = cluster
        .wait_job(&owner.id, WITHIN, |j| j.reason.contains("to write their next checkpoint before they are preempted"))
        .await
        .unwrap();
    assert!(owner_waits.reason.contains(&job.id), "{}", owner_waits.reason);
    let running = cluster.job(&job.id).await.unwrap();
    assert_eq!(state(&running), JobState::Running, "{}", running.reason);
    assert!(running.reason.contains("waiting up to 20s for its next checkpoint"), "{}", running.reason);
    let chosen_at = *event_iterations(dir.path(), 1, "step").last().unwrap();

    let waiting = cluster
        .wait_job(&job.id, WITHIN, |j| state(j) == JobState::Pending && j.reason.starts_with("preempted by job"))
        .await
        .unwrap();
    let saved = event_iterations(dir.path(), 1, "saved");
    let newest = *saved.last().unwrap();
    assert!(
        newest > chosen_at,
        "stopped after a checkpoint newer than the preemption: {saved:?}, chosen at {chosen_at}"
    );
    assert!(waiting.reason.contains(&format!("after its checkpoint of iteration {newest}")), "{}", waiting.reason);
    assert!(cluster.cli(&["cancel", &owner.id]).status.success());
    let resumed = cluster.wait_job(&job.id, WITHIN, |j| state(j) == JobState::Running && j.attempt == 2).await.unwrap();
    let preemption = resumed.attempts[0].preemption.clone().unwrap();
    assert_eq!(preemption.resumed_iteration, Some(newest), "{preemption:?}");
    // Stopped within a poll of the save, not a save interval (30) later.
    let lost = preemption.lost_iterations.unwrap();
    assert!(lost < 15, "{preemption:?}");
    wait_step(dir.path(), 2, newest + 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_wait_outlives_a_controller_restart_and_counts_a_save_made_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = owner_and_borrower_cluster(dir.path()).await;
    // A checkpoint every 60 steps (6 s), none saved on a signal.
    let yaml = borrower(dir.path(), false, (60, 1000))
        .replace("preempt: {signal: SIGUSR1, grace: 3s, ", "preempt: {checkpoint_wait: 60s, grace: 3s, ");
    let job = cluster.submit(&yaml).await.unwrap();
    wait_step(dir.path(), 1, 62).await;
    let owner = cluster.submit(OWNER).await.unwrap();
    // The wait is stored with the job, its baseline (checkpoint 60) with it.
    let chosen = cluster
        .wait_job(&job.id, WITHIN, |j| j.checkpoint_wait.as_ref().is_some_and(|w| w.baseline_iteration.is_some()))
        .await
        .unwrap();
    let pending = chosen.checkpoint_wait.clone().unwrap();
    assert_eq!((pending.by_job.as_str(), pending.baseline_iteration), (owner.id.as_str(), Some(60)), "{pending:?}");

    // The controller is down while the borrower writes its next checkpoint.
    cluster.kill_controller();
    let deadline = Instant::now() + WITHIN;
    let saved_meanwhile = loop {
        if let Some(&it) = event_iterations(dir.path(), 1, "saved").iter().find(|&&it| it > 60) {
            break it;
        }
        assert!(Instant::now() < deadline, "no checkpoint after 60: {:?}", events(dir.path()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    cluster.start_controller().unwrap();
    // The restarted controller goes on with the stored wait: the checkpoint
    // written while it was down ends it (a new wait would take it as its
    // baseline and wait 6 s more for the next).
    let stopped = cluster.wait_job(&job.id, WITHIN, |j| j.reason.starts_with("preempted by job")).await.unwrap();
    assert!(
        stopped.reason.contains(&format!("after its checkpoint of iteration {saved_meanwhile} ")),
        "{}",
        stopped.reason
    );
    assert!(stopped.checkpoint_wait.is_none(), "{:?}", stopped.checkpoint_wait);
    let preemption = stopped.attempts[0].preemption.clone().unwrap();
    assert_eq!(preemption.by_job, owner.id, "{preemption:?}");
    cluster.wait_job(&owner.id, WITHIN, |j| state(j) == JobState::Running).await.unwrap();
}
