//! Progress of running attempts: hang detection and the straggler report.
//!
//! Progress is a new training iteration (parsed metrics), output on any rank,
//! or a change in the utilisation of the job's GPUs (a rank spinning in a
//! hung NCCL kernel shows a flat 100 %, so only change counts). No progress
//! for the hang timeout marks the attempt hung: every node dumps its ranks'
//! Python stacks, then the attempt fails with cause `hang`, naming the node
//! whose ranks stopped first. Per node, the time between consecutive output
//! bursts of its ranks gives its step interval; a node slower than the
//! median of the others by `straggler_factor` is flagged.

use std::collections::{BTreeMap, HashSet, VecDeque};

use cohort_proto::{NodeProgress, ProcessPhase, StackDump};
use cohort_shared::failure::FailureCause;

use super::*;

/// The floor of the default hang timeout, and its multiple of the median iteration time.
const DEFAULT_HANG_FLOOR: Duration = Duration::from_secs(300);
const HANG_ITERATIONS: u32 = 10;
/// How long the stack dumps of a hung attempt are waited for.
const DUMP_WAIT: Duration = Duration::from_secs(15);
/// Output after this much quiet starts a new progress event of a node.
const EVENT_GAP: Duration = Duration::from_millis(100);
/// Intervals kept per node for its median step interval.
const INTERVALS: usize = 20;
/// Intervals a node needs before it can be called a straggler.
const MIN_INTERVALS: usize = 4;
/// A GPU utilisation change of this many points counts as progress.
const GPU_CHANGE_PCT: f64 = 5.0;

/// What is known of the current attempt's progress (memory only).
#[derive(Default)]
pub(super) struct AttemptProgress {
    attempt: u32,
    last_progress: Option<Instant>,
    last_progress_unix_ms: i64,
    /// When the attempt was placed, on the monotonic clock (for the time limit).
    placed_since: Option<Instant>,
    last_iteration: Option<(u64, Instant)>,
    /// Seconds per iteration, newest last.
    iteration_times: VecDeque<f64>,
    nodes: BTreeMap<String, NodeTrack>,
    hang: Option<HangCheck>,
}

#[derive(Default)]
struct NodeTrack {
    last_output: Option<Instant>,
    last_output_unix_ms: i64,
    last_event: Option<Instant>,
    intervals: VecDeque<f64>,
    events: u32,
    gpu_util: Option<f64>,
}

struct HangCheck {
    declared: Instant,
    silent_for: Duration,
    waiting: HashSet<String>,
    dumps: Vec<(String, StackDump)>,
}

impl AttemptProgress {
    /// The last training iteration attempt `attempt` reported, if this controller saw one.
    pub(super) fn last_iteration_of(&self, attempt: u32) -> Option<u64> {
        self.last_iteration.filter(|_| self.attempt == attempt).map(|(i, _)| i)
    }

    /// Forgets an earlier attempt's progress.
    fn at(&mut self, attempt: u32) -> &mut Self {
        if self.attempt != attempt {
            *self = AttemptProgress { attempt, ..Default::default() };
        }
        self
    }

    fn progressed(&mut self, now: Instant) {
        self.last_progress = Some(now);
        self.last_progress_unix_ms = now_unix_ms();
    }

    fn median_iteration_s(&self) -> Option<f64> {
        median(self.iteration_times.iter().copied().collect())
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] })
}

/// The hang timeout in force: the job's `hang_timeout`, else the larger of
/// 10 × the median recent iteration time and 5 minutes for a job that reports
/// iterations (every megatron-sft job does); off for a command job that
/// reports none and names no timeout.
pub(super) fn hang_timeout(spec: &JobSpec, median_iteration_s: Option<f64>) -> Option<Duration> {
    if let Some(t) = spec.hang_timeout {
        return Some(t);
    }
    match (median_iteration_s, &spec.workload) {
        (Some(m), _) => Some(Duration::from_secs_f64(m * f64::from(HANG_ITERATIONS)).max(DEFAULT_HANG_FLOOR)),
        (None, Workload::MegatronSft(_)) => Some(DEFAULT_HANG_FLOOR),
        (None, Workload::Command(_) | Workload::Pipeline(_)) => None,
    }
}

