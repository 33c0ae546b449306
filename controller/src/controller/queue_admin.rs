//! Queues as the store holds them (`queues/<name>`, set through the admin
//! API, seeded from `--queues`), the fair-share usage kept across restarts
//! (`fair-share/usage`), what each queue uses now, and GPU-hour accounting.

use std::collections::{BTreeMap, BTreeSet};

use cohort_proto::{
    FairShareRecord, GetUsageResponse, ListQueuesResponse, QueueSpec, QueueStatus, UsageRow, now_unix_ms,
};

use super::*;
use crate::queues::{FairShare, Queue, Queues};
use crate::store::StoreError;

/// Where a queue is stored.
pub(super) fn queue_key(name: &str) -> String {
    format!("queues/{name}")
}

/// Where the fair-share usage is stored.
const FAIR_SHARE_KEY: &str = "fair-share/usage";

/// How often the fair-share usage is written to the store: a controller that
/// dies loses at most this much of it.
const FAIR_SHARE_EVERY: Duration = Duration::from_secs(5);

/// The queues in force and those of `declared` to write to the store: the
/// store's queues win; a store without any is seeded with every declared
/// queue, one without the default queue gets the declared one.
pub(super) async fn load(
    store: &dyn Store,
    declared: &Queues,
    revisions: &mut HashMap<String, u64>,
    warnings: &mut Vec<String>,
) -> Result<(Queues, Vec<Queue>), StoreError> {
    let mut stored = Vec::new();
    for (key, v) in store.list("queues/").await? {
        let queue = cohort_proto::QueueSpec::decode(v.value.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|spec| Queue::from_spec(&spec));
        match queue {
            Ok(queue) => {
                revisions.insert(key, v.revision);
                stored.push(queue);
            }
            Err(e) => {
                tracing::error!(key, error = %e, "stored queue cannot be read; skipping it");
                warnings
                    .push(format!("store key {key}: not a queue ({e}); skipped: set it again with `cohort queue set`"));
            }
        }
    }
    if stored.is_empty() {
        return Ok((declared.with_stored(declared.all().to_vec()), declared.all().to_vec()));
    }
    let queues = declared.with_stored(stored.clone());
    let seed = queues.all().iter().filter(|q| !stored.iter().any(|s| s.name == q.name)).cloned().collect();
    if declared.all().iter().any(|d| queues.of(Some(&d.name)) != Some(d)) {
        tracing::warn!(
            "the store's queues (set through the admin API or seeded earlier) differ from --queues; the store's are in force"
        );
    }
    Ok((queues, seed))
}

/// The stored fair-share usage; zero when none is stored or it cannot be read.
pub(super) async fn load_fair_share(
    store: &dyn Store,
    revisions: &mut HashMap<String, u64>,
    warnings: &mut Vec<String>,
) -> Result<FairShare, StoreError> {
    let Some(v) = store.get(FAIR_SHARE_KEY).await? else { return Ok(FairShare::default()) };
    revisions.insert(FAIR_SHARE_KEY.into(), v.revision);
    match FairShareRecord::decode(v.value.as_slice()) {
        Ok(record) => Ok(FairShare::from_record(record)),
        Err(e) => {
            warnings.push(format!("store key {FAIR_SHARE_KEY}: undecodable ({e}); fair share starts from zero"));
            Ok(FairShare::default())
        }
    }
}

impl Controller {
    /// Writes the fair-share usage to the store, at most every
    /// [`FAIR_SHARE_EVERY`], while jobs hold GPUs and once after: on an idle
    /// cluster it only decays, which the next load works out from its time.
    pub(super) fn store_fair_share(&self, state: &mut State) {
        let now = Instant::now();
        if state.fair_share_stored.is_some_and(|at| now.duration_since(at) < FAIR_SHARE_EVERY) {
            return;
        }
        let busy = state.jobs.values().any(|e| e.holds_resources());
        if !busy && !state.fair_share_busy && state.fair_share_stored.is_some() {
            return;
        }
        state.fair_share_busy = busy;
        state.fair_share_stored = Some(now);
        drop(self.writer.write(FAIR_SHARE_KEY.into(), Some(state.fair_share.to_record().encode_to_vec())));
    }

