//! Job arrays (`array: 0-7%2`, `cohort submit --array`), as Slurm's
//! `--array`: one submit makes a job per element, admitted once for all.
//! Element `i` of array `<name>-<n>` is the job `<name>-<n>_<i>`, of the
//! array's name (as Slurm's), whose stored file is the array's without `array:` (so it
//! loads as a job of its own); its processes get `COHORT_ARRAY_ID` and
//! `COHORT_ARRAY_INDEX`. With `%N` at most N elements hold GPUs at once: the
//! others wait Pending, in index order. `cohort cancel ARRAY_ID` cancels every
//! element.

use std::collections::HashMap;

use super::*;

/// The file of each element: the array's without `array:` and `sweep:`,
/// with the element's sweep values in `env`.
fn element_files(file: &JobFile, spec: &JobSpec, indices: &[u32]) -> Result<Vec<(u32, JobFile)>, ControllerError> {
    let mut files = Vec::with_capacity(indices.len());
    for index in indices {
        let values = cohort_shared::spec::array::sweep_values(&spec.sweep, *index);
        let yaml = cohort_shared::spec::array::element_yaml(&file.yaml, &values)
            .map_err(|e| ControllerError::InvalidRequest(format!("job file {}: {e}", file.source_name)))?;
        let source_name = format!("{} (array element {index})", file.source_name);
        files.push((*index, JobFile { yaml, source_name, ..file.clone() }));
    }
    Ok(files)
}

/// What [`Controller::admit_array`] decided.
enum ArrayAdmitted {
    Repeat(Box<Job>),
    /// A repeat of a submit whose records are on their way to the store: look again once it is done.
    AfterFirst(tokio::sync::watch::Receiver<()>),
    New {
        entries: Vec<JobEntry>,
        stored: Vec<Durable>,
        counter: Durable,
        pending: tokio::sync::watch::Sender<()>,
    },
}