/// The straggler report: per node, its median step interval and GPU use, and
/// whether it is slower than the median of the others by `factor`.
pub(super) fn node_report(progress: &AttemptProgress, factor: f64) -> Vec<NodeProgress> {
    let medians: BTreeMap<&str, f64> = progress
        .nodes
        .iter()
        .filter(|(_, t)| t.intervals.len() >= MIN_INTERVALS)
        .filter_map(|(n, t)| Some((n.as_str(), median(t.intervals.iter().copied().collect())?)))
        .collect();
    progress
        .nodes
        .iter()
        .map(|(name, t)| {
            let own = medians.get(name.as_str()).copied();
            let others = median(medians.iter().filter(|(n, _)| **n != name.as_str()).map(|(_, m)| *m).collect());
            let straggler = matches!((own, others), (Some(own), Some(others)) if own > factor * others);
            NodeProgress {
                node_name: name.clone(),
                last_output_unix_ms: t.last_output_unix_ms,
                step_interval_s: own.unwrap_or(0.0),
                gpu_utilization_pct: t.gpu_util.unwrap_or(-1.0),
                straggler,
                events: t.events,
            }
        })
        .collect()
}

impl Controller {
    /// Output lines of a node arrived for an attempt; returns the node's rank
    /// in the job's plan, for the log lines (one state command for both).
    pub async fn output_seen(&self, job_id: &str, attempt: u32, node: &str) -> u32 {
        let now = Instant::now();
        let (job_id, node) = (job_id.to_string(), node.to_string());
        self.state
            .call(move |state, _| {
                let rank = state.jobs.get(&job_id).map(|e| e.node_rank(&node)).unwrap_or(0);
                // The ranks' output is the node's word too.
                if let Some(n) = state.nodes.get_mut(&node) {
                    n.spoke(now);
                }
                Self::output_seen_at(state, &job_id, attempt, &node, now);
                rank
            })
            .await
    }

    /// [`Self::output_seen`] on the state.
    fn output_seen_at(state: &mut State, job_id: &str, attempt: u32, node: &str, now: Instant) {
        let Some(entry) = state.jobs.get_mut(job_id).filter(|e| e.is_active() && e.job.attempt == attempt) else {
            return;
        };
        let progress = entry.progress.at(attempt);
        progress.progressed(now);
        let track = progress.nodes.entry(node.to_string()).or_default();
        track.last_output = Some(now);
        track.last_output_unix_ms = now_unix_ms();
        if track.last_event.is_none_or(|e| now.duration_since(e) >= EVENT_GAP) {
            if let Some(previous) = track.last_event {
                if track.intervals.len() == INTERVALS {
                    track.intervals.pop_front();
                }
                track.intervals.push_back(now.duration_since(previous).as_secs_f64());
            }
            track.last_event = Some(now);
            track.events += 1;
        }
    }

    /// An agent dropped `bytes` of the attempt's output (a gap record, `text`):
    /// counted on the job and told to its watchers.
    pub async fn output_dropped(&self, job_id: &str, attempt: u32, bytes: u64, text: &str) {
        let (job_id, text) = (job_id.to_string(), text.to_string());
        self.state
            .call(move |state, ctl| {
                let Some(entry) = state.jobs.get_mut(&job_id).filter(|e| e.job.attempt == attempt) else { return };
                entry.job.output_dropped_bytes += bytes;
                tracing::warn!(job = %job_id, attempt, bytes, "{text}");
                ctl.publish(state, &job_id, &text);
            })
            .await
    }

    /// A training iteration was reported.
    pub(super) fn iteration_seen(entry: &mut JobEntry, attempt: u32, point: &cohort_proto::TrainingPoint) {
        if point.is_eval || point.is_save || entry.job.attempt != attempt {
            return;
        }
        let now = Instant::now();
        let progress = entry.progress.at(attempt);
        if let Some((iteration, at)) = progress.last_iteration
            && point.iteration > iteration
        {
            let per_iteration = point
                .iteration_time_s
                .unwrap_or_else(|| now.duration_since(at).as_secs_f64() / (point.iteration - iteration) as f64);
            if progress.iteration_times.len() == INTERVALS {
                progress.iteration_times.pop_front();
            }
            progress.iteration_times.push_back(per_iteration);
        }
        if progress.last_iteration.is_none_or(|(i, _)| point.iteration > i) {
            progress.last_iteration = Some((point.iteration, now));
            progress.progressed(now);
        }
    }