    /// `cohort queues`: every queue and how it is used now.
    pub async fn list_queues(&self) -> ListQueuesResponse {
        self.state
            .call(|state, _| ListQueuesResponse {
                queues: queue_statuses(state),
                default_queue: state.queues.default_name().to_string(),
                fair_share_half_life_ms: i64::try_from(state.queues.half_life.as_millis()).unwrap_or(i64::MAX),
            })
            .await
    }

    /// Creates or replaces a queue: stored first, in force once stored.
    pub async fn set_queue(&self, spec: QueueSpec) -> Result<QueueStatus, ControllerError> {
        let queue = Queue::from_spec(&spec).map_err(|e| ControllerError::InvalidRequest(format!("queue {e}")))?;
        let name = queue.name.clone();
        self.writer.write(queue_key(&name), Some(queue.to_spec().encode_to_vec())).wait().await?;
        let status = self
            .state
            .call(move |state, _| {
                Arc::make_mut(&mut state.queues).set(queue);
                queue_statuses(state).into_iter().find(|q| q.spec.as_ref().is_some_and(|s| s.name == name))
            })
            .await;
        tracing::info!(queue = %spec.name, "queue set through the admin API");
        self.wake.notify_one();
        Ok(status.unwrap_or_default())
    }

    /// Deletes a queue that no pending or running job is in.
    pub async fn delete_queue(&self, name: &str) -> Result<QueueSpec, ControllerError> {
        let owned = name.to_string();
        let removed = self
            .state
            .call(move |state, _| {
                let active: Vec<&str> = state
                    .jobs
                    .values()
                    .filter(|e| !e.is_terminal() && queue_name(&state.queues, e) == owned)
                    .map(|e| e.job.id.as_str())
                    .collect();
                if !active.is_empty() {
                    return Err(ControllerError::FailedPrecondition(format!(
                        "queue {owned} has {} active job(s) ({}): cancel them or wait until they end, then delete it",
                        active.len(),
                        node_list(&active)
                    )));
                }
                Arc::make_mut(&mut state.queues).remove(&owned).map_err(ControllerError::InvalidRequest)
            })
            .await?;
        if let Err(e) = self.writer.write(queue_key(name), None).wait().await {
            // Not deleted from the store: back as it was.
            let queue = removed.clone();
            self.state.call(move |state, _| Arc::make_mut(&mut state.queues).set(queue)).await;
            return Err(e.into());
        }
        tracing::info!(queue = %name, "queue deleted through the admin API");
        Ok(removed.to_spec())
    }

    /// GPU-hours per (user, queue) from `since` (0: everything held) to now.
    pub async fn usage(&self, since_unix_ms: i64) -> GetUsageResponse {
        self.state.call(move |state, _| usage(state, since_unix_ms, now_unix_ms())).await
    }
}

/// The queue a job is in: the one recorded at submit, else its `queue:` or the default.
pub(super) fn queue_name(queues: &Queues, entry: &JobEntry) -> String {
    if !entry.job.queue.is_empty() {
        return entry.job.queue.clone();
    }
    entry.spec.queue.clone().unwrap_or_else(|| queues.default_name().to_string())
}

/// The queue a job is in; None for a queue deleted since.
pub(super) fn queue_of<'a>(queues: &'a Queues, entry: &JobEntry) -> Option<&'a Queue> {
    queues.of(Some(&queue_name(queues, entry)))
}

/// A job's time limit: its own `time_limit`, else its queue's `max_run_time`.
pub(super) fn time_limit_of(queues: &Queues, entry: &JobEntry) -> Option<std::time::Duration> {
    queue_of(queues, entry).map_or(entry.spec.time_limit, |q| q.time_limit(entry.spec.time_limit))
}

