//! Restart policy: a failed attempt whose cause the job's `restart.on`
//! retries becomes `Restarting`; once its gang is gone, the newest complete
//! checkpoint looked up (megatron-sft) and the backoff over, the job is
//! placed again as a new attempt (fresh MASTER_PORT and COHORT_ATTEMPT),
//! without the blamed node when `exclude_failed_nodes` and others are free.

use cohort_shared::failure::{ExitEvidence, FailureCause, classify};
use tokio::sync::oneshot;

use super::*;

/// How long a restart waits for an agent to find the newest checkpoint.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A restart's checkpoint lookup.
pub(super) enum Lookup {
    /// To be sent once the failed gang is gone.
    Wanted,
    InFlight {
        rx: oneshot::Receiver<QueryResult>,
        deadline: Instant,
        node: String,
    },
}

/// A failure with its cause read from a rank's exit and last lines.
pub(super) fn classified(mut failure: Failure, exited: &ProcessExited) -> Failure {
    let c = classify(&ExitEvidence {
        exit_code: exited.exit_code,
        signal: exited.signal,
        root_cause: &exited.root_cause,
        lines: &exited.last_lines,
    });
    failure.cause = c.cause.name().into();
    failure.detail = c.detail;
    failure.decisive_lines = c.decisive;
    failure
}

/// A failure whose cause is known without reading output (a lost node, a refusal).
pub(super) fn with_cause(mut failure: Failure, cause: FailureCause) -> Failure {
    failure.cause = cause.name().into();
    if failure.detail.is_empty() {
        failure.detail = failure.message.clone();
    }
    failure
}