    /// GPU utilisation of the jobs running on a node, from its heartbeat.
    pub(super) fn gpus_seen(state: &mut State, node: &str) {
        let Some(telemetry) = state.nodes.get(node).map(|n| n.telemetry.clone()) else { return };
        let now = Instant::now();
        for entry in state.jobs.values_mut().filter(|e| e.phase() == JobPhase::Running) {
            let Some(gpus) =
                entry.plan().and_then(|p| p.nodes.iter().find(|a| a.node_name == node)).map(|a| a.gpu_indices.clone())
            else {
                continue;
            };
            let utils: Vec<f64> = telemetry
                .iter()
                .filter(|t| gpus.contains(&t.index))
                .filter_map(|t| t.utilization_gpu_pct.map(f64::from))
                .collect();
            if utils.is_empty() {
                continue;
            }
            let mean = utils.iter().sum::<f64>() / utils.len() as f64;
            let attempt = entry.job.attempt;
            let progress = entry.progress.at(attempt);
            let track = progress.nodes.entry(node.to_string()).or_default();
            let changed = track.gpu_util.is_some_and(|before| (before - mean).abs() >= GPU_CHANGE_PCT);
            track.gpu_util = Some(mean);
            if changed {
                progress.progressed(now);
            }
        }
    }

    /// One node's stack dumps of a hung attempt arrived.
    pub async fn stack_dump(&self, node: &str, dump: StackDump) {
        let node_name = node.to_string();
        let (dump, taken) = self
            .state
            .call(move |state, ctl| {
                let taken = Self::stack_dump_seen(state, &node_name, &dump);
                if taken.is_some() {
                    ctl.wake.notify_one();
                }
                (dump, taken)
            })
            .await;
        let Some((rank, lines)) = taken else { return };
        let now = now_unix_ms();
        let lines = lines
            .into_iter()
            .map(|text| cohort_proto::LogLine {
                process_index: 0,
                stream: cohort_proto::LogStream::Stderr as i32,
                text,
                unix_ms: now,
                dropped_bytes: 0,
            })
            .collect();
        self.logs.append(&dump.job_id, node, rank, dump.attempt, lines).await;
    }

    /// [`Self::stack_dump`] on the state: the node's rank and the dump as log
    /// lines; None when the dump is not of the job's current attempt.
    fn stack_dump_seen(state: &mut State, node: &str, dump: &StackDump) -> Option<(u32, Vec<String>)> {
        let entry = state.jobs.get_mut(&dump.job_id).filter(|e| e.job.attempt == dump.attempt)?;
        let rank = entry.plan().and_then(|p| p.nodes.iter().find(|a| a.node_name == node)).map(|a| a.node_rank);
        let mut lines = Vec::new();
        for p in &dump.processes {
            let header = format!("[cohort stack dump] process {} ({}):", p.index, p.method);
            lines.push(header);
            lines.extend(p.tasks.iter().map(|t| format!("[cohort stack dump]   {t}")));
            lines.extend(p.text.lines().map(|l| format!("[cohort stack dump] {l}")));
        }
        if let Some(hang) = entry.progress.hang.as_mut() {
            hang.waiting.remove(node);
            hang.dumps.push((node.to_string(), dump.clone()));
        }
        Some((rank.unwrap_or(0), lines))
    }

    /// Fails the active attempt of `id` when it has held its GPUs, from its
    /// placement (preparation included, as Slurm counts from the allocation),
    /// past its time limit (its own, else its queue's `max_run_time`): the
    /// end a backfill reservation counted on. True when it did.
    fn stop_at_time_limit(&self, state: &mut State, id: &str) -> bool {
        let Some(entry) = state.jobs.get_mut(id) else { return false };
        let limit = super::queue_admin::time_limit_of(&state.queues, entry);
        let Some(limit) = limit.filter(|_| !entry.spec.is_pipeline()) else { return false };
        if entry.job.started_unix_ms <= 0 {
            return false;
        }
        // From the placement time on record, so that a controller restart does not reset it.
        let now = Instant::now();
        let started_unix_ms = entry.job.started_unix_ms;
        let placed_since = *entry.progress.at(entry.job.attempt).placed_since.get_or_insert_with(|| {
            let ago_ms = (now_unix_ms() - started_unix_ms).max(0) as u64;
            now.checked_sub(Duration::from_millis(ago_ms)).unwrap_or(now)
        });
        let ran = now.duration_since(placed_since);
        if ran <= limit {
            return false;
        }
        entry.progress.hang = None;
        let failure = time_limit_failure(limit, ran);
        let attempt = entry.job.attempt;
        tracing::warn!(job = %id, attempt, ran = ?ran, limit = ?limit, "time limit reached; stopping the gang");
        let message = failure.message.clone();
        self.fail(state, id, failure);
        self.publish(state, id, &message);
        true
    }

