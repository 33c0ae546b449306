//! Preemption: a pending job at the head of the order that does not fit may
//! stop running gangs, chosen by [`planner::choose_victims`], when its queue
//! reclaims GPUs lent beyond other queues' quotas, or (where its queue sets
//! `preempt_lower_priority`) for its higher priority; a borrower that does not
//! fit may, where the queue file sets `preempt_for_fair_share`, stop gangs
//! other queues run beyond their quotas where those queues have used more of
//! the cluster than their weight's share ([`Queues::fair_share_victims`]). A victim is asked to
//! save first (its `preempt:` signal and grace), then stopped as usual; its
//! attempt is recorded `Preempted` and it is queued again, to resume from its
//! newest complete checkpoint, without using a restart. A victim whose
//! trainer cannot save on a signal (`preempt.checkpoint_wait`) keeps running
//! until a checkpoint newer than the one at the preemption is complete in its
//! directory (or the wait runs out); then it is stopped the same way.

use cohort_proto::{PendingPreemption, Preemption};
use tokio::sync::oneshot;

use super::queue_admin::queue_of;
use super::*;
use crate::planner::{Candidate, Grounds};
use crate::queues::{Queue, Queues};

impl Controller {
    /// For the head job `id` that does not fit on `views` (or, as a
    /// `borrower`, a job beyond its queue's quota that does not fit): the
    /// reason it waits when it preempts (or waits for earlier victims to
    /// stop); None when it may preempt nothing that would make it fit.
    pub(super) fn try_preempt(
        &self,
        state: &mut State,
        id: &str,
        queue: &Queue,
        views: &[NodeView],
        borrower: bool,
    ) -> Option<String> {
        // One preemption at a time: what the last one frees is not counted yet.
        let ids = |keep: fn(&JobEntry) -> bool| -> Vec<String> {
            state.jobs.values().filter(|e| keep(e)).map(|e| e.job.id.clone()).collect()
        };
        let waiting = ids(|e| e.job.checkpoint_wait.is_some());
        let stopping = ids(|e| e.preempting());
        // A borrower waits as it did: it does not hold up the borrowers behind it.
        if borrower && !(waiting.is_empty() && stopping.is_empty()) {
            return None;
        }
        if !waiting.is_empty() {
            return Some(format!(
                "waiting for job(s) {} to write their next checkpoint before they are preempted",
                waiting.join(", ")
            ));
        }
        if !stopping.is_empty() {
            return Some(format!("waiting for preempted job(s) {} to save and stop", stopping.join(", ")));
        }
        let entry = state.jobs.get(id)?;
        // The queues in force: the store's (changed through the API), not only the file's.
        let queues = state.queues.clone();
        let queues = &*queues;
        let candidates = candidates(state, queues);
        let mut tries = Vec::new();
        if borrower {
            let held = |name: &str| held_by(&candidates, name);
            if let Some(beyond_quota) = queues.fair_share_victims(queue, held, &state.fair_share) {
                let why = format!("queue {} below its fair share of the cluster", queue.name);
                tries.push((Grounds::Reclaim { beyond_quota }, why));
            }
        } else if let Some(grounds) = reclaim_grounds(queue, entry, &candidates, queues) {
            tries.push((grounds, format!("queue {} reclaiming quota", queue.name)));
        }
        if queue.preempt_lower_priority && !borrower {
            tries
                .push((Grounds::Priority { priority: entry.job.priority }, format!("priority {}", entry.job.priority)));
        }
        let now = cohort_proto::now_unix_ms();
        for (grounds, why) in tries {
            // Priority preemption stays within the queue; a gang younger than
            // `preempt_exempt_time` is no victim (it still counts as holding its GPUs).
            let allowed: Vec<Candidate> = candidates
                .iter()
                .filter(|c| matches!(grounds, Grounds::Reclaim { .. }) || c.queue == queue.name)
                .filter(|c| queues.preemptible(c.started_unix_ms, now))
                .cloned()
                .collect();
            let victims = planner::choose_victims(&entry.spec, views, &entry.job.excluded_nodes, &allowed, &grounds);
            if let Some(victims) = victims {
                for victim in &victims {
                    self.preempt_job(state, victim, id, &why);
                }
                return Some(format!(
                    "preempting job(s) {} ({why}): waiting for them to save and stop",
                    victims.join(", ")
                ));
            }
        }
        None
    }

