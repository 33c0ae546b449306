//! The transitions of a job, one by one; what the rest of the controller may not do.

#![allow(clippy::unwrap_used)]

use cohort_proto::NodeAssignment;

use super::*;

/// A pending two-node job "t-1".
fn pending() -> JobEntry {
    let spec = JobSpec::from_yaml("name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [x]\n", "t").unwrap();
    let job = Job { id: "t-1".into(), name: "t".into(), submitted_unix_ms: 5, ..Job::default() };
    JobEntry::submitted(job, spec, 1)
}

fn plan() -> GangPlan {
    let node = |name: &str, node_rank| NodeAssignment { node_name: name.into(), node_rank, ..Default::default() };
    GangPlan { master_port: 29500, nodes: vec![node("a", 0), node("b", 1)], ..GangPlan::default() }
}

/// Two processes per node, global ranks 0..4, all launching.
fn processes() -> Vec<ProcessStatus> {
    let mut out = Vec::new();
    for (node_rank, node) in ["a", "b"].iter().enumerate() {
        for index in 0..2 {
            out.push(ProcessStatus {
                node_name: node.to_string(),
                node_rank: node_rank as u32,
                index,
                global_rank: Some(node_rank as u32 * 2 + index),
                ..ProcessStatus::default()
            });
        }
    }
    out
}

/// A job whose attempt 1 runs on a and b.
fn running() -> JobEntry {
    let mut entry = pending();
    entry.begin_attempt(plan(), vec!["a".into(), "b".into()]).unwrap();
    entry.launching(processes(), "launching".into()).unwrap();
    for node in ["a", "b"] {
        for index in 0..2 {
            entry.process_started(node, index, 100 + index, 7);
        }
    }
    assert_eq!(entry.phase(), JobPhase::Running);
    entry
}

fn failure(message: &str) -> Failure {
    Failure { node_name: "b".into(), message: message.into(), ..Failure::default() }
}

#[test]
fn the_proto_state_and_the_phase_convert_both_ways() {
    for state in 0..=8 {
        let phase = JobPhase::from_proto(state);
        assert_eq!(phase.to_proto() as i32, state);
        assert_eq!(crate::controller::state_name(state), phase.name());
    }
    assert_eq!(JobPhase::from_proto(99), JobPhase::Unknown);
}

#[test]
fn an_attempt_starts_afresh_from_pending_and_only_from_pending() {
    let mut entry = running();
    entry.fail(failure("rank 3 died")).unwrap();
    entry.restarting(0, "again".into()).unwrap();
    entry.requeue("placing".into()).unwrap();

    let attempt = entry.begin_attempt(plan(), vec!["a".into(), "b".into()]).unwrap();
    assert_eq!(attempt, 2);
    assert_eq!(entry.job.attempt, 2);
    assert_eq!(entry.phase(), JobPhase::Pending, "pending until prepared or launched");
    assert!(entry.job.started_unix_ms > 0);
    assert_eq!((entry.job.finished_unix_ms, entry.job.running_unix_ms), (0, 0));
    assert!(entry.job.failure.is_none());
    assert!(entry.job.processes.is_empty());
    assert_eq!(entry.job.live_processes, 0);
    assert_eq!(entry.job.attempts.len(), 2);
    let record = &entry.job.attempts[1];
    assert_eq!((record.attempt, record.master_port, record.state), (2, 29500, JobState::Starting as i32));

    entry.preparing("preparing".into()).unwrap();
    assert_eq!(entry.phase(), JobPhase::Preparing);
    let refused = entry.begin_attempt(plan(), Vec::new()).unwrap_err();
    assert_eq!(
        refused,
        TransitionError { job: "t-1".into(), from: JobPhase::Preparing, transition: "begin an attempt" }
    );
    assert_eq!(refused.to_string(), "job t-1: cannot begin an attempt while Preparing");
    assert_eq!(entry.job.attempt, 2, "a refused transition changes nothing");
}

#[test]
fn a_launch_needs_a_plan_and_the_job_runs_when_every_process_started() {
    let mut entry = pending();
    assert!(entry.launching(processes(), "launching".into()).is_err(), "no plan, no launch");
    entry.begin_attempt(plan(), vec!["a".into(), "b".into()]).unwrap();
    entry.launching(processes(), "launching".into()).unwrap();
    assert_eq!(entry.phase(), JobPhase::Starting);
    assert!(entry.job.processes.iter().all(|p| p.phase == ProcessPhase::Launching as i32));
    assert_eq!(entry.job.live_processes, 4);

    assert!(!entry.process_started("a", 0, 100, 7));
    assert!(!entry.process_started("a", 1, 101, 7));
    // A quick process that already exited counts as started.
    assert!(!entry.process_started("b", 0, 102, 7));
    let exited = ProcessExited { exit_code: Some(0), ..ProcessExited::default() };
    entry.process_exited("b", 0, &exited).unwrap();
    assert_eq!(entry.phase(), JobPhase::Starting);
    assert!(entry.process_started("b", 1, 103, 7), "the last start makes the job run");
    assert_eq!(entry.phase(), JobPhase::Running);
    assert!(entry.job.running_unix_ms > 0);
    assert!(!entry.process_started("b", 1, 103, 7), "running once");
    assert_eq!(entry.job.live_processes, 3);
}

