//! Jobs that wait for other jobs (`after:`, `cohort submit --after`), as
//! Slurm's `--dependency=afterok|afterany|afternotok`. The jobs named are
//! resolved to ids at submit (an unknown one, or one whose end already rules
//! the condition out, is refused there). Until every dependency is met the
//! job stays Pending, out of the scheduling order, with the reason "waiting
//! for job X (Running)"; once one can never be met (afterok of a job that
//! failed) the job is Cancelled with the reason why, instead of waiting
//! forever as Slurm's DependencyNeverSatisfied does.

use cohort_proto::JobDependency;
use cohort_shared::spec::after::Condition;

use super::*;

/// Where a pending job's dependencies stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Standing {
    Met,
    Waiting(String),
    Never(String),
}

/// Why `condition` can never be met once the job is in `phase`, if so.
fn never_met(phase: JobPhase, condition: Condition) -> Option<&'static str> {
    match (condition, phase) {
        (Condition::Ok, JobPhase::Failed) => Some("failed, so it can never succeed"),
        (Condition::Ok, JobPhase::Cancelled) => Some("was cancelled, so it can never succeed"),
        (Condition::NotOk, JobPhase::Succeeded) => Some("succeeded, so it can never fail"),
        _ => None,
    }
}

fn met(phase: JobPhase, condition: Condition) -> bool {
    match condition {
        Condition::Ok => phase == JobPhase::Succeeded,
        Condition::Any => phase.is_terminal(),
        Condition::NotOk => matches!(phase, JobPhase::Failed | JobPhase::Cancelled),
    }
}

/// The job file's `after:` as job ids, at submit: each named job must exist
/// and must still be able to meet its condition.
pub(super) fn resolve(state: &State, spec: &JobSpec) -> Result<Vec<JobDependency>, ControllerError> {
    let mut resolved: Vec<JobDependency> = Vec::new();
    for dependency in &spec.after {
        let Ok(entry) = Controller::resolve(state, &dependency.job) else {
            return Err(ControllerError::InvalidRequest(format!(
                "job {}: after: no job {:?}; name a job id that `cohort jobs` lists, e.g. `--after prep-3` \
                 (a deleted job cannot be waited for)",
                spec.name, dependency.job
            )));
        };
        if let Some(why) = never_met(entry.phase(), dependency.condition) {
            let fix = match dependency.condition {
                Condition::NotOk => "wait on `:any`, or drop it",
                _ => "wait on `:any` or `:notok`, or run it again and wait on the new job",
            };
            return Err(ControllerError::InvalidRequest(format!(
                "job {}: after: {dependency}: job {} {why}; {fix}",
                spec.name, entry.job.id
            )));
        }
        if resolved.iter().all(|d| d.job != entry.job.id) {
            resolved.push(JobDependency { job: entry.job.id.clone(), condition: dependency.condition.word().into() });
        }
    }
    Ok(resolved)
}

/// Where `entry`'s dependencies stand now. A job that has had an attempt
/// waited for them already (its restarts do not wait again).
pub(super) fn standing(state: &State, entry: &JobEntry) -> Standing {
    if entry.job.attempt > 0 {
        return Standing::Met;
    }
    for dependency in &entry.job.after {
        let condition = Condition::from_word(&dependency.condition).unwrap_or(Condition::Ok);
        let written = format!("{}:{}", dependency.job, condition.word());
        let Some(other) = state.jobs.get(&dependency.job) else {
            return Standing::Never(format!(
                "dependency never satisfied: job {} that `after: {written}` waits for was deleted",
                dependency.job
            ));
        };
        let phase = other.phase();
        if let Some(why) = never_met(phase, condition) {
            return Standing::Never(format!(
                "dependency never satisfied: job {} {why} (after: {written}); submit it again without it",
                dependency.job
            ));
        }
        if !met(phase, condition) {
            return Standing::Waiting(format!("waiting for job {} ({phase})", dependency.job));
        }
    }
    Standing::Met
}

/// Whether a pending job still waits for another job (it is not placed).
pub(super) fn waits(state: &State, entry: &JobEntry) -> bool {
    !entry.job.after.is_empty() && standing(state, entry) != Standing::Met
}

impl Controller {
    /// Pending jobs with dependencies: the reason says which job they wait
    /// for; one that can never be met cancels the job.
    pub(super) fn settle_dependencies(&self, state: &mut State) {
        let pending: Vec<(String, Standing)> = state
            .jobs
            .values()
            .filter(|e| e.phase() == JobPhase::Pending && !e.job.after.is_empty())
            .map(|e| (e.job.id.clone(), standing(state, e)))
            .collect();
        for (id, standing) in pending {
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            match standing {
                Standing::Met => {}
                Standing::Waiting(reason) => {
                    if entry.job.reason != reason {
                        entry.job.reason = reason;
                        self.publish(state, &id, "pending");
                    }
                }
                Standing::Never(reason) => {
                    tracing::info!(job = %id, %reason, "job cancelled: its dependency can never be met");
                    if entry.cancel(reason).is_ok() {
                        self.persist_job(state, &id);
                        self.publish(state, &id, "cancelled: dependency never satisfied");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_are_met_by_the_ends_slurm_names() {
        use JobPhase::*;
        let ends = [Succeeded, Failed, Cancelled];
        let met_by = |c| ends.iter().filter(|p| met(**p, c)).copied().collect::<Vec<_>>();
        assert_eq!(met_by(Condition::Ok), [Succeeded]);
        assert_eq!(met_by(Condition::Any), ends);
        assert_eq!(met_by(Condition::NotOk), [Failed, Cancelled]);
        for phase in [Pending, Preparing, Starting, Running, Restarting] {
            for c in [Condition::Ok, Condition::Any, Condition::NotOk] {
                assert!(!met(phase, c) && never_met(phase, c).is_none(), "{phase} {c:?}");
            }
        }
        // Every end either meets a condition or rules it out.
        for phase in ends {
            for c in [Condition::Ok, Condition::Any, Condition::NotOk] {
                assert!(met(phase, c) != never_met(phase, c).is_some(), "{phase} {c:?}");
            }
        }
    }
}
