//! What a replay measured: utilisation against the offered load, waits per
//! size class, each queue's share of the GPU-hours against its target.

use crate::engine::{Checks, Run};
use crate::trace::{QueueMix, TraceJob};

/// The size classes of the figures.
pub const CLASSES: [(&str, u32, u32); 3] = [("1-node", 1, 1), ("2-16", 2, 16), ("64-128", 17, u32::MAX)];

#[derive(Debug, Clone, Default)]
pub struct Waits {
    pub jobs: usize,
    pub mean_s: f64,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
}

#[derive(Debug, Clone)]
pub struct QueueShare {
    pub name: String,
    /// Its quota's share of the cluster (the queue's weight).
    pub weight: f64,
    /// Its share of the GPU-hours offered in the window: what its jobs would
    /// have used of it had each started when submitted.
    pub offered: f64,
    /// Weighted max-min fair share of the GPU-hours served, given what each queue offered.
    pub target: f64,
    /// Its share of the GPU-hours served in the window.
    pub served: f64,
    /// GPU-hours it ran beyond its quota (borrowed idle GPUs).
    pub borrowed_gpu_h: f64,
}

#[derive(Debug, Clone)]
pub struct Report {
    /// GPU-hours served in the window over the cluster's.
    pub utilisation: f64,
    /// GPU-hours the jobs would have used of the window had each started when
    /// submitted (on an endless cluster), over the cluster's.
    pub offered: f64,
    pub waits: Vec<(&'static str, Waits)>,
    pub shares: Vec<QueueShare>,
    pub backfilled: usize,
    pub borrowed: usize,
    /// Jobs of the window that had not started when the replay stopped (their wait counts to then).
    pub unstarted: usize,
    pub never_fits: usize,
    pub checks: Checks,
    /// Preemptions over the whole replay; None where the replay did not preempt.
    pub preemptions: Option<Preemptions>,
}

/// What preemption cost over the whole replay.
#[derive(Debug, Clone, Default)]
pub struct Preemptions {
    pub count: u64,
    /// Of them, for a borrower's fair share (`preempt_for_fair_share`).
    pub for_fair_share: u64,
    /// GPU-hours of work done and not saved.
    pub lost_gpu_h: f64,
    /// Iterations lost per preemption (at the replay's seconds per iteration): mean and most.
    pub lost_iterations_mean: f64,
    pub lost_iterations_max: f64,
}

/// The measuring window: jobs submitted in it, GPU-seconds served in it.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from_ms: i64,
    pub to_ms: i64,
    pub gpus: u32,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn waits(mut w: Vec<f64>) -> Waits {
    w.sort_by(f64::total_cmp);
    let mean = if w.is_empty() { 0.0 } else { w.iter().sum::<f64>() / w.len() as f64 };
    Waits {
        jobs: w.len(),
        mean_s: mean,
        p50_s: percentile(&w, 0.5),
        p99_s: percentile(&w, 0.99),
        max_s: w.last().copied().unwrap_or(0.0),
    }
}

/// Weighted max-min fair shares of a cluster of capacity 1 among queues that
/// offer `demand` (fractions of it): each gets min(demand, weight × x), x
/// raised until the cluster is full or every demand is met.
pub fn fair_targets(weights: &[f64], demand: &[f64]) -> Vec<f64> {
    let give = |x: f64| -> Vec<f64> { weights.iter().zip(demand).map(|(w, d)| d.min(w * x)).collect() };
    if demand.iter().sum::<f64>() <= 1.0 {
        return demand.to_vec();
    }
    let (mut lo, mut hi) = (0.0, 1.0 / weights.iter().copied().fold(f64::INFINITY, f64::min).max(1e-9));
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if give(mid).iter().sum::<f64>() < 1.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    give(hi)
}

/// `step_s`: seconds per training iteration, to count lost work in iterations.
pub fn measure(trace: &[TraceJob], queues: &[QueueMix], run: &Run, window: Window, step_s: f64) -> Report {
    let span_ms = (window.to_ms - window.from_ms) as f64;
    let capacity = f64::from(window.gpus) * span_ms;
    let overlap = |start: i64, end: i64| (end.min(window.to_ms) - start.max(window.from_ms)).max(0) as f64;
    let in_window = |j: &TraceJob| {
        let t = (j.submit_s * 1000.0) as i64;
        t >= window.from_ms && t < window.to_ms
    };
    let mut served = vec![0.0; queues.len()];
    let mut offered = vec![0.0; queues.len()];
    let mut borrowed = vec![0.0; queues.len()];
    let mut class_waits: Vec<Vec<f64>> = vec![Vec::new(); CLASSES.len()];
    let mut unstarted = 0;
    for (job, outcome) in trace.iter().zip(&run.outcomes) {
        let q = queues.iter().position(|q| q.name == job.queue).unwrap_or(0);
        let gpus = f64::from(job.gpus());
        if outcome.start_ms.is_some() {
            let gpu_ms: f64 = outcome.runs.iter().map(|(start, end)| gpus * overlap(*start, *end)).sum();
            served[q] += gpu_ms;
            if outcome.borrowed {
                borrowed[q] += gpu_ms / 3.6e6;
            }
        }
        if outcome.never_fits {
            continue;
        }
        // What it would have used of the window had it started when submitted.
        let submitted = (job.submit_s * 1000.0) as i64;
        offered[q] += gpus * overlap(submitted, submitted + (job.run_s * 1000.0) as i64);
        if !in_window(job) {
            continue;
        }
        let started = outcome.start_ms.unwrap_or_else(|| {
            unstarted += 1;
            run.end_ms
        });
        if let Some(class) = CLASSES.iter().position(|(_, lo, hi)| (*lo..=*hi).contains(&job.nodes)) {
            class_waits[class].push((started - submitted).max(0) as f64 / 1000.0);
        }
    }
    let total_served: f64 = served.iter().sum();
    let total_offered: f64 = offered.iter().sum();
    let weights: Vec<f64> = queues.iter().map(|q| q.weight).collect();
    let demand: Vec<f64> = offered.iter().map(|o| o / capacity).collect();
    let targets = fair_targets(&weights, &demand);
    let target_sum: f64 = targets.iter().sum::<f64>().max(1e-12);
    let shares = queues
        .iter()
        .enumerate()
        .map(|(i, q)| QueueShare {
            name: q.name.clone(),
            weight: q.weight,
            offered: offered[i] / total_offered.max(1e-12),
            target: targets[i] / target_sum,
            served: served[i] / total_served.max(1e-12),
            borrowed_gpu_h: borrowed[i],
        })
        .collect();
    Report {
        utilisation: total_served / capacity,
        offered: total_offered / capacity,
        waits: CLASSES.iter().map(|c| c.0).zip(class_waits.into_iter().map(waits)).collect(),
        shares,
        backfilled: run.outcomes.iter().filter(|o| o.backfilled).count(),
        borrowed: run.outcomes.iter().filter(|o| o.borrowed).count(),
        unstarted,
        never_fits: run.outcomes.iter().filter(|o| o.never_fits).count(),
        checks: run.checks.clone(),
        preemptions: run.preempting.then(|| preemptions(trace, run, step_s)),
    }
}

fn preemptions(trace: &[TraceJob], run: &Run, step_s: f64) -> Preemptions {
    let mut p = Preemptions::default();
    let mut iterations_sum = 0.0;
    for (job, o) in trace.iter().zip(&run.outcomes) {
        p.for_fair_share += u64::from(o.for_fair_share);
        for lost in &o.lost_ms {
            let iterations = *lost as f64 / 1000.0 / step_s;
            p.count += 1;
            p.lost_gpu_h += f64::from(job.gpus()) * *lost as f64 / 3.6e6;
            p.lost_iterations_max = p.lost_iterations_max.max(iterations);
            iterations_sum += iterations;
        }
    }
    p.lost_iterations_mean = iterations_sum / (p.count as f64).max(1.0);
    p
}

impl Report {
    pub fn waits_of(&self, class: &str) -> Waits {
        self.waits.iter().find(|(c, _)| *c == class).map(|(_, w)| w.clone()).unwrap_or_default()
    }