    /// The reconcile step for placed attempts: stops those past their time
    /// limit; for running ones refreshes the straggler report, declares hangs
    /// (and asks for stack dumps), and fails hung attempts once the dumps are
    /// in. Returns the jobs to persist.
    pub(super) fn check_progress(&self, state: &mut State) -> Vec<String> {
        let now = Instant::now();
        let mut changed = Vec::new();
        // Placed attempts: one still preparing or starting counts against its time limit too.
        let ids: Vec<String> = state
            .jobs
            .values()
            .filter(|e| matches!(e.phase(), JobPhase::Preparing | JobPhase::Starting | JobPhase::Running))
            .map(|e| e.job.id.clone())
            .collect();
        for id in ids {
            if self.stop_at_time_limit(state, &id) {
                changed.push(id.clone());
                continue;
            }
            let Some(entry) = state.jobs.get_mut(&id).filter(|e| e.phase() == JobPhase::Running) else { continue };
            let attempt = entry.job.attempt;
            let factor = entry.spec.straggler_factor;
            let progress = entry.progress.at(attempt);
            if progress.last_progress.is_none() {
                // Counting starts when the whole gang runs.
                progress.progressed(now);
            }
            let timeout = hang_timeout(&entry.spec, progress.median_iteration_s());
            let silent = progress.last_progress.map(|t| now.duration_since(t)).unwrap_or_default();
            let report = node_report(progress, factor);
            let last_progress_unix_ms = progress.last_progress_unix_ms;
            let flagged: Vec<String> = report.iter().filter(|n| n.straggler).map(|n| n.node_name.clone()).collect();
            let was: Vec<String> =
                entry.job.node_progress.iter().filter(|n| n.straggler).map(|n| n.node_name.clone()).collect();
            entry.job.node_progress = report;
            entry.job.last_progress_unix_ms = last_progress_unix_ms;
            entry.job.hang_timeout_ms = timeout.map(|t| t.as_millis() as i64).unwrap_or(0);
            if flagged != was {
                for node in flagged.iter().filter(|n| !was.contains(n)) {
                    tracing::warn!(job = %id, node, factor, "straggler: the node's ranks progress slower than the others'");
                }
                self.publish(
                    state,
                    &id,
                    &format!("stragglers: {}", if flagged.is_empty() { "none".into() } else { flagged.join(", ") }),
                );
            }
            let Some(entry) = state.jobs.get_mut(&id) else { continue };
            match (&entry.progress.hang, timeout) {
                (None, Some(timeout)) if silent > timeout => {
                    let nodes: HashSet<String> =
                        entry.job.processes.iter().filter(|p| is_live(p)).map(|p| p.node_name.clone()).collect();
                    tracing::warn!(job = %id, attempt, silent = ?silent, "no progress for the hang timeout: hung; dumping stacks");
                    entry.job.reason = format!(
                        "hung: no progress for {} (hang_timeout {}); collecting stack dumps",
                        humantime::format_duration(Duration::from_secs(silent.as_secs())),
                        humantime::format_duration(timeout)
                    );
                    entry.progress.hang = Some(HangCheck {
                        declared: now,
                        silent_for: silent,
                        waiting: nodes.clone(),
                        dumps: Vec::new(),
                    });
                    for node in nodes {
                        let command =
                            Command::DumpStacks(cohort_proto::DumpStacksCommand { job_id: id.clone(), attempt });
                        if !Self::send_command(state, &node, command)
                            && let Some(hang) = state.jobs.get_mut(&id).and_then(|e| e.progress.hang.as_mut())
                        {
                            hang.waiting.remove(&node);
                        }
                    }
                    self.publish(state, &id, "hung");
                }
                (Some(hang), _) if hang.waiting.is_empty() || now.duration_since(hang.declared) > DUMP_WAIT => {
                    let failure = hang_failure(entry, hang);
                    if let Some(record) = entry.job.attempts.last_mut() {
                        record.stack_dumps = summarize(&hang.dumps);
                    }
                    entry.progress.hang = None;
                    let message = failure.message.clone();
                    self.fail(state, &id, failure);
                    self.publish(state, &id, &message);
                    changed.push(id.clone());
                }
                _ => {}
            }
        }
        changed
    }
}