#[test]
fn an_exit_is_recorded_once_with_its_ranks() {
    let mut entry = running();
    let exited = ProcessExited { exit_code: Some(3), ended_unix_ms: 9, ..ProcessExited::default() };
    let seen = entry.process_exited("b", 1, &exited).unwrap();
    assert_eq!(seen, ExitSeen { node_rank: 1, global_rank: Some(3) });
    let p = entry.job.processes.iter().find(|p| p.node_name == "b" && p.index == 1).unwrap();
    assert_eq!((p.phase, p.exit_code, p.ended_unix_ms), (ProcessPhase::Exited as i32, Some(3), 9));
    assert_eq!(entry.job.live_processes, 3);
    assert_eq!(entry.process_exited("b", 1, &exited), None, "a re-reported exit");
    assert_eq!(entry.process_exited("c", 0, &exited), None, "no such process");
    assert_eq!(entry.phase(), JobPhase::Running, "what an exit does to the job is the caller's decision");
}

#[test]
fn a_lost_node_loses_its_live_processes_only_and_names_its_rank() {
    let mut entry = running();
    entry.process_exited("b", 0, &ProcessExited { exit_code: Some(0), ..ProcessExited::default() }).unwrap();
    assert_eq!(entry.mark_lost("b"), 1);
    let phase =
        |node: &str, index| entry.job.processes.iter().find(|p| p.node_name == node && p.index == index).unwrap().phase;
    assert_eq!(phase("b", 0), ProcessPhase::Exited as i32, "an exited process stays exited");
    assert_eq!(phase("b", 1), ProcessPhase::Lost as i32);
    assert_eq!(phase("a", 0), ProcessPhase::Running as i32);
    assert_eq!(entry.job.live_processes, 2);
    assert_eq!(entry.mark_lost("z"), 0, "a node outside the plan");

    // The node comes back still running the lost process: live again, to be stopped.
    assert!(entry.process_revived("b", 1, 555));
    assert!(!entry.process_revived("a", 0, 555), "only a lost process revives");
    assert_eq!(entry.job.live_processes, 3);
}

#[test]
fn a_failure_closes_the_attempt_and_only_an_active_job_fails() {
    let mut entry = running();
    entry.fail(failure("node b lost")).unwrap();
    assert_eq!(entry.phase(), JobPhase::Failed);
    assert_eq!(entry.job.reason, "node b lost");
    assert!(entry.job.finished_unix_ms > 0);
    let record = entry.job.attempts.last().unwrap();
    assert_eq!(record.state, JobState::Failed as i32);
    assert_eq!(record.finished_unix_ms, entry.job.finished_unix_ms);
    assert_eq!(record.failure.as_ref().unwrap().message, "node b lost");

    let before = entry.job.clone();
    assert_eq!(entry.fail(failure("second")).unwrap_err().from, JobPhase::Failed);
    assert_eq!(entry.succeed("late").unwrap_err().from, JobPhase::Failed);
    assert_eq!(entry.job, before, "the first failure stands");
    assert_eq!(pending().fail(failure("x")).unwrap_err().from, JobPhase::Pending);
}

#[test]
fn success_closes_the_attempt() {
    let mut entry = running();
    entry.succeed("every process exited with code 0").unwrap();
    assert_eq!(entry.phase(), JobPhase::Succeeded);
    assert!(entry.job.finished_unix_ms > 0);
    assert_eq!(entry.job.attempts[0].state, JobState::Succeeded as i32);
    assert!(pending().succeed("x").is_err());
}