impl Controller {
    /// Submits an array: every element is checked, stored and queued, or none
    /// is (elements stored before a failed write are deleted again). A repeat
    /// (same request id) while the first is being stored waits for it.
    pub(super) async fn submit_array(
        &self,
        file: JobFile,
        spec: JobSpec,
        options: admission::SubmitOptions,
        warnings: Vec<String>,
    ) -> Result<(Job, Vec<String>), ControllerError> {
        admission::check_request_id(&options.request_id)?;
        let Some(array) = spec.array.clone() else { return Err(ControllerError::InvalidRequest("no array".into())) };
        let files = element_files(&file, &spec, &array.indices)?;
        let key = (file.submitted_by.clone(), options.request_id.clone());
        let (mut entries, stored, counter, _pending) = loop {
            let (key, spec, array, files, options) =
                (key.clone(), spec.clone(), array.clone(), files.clone(), options.clone());
            match self
                .state
                .call(move |state, ctl| ctl.admit_array(state, &spec, &array, files, &options, &key))
                .await?
            {
                ArrayAdmitted::Repeat(first) => return Ok((*first, warnings)),
                ArrayAdmitted::AfterFirst(mut first) => {
                    let _ = first.changed().await;
                }
                ArrayAdmitted::New { entries, stored, counter, pending } => break (entries, stored, counter, pending),
            }
        };
        let mut failed = None;
        for (entry, stored) in entries.iter_mut().zip(stored) {
            match stored.wait().await {
                Ok(revision) => entry.revision = Some(revision),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            // Not every element stored: none is a job. Those stored go again (else they would load at the next start).
            tracing::warn!(error = %e, "array submit refused: an element could not be stored");
            for entry in entries.iter().filter(|e| e.revision.is_some()) {
                if let Err(e) = self.writer.write(format!("jobs/{}", entry.job.id), None).wait().await {
                    tracing::error!(job = %entry.job.id, error = %e, "a stored element of a refused array could not be deleted");
                }
            }
            self.state.call(move |state, _| state.pending_submits.remove(&key)).await;
            return Err(e.into());
        }
        if let Err(e) = counter.wait().await {
            tracing::warn!(error = %e, "the job counter could not be stored; the job records hold their seq");
        }
        let first = self
            .state
            .call(move |state, ctl| {
                state.pending_submits.remove(&key);
                let first = entries.first().map(|e| e.job.clone()).unwrap_or_default();
                for entry in entries {
                    let id = entry.job.id.clone();
                    state.jobs.insert(id.clone(), entry);
                    ctl.publish(state, &id, "submitted");
                }
                if !key.1.is_empty() {
                    state.submitted.insert(key, first.id.clone());
                }
                tracing::info!(array = %first.array_id, elements = first.array_size, "job array submitted");
                first
            })
            .await;
        self.wake.notify_one();
        Ok((first, warnings))
    }

    /// [`Self::submit_array`] on the state: one admission for the array,
    /// then each element's record queued for the store.
    fn admit_array(
        &self,
        state: &mut State,
        spec: &JobSpec,
        array: &cohort_shared::spec::array::ArraySpec,
        files: Vec<(u32, JobFile)>,
        options: &admission::SubmitOptions,
        key: &(String, String),
    ) -> Result<ArrayAdmitted, ControllerError> {
        if let Some(first) = PendingSubmit::repeat_of(&mut state.pending_submits, key) {
            return Ok(ArrayAdmitted::AfterFirst(first));
        }
        if !options.request_id.is_empty()
            && let Some(first) = state.submitted.get(key).and_then(|id| state.jobs.get(id))
        {
            return Ok(ArrayAdmitted::Repeat(Box::new(first.job.clone())));
        }
        let admitted = self.admission_checks(state, spec, options)?;
        let first_seq = state.next_seq;
        state.next_seq += files.len() as u64;
        let array_id = format!("{}-{first_seq}", spec.name);
        let (mut entries, mut stored) = (Vec::new(), Vec::new());
        for (seq, (index, file)) in (first_seq..).zip(files) {
            let mut element = spec.clone();
            element.array = None;
            element.sweep = Vec::new();
            element.env.extend(cohort_shared::spec::array::sweep_values(&spec.sweep, index));
            let mut job = Self::new_record(&element, format!("{array_id}_{index}"), file, options, admitted.clone());
            job.array_id = array_id.clone();
            job.array_index = index;
            job.array_size = array.indices.len() as u32;
            job.array_max_running = array.max_running.unwrap_or(0);
            let entry = JobEntry::submitted(job, element, seq);
            let record = JobRecord { job: Some(entry.job.clone()), seq };
            stored.push(self.writer.write(format!("jobs/{}", entry.job.id), Some(record.encode_to_vec())));
            entries.push(entry);
        }
        let last = state.next_seq - 1;
        let counter = self.writer.write(JOB_SEQ_KEY.into(), Some(last.to_string().into_bytes()));
        let pending = PendingSubmit::begin(&mut state.pending_submits, key);
        Ok(ArrayAdmitted::New { entries, stored, counter, pending })
    }

    /// The elements of array `array_id`, in index order (empty: no such array).
    pub(super) fn array_elements(state: &State, array_id: &str) -> Vec<String> {
        let mut elements: Vec<&JobEntry> = state.jobs.values().filter(|e| e.job.array_id == array_id).collect();
        elements.sort_by_key(|e| e.job.array_index);
        elements.into_iter().map(|e| e.job.id.clone()).collect()
    }

    /// Pending elements that wait for their array's `%N` limit, with the reason.
    pub(super) fn settle_arrays(&self, state: &mut State) {
        for (id, reason) in held_back(state) {
            if let Some(entry) = state.jobs.get_mut(&id)
                && entry.job.reason != reason
            {
                entry.job.reason = reason;
                self.publish(state, &id, "pending");
            }
        }
    }
}

/// Pending elements beyond their array's `%N` limit (elements holding GPUs
/// count against it; the lowest indices go first), with why they wait.
pub(super) fn held_back(state: &State) -> HashMap<String, String> {
    let mut held = HashMap::new();
    let limited = || state.jobs.values().filter(|e| e.job.array_max_running > 0);
    let mut running: HashMap<&str, u32> = HashMap::new();
    for entry in limited().filter(|e| e.holds_resources()) {
        *running.entry(entry.job.array_id.as_str()).or_default() += 1;
    }
    let mut pending: Vec<&JobEntry> = limited().filter(|e| e.phase() == JobPhase::Pending).collect();
    pending.sort_by_key(|e| (e.job.array_index, e.seq));
    for entry in pending {
        let count = running.entry(entry.job.array_id.as_str()).or_default();
        let limit = entry.job.array_max_running;
        if *count < limit {
            *count += 1;
        } else {
            let reason = format!(
                "waiting for room in array {}: at most {limit} of its elements run at once (%{limit})",
                entry.job.array_id
            );
            held.insert(entry.job.id.clone(), reason);
        }
    }
    held
}