/// The failure of an attempt stopped at its time limit, `ran` after it was placed.
fn time_limit_failure(limit: Duration, ran: Duration) -> Failure {
    let limit = humantime::format_duration(limit);
    let ran = humantime::format_duration(Duration::from_secs(ran.as_secs()));
    Failure {
        cause: FailureCause::TimeLimit.name().into(),
        detail: format!("held its GPUs {ran} from its placement, past the time_limit of {limit}"),
        message: format!(
            "time limit reached: held its GPUs {ran} from its placement, time_limit {limit}; the gang was stopped"
        ),
        ..Failure::default()
    }
}

/// One line per node: how its stacks were taken, and what was stuck.
fn summarize(dumps: &[(String, StackDump)]) -> Vec<String> {
    dumps
        .iter()
        .map(|(node, dump)| {
            let methods: Vec<&str> = dump.processes.iter().map(|p| p.method.as_str()).collect();
            let stuck: Vec<String> =
                dump.processes.iter().flat_map(|p| p.stuck_pids.iter().map(|p| p.to_string())).collect();
            let stuck = if stuck.is_empty() { String::new() } else { format!("; stuck pids {}", stuck.join(", ")) };
            format!(
                "{node}: {} process(es) ({}){stuck}; see `cohort logs` ([cohort stack dump] lines)",
                dump.processes.len(),
                methods.join(", ")
            )
        })
        .collect()
}

/// The last iteration and the total, when the current attempt has reported
/// its last training iteration: a hang after it is a hang at exit.
fn finished_training(job: &Job) -> Option<(u64, u64)> {
    let point = job.progress.as_ref().filter(|p| !p.is_eval && !p.is_save && p.unix_ms >= job.started_unix_ms)?;
    let total = point.total_iterations.filter(|total| *total > 0 && point.iteration >= *total)?;
    Some((point.iteration, total))
}