#[test]
fn cancel_says_where_it_came_from_and_a_finished_job_is_not_cancelled() {
    let mut entry = pending();
    assert_eq!(entry.cancel("before placing".into()), Ok(JobPhase::Pending));
    assert_eq!(entry.phase(), JobPhase::Cancelled);
    assert!(entry.job.finished_unix_ms > 0);
    assert_eq!(entry.cancel("again".into()).unwrap_err().from, JobPhase::Cancelled);
    assert_eq!(entry.job.reason, "before placing");

    let mut entry = running();
    assert_eq!(entry.cancel("stopping".into()), Ok(JobPhase::Running));
    assert_eq!(entry.job.attempts[0].state, JobState::Cancelled as i32, "the attempt is closed");

    let mut entry = running();
    entry.fail(failure("rank died")).unwrap();
    entry.restarting(0, "restart 1".into()).unwrap();
    entry.lookup = Some(restart::Lookup::Wanted);
    assert_eq!(entry.cancel("while restarting".into()), Ok(JobPhase::Restarting));
    assert!(entry.lookup.is_none(), "no checkpoint lookup for a cancelled job");
    assert_eq!(entry.job.attempts[0].state, JobState::Failed as i32, "the failed attempt stays failed");
}

#[test]
fn a_restart_waits_for_the_later_of_its_backoff_and_earlier_holds() {
    let mut entry = running();
    assert!(entry.restarting(0, "x".into()).is_err(), "only a failed job restarts");
    entry.hold_until(50_000);
    entry.fail(failure("rank died")).unwrap();
    entry.restarting(10_000, "restart 1 of 3".into()).unwrap();
    assert_eq!(entry.phase(), JobPhase::Restarting);
    assert_eq!(entry.job.finished_unix_ms, 0, "not finished while a restart comes");
    assert_eq!(entry.job.not_before_unix_ms, 50_000, "the fence hold is kept");
    entry.hold_until(60_000);
    assert_eq!(entry.job.not_before_unix_ms, 60_000);
    assert!(entry.requeue("placing".into()).is_ok());
    assert_eq!(entry.phase(), JobPhase::Pending);
    assert!(entry.requeue("again".into()).is_err());
}

#[test]
fn only_a_failed_or_cancelled_job_resumes() {
    let checkpoint = Checkpoint { iteration: 40, path: "/out/iter_0000040".into(), ..Checkpoint::default() };
    let mut entry = running();
    assert_eq!(entry.resume(checkpoint.clone(), "x".into()).unwrap_err().from, JobPhase::Running);
    entry.cancel("stop".into()).unwrap();
    entry.resume(checkpoint.clone(), "resuming from iteration 40".into()).unwrap();
    assert_eq!(entry.phase(), JobPhase::Pending);
    assert_eq!(entry.job.resume_from, Some(checkpoint));
}

#[test]
fn a_pipeline_runs_from_its_submission() {
    let mut entry = pending();
    let stages = vec![PipelineStage { name: "train".into(), ..PipelineStage::default() }];
    entry.start_pipeline(stages).unwrap();
    assert_eq!(entry.phase(), JobPhase::Running);
    assert_eq!(entry.job.started_unix_ms, 5);
    assert_eq!(entry.job.stages.len(), 1);
    assert!(entry.start_pipeline(Vec::new()).is_err());
}

#[test]
fn a_job_stored_while_preparing_is_placed_again() {
    let entry = running();
    let spec = entry.spec.clone();
    let stored = Job { state: JobState::Preparing as i32, ..entry.job };
    let loaded = JobEntry::from_store(stored, spec.clone(), 1, 7);
    assert_eq!(loaded.phase(), JobPhase::Pending);
    assert!(loaded.job.plan.is_none());
    assert!(loaded.job.reason.contains("the controller restarted while the job was being prepared"));
    assert_eq!(loaded.job.attempts[0].state, JobState::Pending as i32);
    assert_eq!(loaded.revision, Some(7));

    let running = running();
    let loaded = JobEntry::from_store(running.job.clone(), spec, 1, 7);
    assert_eq!(loaded.job, running.job, "any other job loads as it was stored");
}

/// The rule of this module, kept: the controller's other modules change
/// states only through JobEntry, NodeEntry and StageTransitions.
#[test]
fn no_other_module_writes_a_state_a_finish_time_or_a_process_phase() {
    let others = [
        ("admission.rs", include_str!("../admission.rs")),
        ("agents.rs", include_str!("../agents.rs")),
        ("checking.rs", include_str!("../checking.rs")),
        ("mod.rs", include_str!("../mod.rs")),
        ("pipeline.rs", include_str!("../pipeline.rs")),
        ("prepare.rs", include_str!("../prepare.rs")),
        ("progress.rs", include_str!("../progress.rs")),
        ("reconcile.rs", include_str!("../reconcile.rs")),
        ("restart.rs", include_str!("../restart.rs")),
        ("swift_check.rs", include_str!("../swift_check.rs")),
    ];
    for (file, source) in others {
        for write in [".state = ", "state: JobState::", "finished_unix_ms = ", ".phase = ", "set_state("] {
            assert!(!source.contains(write), "{file} writes `{write}` itself: add a transition to the entry module");
        }
    }
}