    /// The largest gap between a queue's served share and its target, in points.
    pub fn worst_share_error(&self) -> f64 {
        self.shares.iter().map(|s| (s.served - s.target).abs() * 100.0).fold(0.0, f64::max)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let waits: serde_json::Map<String, serde_json::Value> = self
            .waits
            .iter()
            .map(|(c, w)| {
                let v = serde_json::json!({"jobs": w.jobs, "mean_s": w.mean_s, "p50_s": w.p50_s, "p99_s": w.p99_s, "max_s": w.max_s});
                (c.to_string(), v)
            })
            .collect();
        let shares: Vec<serde_json::Value> = self
            .shares
            .iter()
            .map(|s| {
                serde_json::json!({"queue": s.name, "weight": s.weight, "offered": s.offered, "target": s.target,
                    "served": s.served, "borrowed_gpu_h": s.borrowed_gpu_h})
            })
            .collect();
        serde_json::json!({
            "utilisation": self.utilisation, "offered": self.offered, "waits": waits, "shares": shares,
            "backfilled": self.backfilled, "borrowed": self.borrowed, "unstarted": self.unstarted,
            "never_fits": self.never_fits,
            "preemptions": self.preemptions.as_ref().map(|p| p.count),
            "preemptions_for_fair_share": self.preemptions.as_ref().map(|p| p.for_fair_share),
            "lost_work": self.preemptions.as_ref().map(|p| serde_json::json!({"gpu_hours": p.lost_gpu_h,
                "iterations_per_preemption": p.lost_iterations_mean, "max_iterations_per_preemption": p.lost_iterations_max})),
            "checks": {"overcommits": self.checks.overcommits, "quota_breaches": self.checks.quota_breaches,
                "reservations_delayed": self.checks.reservations_delayed},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_targets_give_what_is_asked_below_capacity_and_split_by_weight_above() {
        assert_eq!(fair_targets(&[0.5, 0.5], &[0.3, 0.2]), [0.3, 0.2]);
        let t = fair_targets(&[0.5, 0.5], &[0.9, 0.9]);
        assert!((t[0] - 0.5).abs() < 1e-6 && (t[1] - 0.5).abs() < 1e-6, "{t:?}");
        // The small queue's unused weight goes to the big one.
        let t = fair_targets(&[0.5, 0.5], &[0.9, 0.1]);
        assert!((t[0] - 0.9).abs() < 1e-6 && (t[1] - 0.1).abs() < 1e-6, "{t:?}");
        let t = fair_targets(&[0.75, 0.25], &[2.0, 2.0]);
        assert!((t[0] - 0.75).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let w: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&w, 0.5), percentile(&w, 0.99)), (50.0, 99.0));
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