/// The failure of a hung attempt, with the suspect node: one with a stopped
/// or stuck process; else one whose ranks all exited 0 while the others
/// waited; else the one whose ranks' output stopped first.
fn hang_failure(entry: &JobEntry, hang: &HangCheck) -> Failure {
    let rank_of = |node: &str| {
        entry.plan().and_then(|p| p.nodes.iter().find(|a| a.node_name == node)).map(|a| a.node_rank).unwrap_or(0)
    };
    let silent = humantime::format_duration(Duration::from_secs(hang.silent_for.as_secs()));
    let stuck = hang.dumps.iter().find_map(|(node, d)| {
        let p = d.processes.iter().find(|p| !p.stuck_pids.is_empty())?;
        let pid = p.stuck_pids[0];
        let task = p
            .tasks
            .iter()
            .find(|t| t.starts_with(&format!("pid {pid} ")))
            .cloned()
            .unwrap_or_else(|| format!("pid {pid}"));
        Some((node.clone(), format!("its process {task}")))
    });
    let nodes: Vec<&str> =
        entry.plan().map(|p| p.nodes.iter().map(|a| a.node_name.as_str()).collect()).unwrap_or_default();
    let exited_clean = || {
        nodes
            .iter()
            .find(|n| {
                let mine: Vec<&ProcessStatus> = entry.job.processes.iter().filter(|p| p.node_name == **n).collect();
                !mine.is_empty()
                    && mine.iter().all(|p| p.phase == ProcessPhase::Exited as i32 && p.exit_code == Some(0))
            })
            .map(|n| {
                (n.to_string(), "its ranks exited with code 0 while the other nodes' ranks kept waiting".to_string())
            })
    };
    let first_silent = || {
        let tracks = &entry.progress.nodes;
        let newest = tracks.values().map(|t| t.last_output_unix_ms).max().unwrap_or(0);
        nodes
            .iter()
            .map(|n| (*n, tracks.get(*n).map(|t| t.last_output_unix_ms).unwrap_or(0)))
            .min_by_key(|(_, at)| *at)
            .map(|(n, at)| {
                let why = if at == 0 {
                    "its ranks printed nothing".to_string()
                } else {
                    format!(
                        "its ranks' output stopped first, {:.1}s before the last output of the others",
                        (newest - at) as f64 / 1000.0
                    )
                };
                (n.to_string(), why)
            })
    };
    let (suspect, why) = stuck.or_else(exited_clean).or_else(first_silent).unwrap_or_default();
    let at_exit = finished_training(&entry.job)
        .map(|(it, total)| {
            format!(
                "; this attempt had finished training (iteration {it}/{total}): it hung in its tear-down \
                 (process group destroy, final barrier or checkpoint)"
            )
        })
        .unwrap_or_default();
    let message = if suspect.is_empty() {
        format!("hung: no progress for {silent}{at_exit}")
    } else {
        format!(
            "hung: no progress for {silent}; suspect node {suspect} (node rank {}): {why}{at_exit}",
            rank_of(&suspect)
        )
    };
    Failure {
        node_name: suspect.clone(),
        node_rank: rank_of(&suspect),
        cause: FailureCause::Hang.name().into(),
        detail: format!("no progress (iteration, output, GPU utilisation) for {silent}{at_exit}"),
        suspect_node: suspect,
        suspect_reason: why,
        message,
        ..Failure::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn track(intervals: &[f64]) -> NodeTrack {
        NodeTrack {
            intervals: intervals.iter().copied().collect(),
            events: intervals.len() as u32 + 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_node_slower_than_the_others_by_the_factor_is_a_straggler() {
        let mut progress = AttemptProgress::default();
        progress.nodes.insert("a".into(), track(&[1.0, 1.1, 0.9, 1.0]));
        progress.nodes.insert("b".into(), track(&[1.0, 1.0, 1.2, 1.0]));
        progress.nodes.insert("c".into(), track(&[2.0, 2.1, 1.9, 2.2]));
        progress.nodes.insert("d".into(), track(&[5.0]));
        let report = node_report(&progress, 1.5);
        let flagged: Vec<&str> = report.iter().filter(|n| n.straggler).map(|n| n.node_name.as_str()).collect();
        assert_eq!(flagged, ["c"], "{report:?}");
        assert_eq!(report.iter().find(|n| n.node_name == "d").map(|n| n.step_interval_s), Some(0.0), "too few events");
        // Not slower than 2.5 × the others.
        assert!(node_report(&progress, 2.5).iter().all(|n| !n.straggler));
    }

    #[test]
    fn two_nodes_compare_with_each_other() {
        let mut progress = AttemptProgress::default();
        progress.nodes.insert("a".into(), track(&[1.0; 6]));
        progress.nodes.insert("b".into(), track(&[1.6; 6]));
        let report = node_report(&progress, 1.5);
        assert_eq!(report.iter().map(|n| n.straggler).collect::<Vec<_>>(), [false, true]);
    }

    #[test]
    fn a_hang_after_the_last_iteration_is_called_a_hang_at_exit() {
        let spec = JobSpec::from_yaml("name: a\nkind: command\nnodes: 1\ncommand: [x]\n", "t").unwrap();
        let point = |iteration, unix_ms| cohort_proto::TrainingPoint {
            iteration,
            total_iterations: Some(60),
            unix_ms,
            ..Default::default()
        };
        let hang = HangCheck {
            declared: Instant::now(),
            silent_for: Duration::from_secs(300),
            waiting: HashSet::new(),
            dumps: Vec::new(),
        };
        let failure_with = |progress| {
            let job = Job { id: "a-1".into(), started_unix_ms: 1_000, progress, ..Job::default() };
            hang_failure(&JobEntry::submitted(job, spec.clone(), 1), &hang)
        };
        let at_exit = failure_with(Some(point(60, 2_000)));
        assert_eq!(at_exit.cause, "hang");
        assert!(
            at_exit.message.contains("finished training (iteration 60/60): it hung in its tear-down"),
            "{at_exit:?}"
        );
        assert!(at_exit.detail.contains("hung in its tear-down"), "{at_exit:?}");
        for (progress, why) in [
            (Some(point(45, 2_000)), "mid-training"),
            (Some(point(60, 500)), "the last iteration of an earlier attempt"),
            (None, "no metrics"),
        ] {
            let failure = failure_with(progress);
            assert!(!failure.message.contains("tear-down"), "{why}: {failure:?}");
        }
    }

    #[test]
    fn default_hang_timeout() {
        let command = JobSpec::from_yaml("name: a\nkind: command\nnodes: 1\ncommand: [x]\n", "t").unwrap();
        assert_eq!(hang_timeout(&command, None), None, "a command job without metrics or a timeout is not watched");
        assert_eq!(hang_timeout(&command, Some(2.0)), Some(Duration::from_secs(300)));
        assert_eq!(hang_timeout(&command, Some(45.0)), Some(Duration::from_secs(450)));
        let timed =
            JobSpec::from_yaml("name: a\nkind: command\nnodes: 1\ncommand: [x]\nhang_timeout: 90s\n", "t").unwrap();
        assert_eq!(hang_timeout(&timed, Some(45.0)), Some(Duration::from_secs(90)));
    }
}