/// "; passed over: <dir>: <why>; ..." for the checkpoints a search did not take, shown where
/// the resume decision is (the job's reason, `cohort resume`'s error); empty when none.
pub(super) fn skipped_note(skipped: &[String]) -> String {
    const SHOWN: usize = 3;
    if skipped.is_empty() {
        return String::new();
    }
    let mut note = format!("; passed over: {}", skipped.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; "));
    if skipped.len() > SHOWN {
        note.push_str(&format!(" (and {} more)", skipped.len() - SHOWN));
    }
    note
}

impl Controller {
    /// After `fail`: starts the restart when the policy retries the cause and
    /// restarts are left; otherwise says in the reason why there is none.
    pub(super) fn consider_restart(&self, state: &mut State, id: &str) {
        let Some(entry) = state.jobs.get_mut(id) else { return };
        if entry.phase() != JobPhase::Failed {
            return;
        }
        let failure = entry.job.failure.clone().unwrap_or_default();
        let cause = FailureCause::from_name(&failure.cause).unwrap_or(FailureCause::RankFailed);
        let policy = entry.spec.restart.clone();
        if policy.max_restarts == 0 {
            return;
        }
        // A preempted attempt was not the job's failure: it costs no restart.
        let done = entry.attempts_counted().saturating_sub(1) as u32;
        if !policy.retries(cause) {
            entry.job.reason =
                format!("{}; not restarted: {cause} failures are not retried (restart.on)", failure.message);
            return;
        }
        if done >= policy.max_restarts {
            entry.job.reason = format!("{}; not restarted: all {} restarts used", failure.message, policy.max_restarts);
            return;
        }
        let n = done + 1;
        // How long each attempt ran: a crash loop doubles the wait, a long healthy run resets it.
        let runs: Vec<Duration> = entry
            .job
            .attempts
            .iter()
            .filter(|a| a.state != cohort_proto::JobState::Preempted as i32)
            .map(|a| {
                let end = if a.finished_unix_ms > 0 { a.finished_unix_ms } else { now_unix_ms() };
                Duration::from_millis(end.saturating_sub(a.started_unix_ms).max(0) as u64)
            })
            .collect();
        let wait = policy.backoff_for(cohort_shared::spec::backoff_step(&runs));
        let attempt = entry.job.attempt;
        let reason = format!(
            "restart {n} of {} in {}: attempt {attempt} failed ({cause}): {}",
            policy.max_restarts,
            humantime::format_duration(wait),
            failure.message
        );
        if let Err(e) = entry.restarting(now_unix_ms() + wait.as_millis() as i64, reason) {
            tracing::error!(error = %e, "restart refused");
            return;
        }
        if policy.exclude_failed_nodes
            && cause.blames_node()
            && !failure.node_name.is_empty()
            && !entry.job.excluded_nodes.contains(&failure.node_name)
        {
            entry.job.excluded_nodes.push(failure.node_name.clone());
        }
        if planner::checkpoint_dir(&entry.spec).is_some() {
            entry.lookup = Some(Lookup::Wanted);
        }
        tracing::warn!(job = %id, attempt, restart = n, cause = %cause, wait = ?wait, "attempt failed; restarting");
    }

    /// Moves restarting jobs on: once the failed gang is gone, looks the
    /// newest checkpoint up, then queues the job to be placed again (the
    /// scheduler waits for `not_before_unix_ms`).
    pub(super) fn advance_restarts(&self, state: &mut State) -> Result<(), ControllerError> {
        let ids: Vec<String> = state
            .jobs
            .values()
            .filter(|e| e.phase() == JobPhase::Restarting && e.job.live_processes == 0)
            .map(|e| e.job.id.clone())
            .collect();
        for id in ids {
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            let mut note = String::new();
            match entry.lookup.take() {
                Some(Lookup::Wanted) => {
                    self.send_lookup(state, &id);
                    continue;
                }
                Some(Lookup::InFlight { mut rx, deadline, node }) => match rx.try_recv() {
                    Ok(answer) => note = apply_lookup(entry, answer, &node),
                    Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                        entry.lookup = Some(Lookup::InFlight { rx, deadline, node });
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(job = %id, node, "no checkpoint answer; the next attempt starts from the last known one")
                    }
                },
                None => {}
            }
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            let from = match &entry.job.resume_from {
                Some(c) => format!(" from iteration {} ({})", c.iteration, c.path),
                None => String::new(),
            };
            if entry.preempting() {
                let iteration = entry.progress.last_iteration_of(entry.job.attempt);
                entry.count_lost_work(iteration, planner::checkpoint_dir(&entry.spec).is_some());
                let why = entry.job.attempts.last().map(|a| a.reason.clone()).unwrap_or_default();
                entry.requeue(format!("{why}; queued again{}{note}", lost_note(entry.last_preemption())))?;
                self.persist_job(state, &id);
                self.publish(state, &id, "preempted job queued again");
                continue;
            }
            entry.requeue(format!("restarting{from}: waiting to be placed{note}"))?;
            self.persist_job(state, &id);
            self.publish(state, &id, "restart queued");
        }
        Ok(())
    }

    fn send_lookup(&self, state: &mut State, id: &str) {
        let Some((rx, node)) = self.find_checkpoint(state, id) else { return };
        if let Some(entry) = state.jobs.get_mut(id) {
            entry.lookup = Some(Lookup::InFlight { rx, deadline: Instant::now() + LOOKUP_TIMEOUT, node });
        }
    }

    /// Asks a node for the newest complete checkpoint in the job's checkpoint
    /// directory; the answer comes on the receiver. None: no directory, or no node to ask.
    pub(super) fn find_checkpoint(
        &self,
        state: &mut State,
        id: &str,
    ) -> Option<(oneshot::Receiver<QueryResult>, String)> {
        let entry = state.jobs.get(id)?;
        let directory = planner::checkpoint_dir(&entry.spec)?;
        let user = entry.spec.user.clone().unwrap_or_default();
        // The output dir is shared: any connected node of the last attempt, else any node.
        let connected = |n: &NodeEntry| n.is_connected();
        let from_plan = entry
            .plan()
            .map(|p| p.nodes.iter().map(|a| a.node_name.clone()).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .find(|n| state.nodes.get(n).is_some_and(connected));
        let node = from_plan.or_else(|| state.nodes.values().find(|n| connected(n)).map(|n| n.info.name.clone()))?;
        let command = Command::FindCheckpoint(cohort_proto::FindCheckpointCommand { directory, user });
        super::queries::ask(state, &node, command).map(|rx| (rx, node))
    }
}

/// ", resuming from iteration 40 (0 iterations lost)" for a preempted job's reason; empty when unknown.
pub(super) fn lost_note(preemption: Option<&cohort_proto::Preemption>) -> String {
    let Some(p) = preemption else { return String::new() };
    match (p.resumed_iteration, p.lost_iterations) {
        (Some(from), Some(lost)) => format!(", resuming from iteration {from} ({lost} iterations lost)"),
        (Some(from), None) => format!(", resuming from iteration {from}"),
        _ => String::new(),
    }
}

/// Takes the checkpoint the lookup found; returns the note on what it passed over.
fn apply_lookup(entry: &mut JobEntry, answer: QueryResult, node: &str) -> String {
    use cohort_proto::query_result::Result as Answer;
    if !answer.error.is_empty() {
        tracing::warn!(job = %entry.job.id, node, error = %answer.error, "checkpoint lookup failed");
        return String::new();
    }
    match answer.result {
        Some(Answer::Checkpoint(c)) => {
            match c.checkpoint {
                Some(checkpoint) => {
                    tracing::info!(job = %entry.job.id, iteration = checkpoint.iteration, path = %checkpoint.path, "next attempt resumes from the newest complete checkpoint");
                    entry.job.resume_from = Some(checkpoint);
                }
                None => {
                    tracing::info!(job = %entry.job.id, "no complete checkpoint yet; the next attempt starts afresh")
                }
            }
            for skipped in &c.skipped {
                tracing::warn!(job = %entry.job.id, skipped = %skipped, "checkpoint not resumable");
            }
            skipped_note(&c.skipped)
        }
        Some(Answer::Path(_) | Answer::SwiftArgcheck(_) | Answer::Cache(_)) | None => String::new(),
    }
}
