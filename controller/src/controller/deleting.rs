//! `cohort delete`: finished jobs leave the store, with their output and
//! metrics. A job not yet ended (or whose processes are still being stopped)
//! is refused, naming `cohort cancel`; every job asked for is checked before
//! any is deleted. A job array's id deletes every element, a pipeline's its
//! stages' runs (`<pipeline>.<stage>`) with it. With
//! `--retain-finished AGE` the leader deletes finished jobs that ended longer
//! than AGE ago.

use super::*;

impl Controller {
    /// Deletes finished jobs; returns their ids in the order asked.
    pub async fn delete(&self, refs: Vec<String>) -> Result<Vec<String>, ControllerError> {
        let (ids, writes) = self.state.call(move |state, ctl| ctl.delete_on_state(state, &refs)).await?;
        for write in writes {
            write.wait().await?;
        }
        for id in &ids {
            if let Err(e) = self.logs.remove(id).await {
                tracing::warn!(job = %id, error = %e, "the deleted job's output file could not be removed");
            }
            if let Err(e) = self.metrics.remove(id).await {
                tracing::warn!(job = %id, error = %e, "the deleted job's metrics file could not be removed");
            }
        }
        self.collect_syncs().await;
        Ok(ids)
    }

    /// [`Self::delete`] on the state: every job checked, then each record's delete queued.
    fn delete_on_state(
        &self,
        state: &mut State,
        refs: &[String],
    ) -> Result<(Vec<String>, Vec<Durable>), ControllerError> {
        let mut ids: Vec<String> = Vec::new();
        for job_ref in refs {
            let elements =
                if state.jobs.contains_key(job_ref) { Vec::new() } else { Self::array_elements(state, job_ref) };
            let mut named =
                if elements.is_empty() { vec![Self::resolve(state, job_ref)?.job.id.clone()] } else { elements };
            // A pipeline's stage runs go with it (they are its record's `stages[].runs`).
            let runs: Vec<String> = named
                .iter()
                .filter_map(|id| state.jobs.get(id))
                .flat_map(|e| e.job.stages.iter().flat_map(|s| s.runs.iter().cloned()))
                .filter(|run| state.jobs.contains_key(run))
                .collect();
            named.extend(runs);
            for id in named {
                let Some(entry) = state.jobs.get(&id) else { continue };
                if !entry.is_terminal() || entry.job.live_processes > 0 {
                    let phase = if entry.is_terminal() { "stopping its processes" } else { entry.phase().name() };
                    return Err(ControllerError::FailedPrecondition(format!(
                        "job {id} is {phase}; only finished jobs are deleted: `cohort cancel {id}` first \
                         (add --wait to return once its processes are gone), then delete it"
                    )));
                }
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let mut writes = Vec::new();
        for id in &ids {
            state.jobs.remove(id);
            state.deleted_jobs.retain(|_, at| at.elapsed() < DELETED_MEMORY);
            state.deleted_jobs.insert(id.clone(), Instant::now());
            state.submitted.retain(|_, job| job != id);
            state.logs_complete.retain(|(job, _)| job != id);
            writes.push(self.writer.write(format!("jobs/{id}"), None));
            tracing::info!(job = %id, "job deleted");
        }
        self.wake.notify_one();
        Ok((ids, writes))
    }
}

impl Controller {
    /// Deletes finished jobs older than `--retain-finished`, until `shutdown` fires.
    pub async fn retain_finished(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(keep) = self.config.retain_finished else { return };
        // A quarter of the age, at most a minute: a job goes at most that late.
        let every = (keep / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
            let ids = self.state.call(move |state, _| expired(state, now_unix_ms().saturating_sub(keep_ms))).await;
            if ids.is_empty() {
                continue;
            }
            match self.delete(ids).await {
                Ok(ids) => tracing::info!(jobs = ids.len(), "deleted finished jobs past --retain-finished"),
                Err(e) => tracing::warn!(error = %e, "retention: finished jobs not deleted; trying again"),
            }
        }
    }
}

/// Jobs that ended before `cutoff_ms` with no process left, except a
/// running pipeline's stage runs and jobs a live job still waits for.
fn expired(state: &State, cutoff_ms: i64) -> Vec<String> {
    let live = || state.jobs.values().filter(|e| !e.is_terminal());
    let awaited: HashSet<&str> = live().flat_map(|e| e.job.after.iter().map(|d| d.job.as_str())).collect();
    let running_pipelines: HashSet<&str> = live().map(|e| e.job.id.as_str()).collect();
    state
        .jobs
        .values()
        .filter(|e| e.is_terminal() && e.job.live_processes == 0)
        .filter(|e| e.job.finished_unix_ms > 0 && e.job.finished_unix_ms < cutoff_ms)
        .filter(|e| !awaited.contains(e.job.id.as_str()) && !running_pipelines.contains(e.job.pipeline_id.as_str()))
        .map(|e| e.job.id.clone())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cohort_proto::{JobDependency, JobState};

    fn add(state: &mut State, id: &str, phase: JobState, finished_unix_ms: i64, change: impl FnOnce(&mut Job)) {
        let spec = JobSpec::from_yaml("name: a\nkind: command\nnodes: 1\ncommand: [\"true\"]\n", "t").unwrap();
        let mut entry = JobEntry::submitted(Job { id: id.into(), ..Job::default() }, spec, 1);
        entry.job.state = phase as i32;
        entry.job.finished_unix_ms = finished_unix_ms;
        change(&mut entry.job);
        state.jobs.insert(id.into(), entry);
    }

    #[test]
    fn retention_keeps_young_live_stopping_and_awaited_jobs_and_a_running_pipelines_runs() {
        let mut state = State::default();
        add(&mut state, "old-1", JobState::Succeeded, 1000, |_| {});
        add(&mut state, "young-2", JobState::Failed, 5000, |_| {});
        add(&mut state, "run-3", JobState::Running, 0, |_| {});
        add(&mut state, "dep-4", JobState::Succeeded, 1000, |_| {});
        add(&mut state, "wait-5", JobState::Pending, 0, |j| {
            j.after = vec![JobDependency { job: "dep-4".into(), condition: "ok".into() }];
        });
        add(&mut state, "p-6", JobState::Running, 0, |_| {});
        add(&mut state, "p-6.train", JobState::Succeeded, 1000, |j| j.pipeline_id = "p-6".into());
        add(&mut state, "stop-7", JobState::Cancelled, 1000, |j| j.live_processes = 1);
        add(&mut state, "old-8", JobState::Cancelled, 1500, |_| {});
        let mut gone = expired(&state, 2000);
        gone.sort();
        assert_eq!(gone, ["old-1", "old-8"]);
    }
}
