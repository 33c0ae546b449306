//! Preemption: a pending job at the head of the order that does not fit may
//! stop running gangs, chosen by [`planner::choose_victims`], when its queue
//! reclaims GPUs lent beyond other queues' quotas, or (where its queue sets
//! `preempt_lower_priority`) for its higher priority. A victim is asked to
//! save first (its `preempt:` signal and grace), then stopped as usual; its
//! attempt is recorded `Preempted` and it is queued again, to resume from its
//! newest complete checkpoint, without using a restart.

use std::collections::BTreeMap;

use cohort_proto::Preemption;

use super::*;
use crate::planner::{Candidate, Grounds};
use crate::queues::{Queue, Queues};

impl Controller {
    /// For the head job `id` that does not fit on `views`: the reason it waits
    /// when it preempts (or waits for earlier victims to stop); None when it
    /// may preempt nothing that would make it fit.
    pub(super) fn try_preempt(&self, state: &mut State, id: &str, queue: &Queue, views: &[NodeView]) -> Option<String> {
        let stopping: Vec<String> = state.jobs.values().filter(|e| e.preempting()).map(|e| e.job.id.clone()).collect();
        if !stopping.is_empty() {
            // One preemption at a time: what the last one frees is not counted yet.
            return Some(format!("waiting for preempted job(s) {} to save and stop", stopping.join(", ")));
        }
        let entry = state.jobs.get(id)?;
        let queues = &self.config.queues;
        let candidates = candidates(state, queues);
        let mut tries = Vec::new();
        if let Some(grounds) = reclaim_grounds(queue, entry, &candidates, queues) {
            tries.push((grounds, format!("queue {} reclaiming quota", queue.name)));
        }
        if queue.preempt_lower_priority {
            tries
                .push((Grounds::Priority { priority: entry.job.priority }, format!("priority {}", entry.job.priority)));
        }
        for (grounds, why) in tries {
            // Priority preemption stays within the queue.
            let allowed: Vec<Candidate> = candidates
                .iter()
                .filter(|c| matches!(grounds, Grounds::Reclaim { .. }) || c.queue == queue.name)
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

    /// Stops one victim's attempt for job `by`: `Restarting`, the attempt
    /// recorded `Preempted`, its gang asked to save and stopped.
    fn preempt_job(&self, state: &mut State, victim: &str, by: &str, grounds: &str) {
        let Some(entry) = state.jobs.get_mut(victim) else { return };
        let reason = format!("preempted by job {by} ({grounds})");
        let preemption = Preemption { by_job: by.into(), grounds: grounds.into(), ..Default::default() };
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
                queue: queues.of(e.spec.queue.as_deref())?.name.clone(),
                priority: e.job.priority,
                started_unix_ms: started,
                gpus: plan.nodes.iter().map(|a| (a.node_name.clone(), a.gpu_indices.clone())).collect(),
            })
        })
        .collect()
}

/// Reclaim: `entry`'s queue reclaims (`reclaim`, the default) and has a quota it stays within with the job, and
/// other queues hold GPUs beyond theirs (a queue without a quota owns none:
/// all it holds is lent).
fn reclaim_grounds(queue: &Queue, entry: &JobEntry, candidates: &[Candidate], queues: &Queues) -> Option<Grounds> {
    let quota = queue.gpu_quota.filter(|_| queue.reclaim)?;
    let held = |name: &str| -> u32 {
        candidates
            .iter()
            .filter(|c| c.queue == name)
            .map(|c| c.gpus.iter().map(|(_, g)| g.len() as u32).sum::<u32>())
            .sum()
    };
    if held(&queue.name) + entry.spec.nodes * entry.spec.gpus_per_node > quota {
        return None;
    }
    let beyond_quota: BTreeMap<String, u32> = queues
        .all()
        .iter()
        .filter(|q| q.name != queue.name)
        .map(|q| (q.name.clone(), held(&q.name).saturating_sub(q.gpu_quota.unwrap_or(0))))
        .filter(|(_, n)| *n > 0)
        .collect();
    (!beyond_quota.is_empty()).then_some(Grounds::Reclaim { beyond_quota })
}