    /// Preempts one victim for job `by`: at once, or, where its `preempt.checkpoint_wait`
    /// is set and its checkpoint directory known, once its next checkpoint is complete.
    fn preempt_job(&self, state: &mut State, victim: &str, by: &str, grounds: &str) {
        let Some(entry) = state.jobs.get_mut(victim) else { return };
        let wait = entry.spec.preempt.as_ref().and_then(|p| p.checkpoint_wait);
        let Some(wait) = wait.filter(|_| planner::checkpoint_dir(&entry.spec).is_some()) else {
            self.stop_for_preemption(state, victim, by, grounds, String::new());
            return;
        };
        entry.job.reason = format!(
            "to be preempted by job {by} ({grounds}): waiting up to {} for its next checkpoint",
            humantime::format_duration(wait)
        );
        let began_unix_ms = cohort_proto::now_unix_ms();
        entry.job.checkpoint_wait = Some(PendingPreemption {
            by_job: by.into(),
            grounds: grounds.into(),
            began_unix_ms,
            until_unix_ms: began_unix_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
            baseline_iteration: None,
        });
        entry.checkpoint_poll = CheckpointPoll::default();
        tracing::warn!(job = %victim, by = %by, grounds, wait = ?wait, "preempting after the next checkpoint");
        let reason = entry.job.reason.clone();
        self.persist_job(state, victim);
        self.publish(state, victim, &reason);
    }

    /// Stops one victim's attempt for job `by`: `Restarting`, the attempt
    /// recorded `Preempted`, its gang asked to save and stopped. `waited`: how
    /// a checkpoint wait ended (empty without one).
    fn stop_for_preemption(&self, state: &mut State, victim: &str, by: &str, grounds: &str, waited: String) {
        let Some(entry) = state.jobs.get_mut(victim) else { return };
        entry.checkpoint_poll = CheckpointPoll::default();
        entry.job.checkpoint_wait = None;
        let reason = match waited.as_str() {
            "" => format!("preempted by job {by} ({grounds})"),
            waited => format!("preempted by job {by} ({grounds}) {waited}"),
        };
        let preemption = Preemption { by_job: by.into(), grounds: grounds.into(), waited, ..Default::default() };
        if let Err(e) = entry.preempt(preemption, reason.clone()) {
            tracing::error!(error = %e, "preemption refused");
            return;
        }
        if planner::checkpoint_dir(&entry.spec).is_some() {
            entry.lookup = Some(restart::Lookup::Wanted);
        }
        let attempt = entry.job.attempt;
        tracing::warn!(job = %victim, attempt, by = %by, grounds, save = ?entry.save_first(), "preempting");
        self.teardown(state, victim, &reason);
        self.persist_job(state, victim);
        self.publish(state, victim, &reason);
    }