/// Every queue with what it uses now, in name order.
pub(super) fn queue_statuses(state: &State) -> Vec<QueueStatus> {
    let queues = &state.queues;
    let mut by_name: BTreeMap<&str, QueueStatus> = queues
        .all()
        .iter()
        .map(|q| {
            let status = QueueStatus {
                spec: Some(q.to_spec()),
                is_default: q.name == queues.default_name(),
                fair_share_usage: state.fair_share.queue_usage(&q.name),
                target_share: queues.target_share(&q.name),
                usage_share: state.fair_share.queue_usage(&q.name) / state.fair_share.total_queue_usage().max(1e-9),
                ..QueueStatus::default()
            };
            (q.name.as_str(), status)
        })
        .collect();
    for entry in state.jobs.values().filter(|e| !e.spec.is_pipeline()) {
        let Some(status) = by_name.get_mut(queue_name(queues, entry).as_str()) else { continue };
        if entry.holds_resources() {
            status.running_jobs += 1;
            status.used_gpus += gpus_of(entry);
        } else if entry.phase() == JobPhase::Pending {
            status.pending_jobs += 1;
        }
    }
    lend(by_name.values_mut());
    by_name.into_values().collect()
}

/// Borrowed: GPUs held beyond the quota. Lent: the borrowed GPUs spread over
/// the idle quota of the queues that have some, in name order.
fn lend<'a>(statuses: impl Iterator<Item = &'a mut QueueStatus>) {
    let mut statuses: Vec<&mut QueueStatus> = statuses.collect();
    let quota = |s: &QueueStatus| s.spec.as_ref().and_then(|q| q.gpus);
    for s in statuses.iter_mut() {
        s.borrowed_gpus = quota(s).map_or(0, |q| s.used_gpus.saturating_sub(q));
    }
    let mut borrowed: u32 = statuses.iter().map(|s| s.borrowed_gpus).sum();
    for s in statuses.iter_mut() {
        let idle = quota(s).map_or(0, |q| q.saturating_sub(s.used_gpus));
        s.lent_gpus = idle.min(borrowed);
        borrowed -= s.lent_gpus;
    }
}

/// The GPUs a job's placement takes (its current attempt's, else its shape).
fn gpus_of(entry: &JobEntry) -> u32 {
    entry
        .plan()
        .map(|p| p.nodes.iter().map(|a| a.gpu_indices.len() as u32).sum())
        .unwrap_or(entry.spec.nodes * entry.spec.gpus_per_node)
}

/// GPU time per (user, queue) in [since, now]: every attempt's GPUs × the
/// part of its placed-to-ended span (now for the attempt still holding GPUs)
/// inside the window.
pub(super) fn usage(state: &State, since_unix_ms: i64, now: i64) -> GetUsageResponse {
    let mut rows: BTreeMap<(String, String), (UsageRow, BTreeSet<String>)> = BTreeMap::new();
    let mut oldest = now;
    for entry in state.jobs.values().filter(|e| !e.spec.is_pipeline()) {
        let gpus = entry.spec.nodes * entry.spec.gpus_per_node;
        let user = entry.job.file.as_ref().map(|f| f.submitted_by.clone()).unwrap_or_default();
        let queue = queue_name(&state.queues, entry);
        oldest = oldest.min(entry.job.submitted_unix_ms);
        for attempt in &entry.job.attempts {
            if attempt.started_unix_ms <= 0 {
                continue;
            }
            let current = attempt.attempt == entry.job.attempt;
            let holding = current && entry.holds_resources();
            let end = match attempt.finished_unix_ms {
                0 if holding => now,
                0 => entry.job.finished_unix_ms,
                end => end,
            };
            let start = attempt.started_unix_ms.max(since_unix_ms);
            if end <= start {
                continue;
            }
            let (row, jobs) = rows.entry((user.clone(), queue.clone())).or_insert_with(|| {
                (UsageRow { user: user.clone(), queue: queue.clone(), ..UsageRow::default() }, BTreeSet::new())
            });
            row.gpu_hours += f64::from(gpus) * (end - start) as f64 / 3_600_000.0;
            row.attempts += 1;
            if holding {
                row.running_gpus += gpus_of(entry);
            }
            jobs.insert(entry.job.id.clone());
        }
    }
    let rows = rows
        .into_values()
        .map(|(mut row, jobs)| {
            row.jobs = jobs.len() as u32;
            row
        })
        .collect();
    GetUsageResponse { rows, since_unix_ms: if since_unix_ms > 0 { since_unix_ms } else { oldest }, until_unix_ms: now }
}