    /// Moves the preemptions that wait for a checkpoint on: asks for the newest
    /// complete checkpoint every [`CHECKPOINT_POLL`]; the first answer is the
    /// baseline, a newer one (or the end of the wait) stops the victim. A
    /// victim that ended by itself meanwhile is left alone. The wait is the
    /// job record's `checkpoint_wait` (stored, so a restarted controller goes
    /// on with it); only the lookup in flight is this controller's own.
    pub(super) fn advance_checkpoint_waits(&self, state: &mut State) {
        let ids: Vec<String> =
            state.jobs.values().filter(|e| e.job.checkpoint_wait.is_some()).map(|e| e.job.id.clone()).collect();
        let now = Instant::now();
        let wall = cohort_proto::now_unix_ms();
        let millis = |ms: i64| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        for id in ids {
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            let Some(mut pending) = entry.job.checkpoint_wait.clone() else { continue };
            if !entry.is_active() {
                // It ended by itself meanwhile: nothing to wait for.
                entry.job.checkpoint_wait = None;
                entry.checkpoint_poll = CheckpointPoll::default();
                self.persist_job(state, &id);
                continue;
            }
            let mut poll = std::mem::take(&mut entry.checkpoint_poll);
            let mut baseline_found = false;
            if let Some((mut rx, deadline)) = poll.query.take() {
                match rx.try_recv() {
                    Ok(answer) => match (pending.baseline_iteration, newest_iteration(&answer)) {
                        (None, Some(it)) => {
                            pending.baseline_iteration = Some(it);
                            baseline_found = true;
                        }
                        (Some(base), Some(it)) if it > base => {
                            let took = millis(wall - pending.began_unix_ms).as_secs();
                            let took = humantime::format_duration(Duration::from_secs(took));
                            let waited = format!("after its checkpoint of iteration {it} ({took} after it was chosen)");
                            self.stop_for_preemption(state, &id, &pending.by_job, &pending.grounds, waited);
                            continue;
                        }
                        _ => {}
                    },
                    Err(oneshot::error::TryRecvError::Empty) if now < deadline => poll.query = Some((rx, deadline)),
                    Err(_) => {}
                }
            }
            if wall >= pending.until_unix_ms {
                let waited = format!(
                    "with no new checkpoint within preempt.checkpoint_wait ({})",
                    humantime::format_duration(millis(pending.until_unix_ms - pending.began_unix_ms))
                );
                self.stop_for_preemption(state, &id, &pending.by_job, &pending.grounds, waited);
                continue;
            }
            let due = poll.query.is_none() && poll.last_sent.is_none_or(|t| now.duration_since(t) >= CHECKPOINT_POLL);
            if due && let Some((rx, _node)) = self.find_checkpoint(state, &id) {
                poll.query = Some((rx, now + CHECKPOINT_POLL * 10));
                poll.last_sent = Some(now);
            }
            if let Some(entry) = state.jobs.get_mut(&id) {
                entry.checkpoint_poll = poll;
                if baseline_found {
                    // Stored: a checkpoint written while no controller runs still ends the wait.
                    entry.job.checkpoint_wait = Some(pending);
                    self.persist_job(state, &id);
                }
            }
        }
    }
}

/// How often a preemption that waits for a checkpoint looks for it.
const CHECKPOINT_POLL: Duration = Duration::from_millis(500);

/// The checkpoint lookup of a preemption that waits for its victim's next
/// checkpoint (the wait itself is the job record's `checkpoint_wait`).
#[derive(Default)]
pub(super) struct CheckpointPoll {
    /// The lookup in flight and when it is given up.
    query: Option<(oneshot::Receiver<QueryResult>, Instant)>,
    last_sent: Option<Instant>,
}

/// The iteration of the newest complete checkpoint a lookup found; None on an error.
fn newest_iteration(answer: &QueryResult) -> Option<u64> {
    use cohort_proto::query_result::Result as Answer;
    if !answer.error.is_empty() {
        return None;
    }
    match &answer.result {
        Some(Answer::Checkpoint(c)) => Some(c.checkpoint.as_ref().map_or(0, |c| c.iteration)),
        _ => None,
    }
}

/// Every gang with an attempt under way, as a victim it could be.
fn candidates(state: &State, queues: &Queues) -> Vec<Candidate> {
    state
        .jobs
        .values()
        .filter(|e| e.is_active())
        .filter_map(|e| {
            let plan = e.plan()?;
            let started = if e.job.running_unix_ms > 0 { e.job.running_unix_ms } else { e.job.started_unix_ms };
            Some(Candidate {
                job_id: e.job.id.clone(),
                queue: queue_of(queues, e)?.name.clone(),
                priority: e.job.priority,
                started_unix_ms: started,
                gpus: plan.nodes.iter().map(|a| (a.node_name.clone(), a.gpu_indices.clone())).collect(),
            })
        })
        .collect()
}

/// Reclaim grounds ([`Queues::reclaimable`]) for `entry` in `queue`, from what the candidates hold.
fn reclaim_grounds(queue: &Queue, entry: &JobEntry, candidates: &[Candidate], queues: &Queues) -> Option<Grounds> {
    let held = |name: &str| held_by(candidates, name);
    let beyond_quota = queues.reclaimable(queue, entry.spec.nodes * entry.spec.gpus_per_node, held)?;
    Some(Grounds::Reclaim { beyond_quota })
}

/// The GPUs the gangs of queue `name` hold.
fn held_by(candidates: &[Candidate], name: &str) -> u32 {
    candidates.iter().filter(|c| c.queue == name).map(|c| c.gpus.iter().map(|(_, g)| g.len() as u32).sum::<u32>()).sum()
}
