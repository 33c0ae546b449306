//! Job traces: a seeded synthetic one, and a CSV form to write and replay.
//!
//! The synthetic mix is shaped after what analyses of GPU-cluster traces
//! report (e.g. Philly's, ATC'19): most jobs take one node, some 2-16, a few
//! 64-128 and those hold most of the GPU-hours; run times are lognormal; the
//! time limits users ask for over-estimate the run times, in round numbers.

use std::fmt::Write as _;

use anyhow::{Context, bail, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One job of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceJob {
    /// Seconds from the start of the trace.
    pub submit_s: f64,
    pub queue: String,
    pub user: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    /// How long it runs once started.
    pub run_s: f64,
    /// The time limit it asks for (at least `run_s`).
    pub limit_s: f64,
}

impl TraceJob {
    pub fn gpus(&self) -> u32 {
        self.nodes * self.gpus_per_node
    }
}

/// A queue of the simulated cluster: its target share (its quota is that
/// share of the cluster's GPUs) and the share of the offered GPU-hours its users submit.
#[derive(Debug, Clone)]
pub struct QueueMix {
    pub name: String,
    pub weight: f64,
    pub demand: f64,
    pub users: u32,
}

/// The synthetic trace's four teams: research submits more than its share, dev less.
pub fn synthetic_queues() -> Vec<QueueMix> {
    [("research", 0.4, 0.5, 6), ("prod", 0.3, 0.3, 3), ("dev", 0.2, 0.1, 8), ("batch", 0.1, 0.1, 2)]
        .into_iter()
        .map(|(name, weight, demand, users)| QueueMix { name: name.into(), weight, demand, users })
        .collect()
}

/// The queues a trace's jobs name: the synthetic ones when it names no
/// other; otherwise one per name, weighted by its share of the trace's
/// GPU-hours (an imported trace says nothing of quotas: each gets what it used).
pub fn queues_of(trace: &[TraceJob]) -> Vec<QueueMix> {
    let synthetic = synthetic_queues();
    if trace.iter().all(|j| synthetic.iter().any(|q| q.name == j.queue)) {
        return synthetic;
    }
    let mut used: std::collections::BTreeMap<&str, (f64, std::collections::BTreeSet<&str>)> = Default::default();
    for j in trace {
        let entry = used.entry(&j.queue).or_default();
        entry.0 += f64::from(j.gpus()) * j.run_s;
        entry.1.insert(&j.user);
    }
    let total: f64 = used.values().map(|u| u.0).sum::<f64>().max(1e-9);
    used.into_iter()
        .map(|(name, (gpu_s, users))| QueueMix {
            name: name.into(),
            weight: gpu_s / total,
            demand: gpu_s / total,
            users: users.len() as u32,
        })
        .collect()
}

/// What the synthetic trace is made for.
#[derive(Debug, Clone)]
pub struct Shape {
    pub nodes: u32,
    pub gpus_per_node: u32,
    /// Offered load: submitted GPU-seconds per second over the cluster's GPUs.
    pub load: f64,
    /// Seconds of arrivals.
    pub span_s: f64,
    pub seed: u64,
    /// Run times and time limits are this times the mix's (1: a day's real mix; less for a quick run).
    pub time_scale: f64,
}

/// Round time limits users ask for.
const LIMITS_H: [f64; 7] = [0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0];
/// The queues' max_run_time: no run is longer.
pub const MAX_RUN_S: f64 = 24.0 * 3600.0;

/// A standard normal draw (Box-Muller; rand_distr is not among the workspace's crates).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn lognormal(rng: &mut ChaCha8Rng, median_s: f64, sigma: f64, scale: f64) -> f64 {
    (median_s * scale * (sigma * normal(rng)).exp()).clamp(60.0 * scale, MAX_RUN_S * scale)
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, choices: &[(T, f64)]) -> T {
    let total: f64 = choices.iter().map(|c| c.1).sum();
    let mut x = rng.random::<f64>() * total;
    for (value, weight) in choices {
        if x < *weight {
            return *value;
        }
        x -= weight;
    }
    choices[choices.len() - 1].0
}

/// One job's size and run time: 85 % one node (1-8 GPUs, median 30 min),
/// 14 % 2-16 nodes (median 2 h), 1 % 64-128 nodes (median 4 h), the last
/// capped at the cluster's size.
fn draw_size(rng: &mut ChaCha8Rng, cluster: &Shape) -> (u32, u32, f64) {
    let g = cluster.gpus_per_node;
    match rng.random::<f64>() {
        x if x < 0.85 => {
            let gpus = pick(rng, &[(1, 0.3), (2, 0.15), (4, 0.15), (8, 0.4)]).min(g);
            (1, gpus, lognormal(rng, 1800.0, 1.2, cluster.time_scale))
        }
        x if x < 0.99 => {
            let nodes = pick(rng, &[(2, 0.4), (4, 0.3), (8, 0.2), (16, 0.1)]).min(cluster.nodes);
            (nodes, g, lognormal(rng, 7200.0, 1.0, cluster.time_scale))
        }
        _ => {
            let nodes = pick(rng, &[(64, 0.7), (128, 0.3)]).min(cluster.nodes);
            (nodes, g, lognormal(rng, 14_400.0, 0.8, cluster.time_scale))
        }
    }
}

/// The limit a user asks for: 1.2-4 times the run, rounded up to a round
/// number of hours, at most `cap` (past a day without one: whole days).
pub fn draw_limit(rng: &mut ChaCha8Rng, run_s: f64, scale: f64, cap: Option<f64>) -> f64 {
    let wanted = run_s * rng.random_range(1.2..4.0);
    let beyond = cap.unwrap_or((wanted / 86_400.0).ceil() * 86_400.0);
    LIMITS_H.iter().map(|h| h * 3600.0 * scale).find(|l| *l >= wanted).unwrap_or(beyond).min(beyond).max(run_s)
}

/// A Poisson stream of jobs offering `shape.load` of the cluster's GPUs.
pub fn synthetic(shape: &Shape) -> Vec<TraceJob> {
    let queues = synthetic_queues();
    let mut rng = ChaCha8Rng::seed_from_u64(shape.seed);
    // The mean GPU-seconds of a job, by sampling the mix with its own stream.
    let mut probe = ChaCha8Rng::seed_from_u64(shape.seed ^ 0x5eed);
    let samples = 50_000;
    let mean: f64 = (0..samples)
        .map(|_| {
            let (n, g, run) = draw_size(&mut probe, shape);
            f64::from(n * g) * run
        })
        .sum::<f64>()
        / f64::from(samples);
    let capacity = f64::from(shape.nodes * shape.gpus_per_node);
    let rate = shape.load * capacity / mean;
    let weights: Vec<(usize, f64)> = queues.iter().enumerate().map(|(i, q)| (i, q.demand)).collect();
    let mut jobs = Vec::new();
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.random::<f64>()).ln() / rate;
        if t >= shape.span_s {
            return jobs;
        }
        let (nodes, gpus_per_node, run_s) = draw_size(&mut rng, shape);
        let limit_s = draw_limit(&mut rng, run_s, shape.time_scale, Some(MAX_RUN_S * shape.time_scale));
        let queue = &queues[pick(&mut rng, &weights)];
        let user = format!("{}-{}", queue.name, rng.random_range(0..queue.users));
        // Whole milliseconds, as a CSV of the trace holds them.
        let (submit_s, run_s, limit_s) = (to_ms(t), to_ms(run_s), to_ms(limit_s));
        jobs.push(TraceJob { submit_s, queue: queue.name.clone(), user, nodes, gpus_per_node, run_s, limit_s });
    }
}

pub fn to_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

const HEADER: &str = "submit_s,queue,user,nodes,gpus_per_node,run_s,limit_s";
/// The most a trace file may hold.
const MAX_TRACE_BYTES: u64 = 256 << 20;

/// A trace as CSV with the header [`HEADER`].
pub fn to_csv(jobs: &[TraceJob]) -> String {
    let mut out = format!("{HEADER}\n");
    for j in jobs {
        let _ = writeln!(
            out,
            "{:.3},{},{},{},{},{:.3},{:.3}",
            j.submit_s, j.queue, j.user, j.nodes, j.gpus_per_node, j.run_s, j.limit_s
        );
    }
    out
}

/// Reads a trace written by [`to_csv`] (or by hand: the same columns).
pub fn read_csv(path: &std::path::Path) -> anyhow::Result<Vec<TraceJob>> {
    let size = std::fs::metadata(path).with_context(|| format!("trace {}", path.display()))?.len();
    ensure!(size <= MAX_TRACE_BYTES, "trace {}: {size} bytes, more than the {MAX_TRACE_BYTES} read", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("trace {}", path.display()))?;
    parse_csv(&text).with_context(|| format!("trace {}", path.display()))
}

/// [`read_csv`] on text; errors name the line and the column.
pub fn parse_csv(text: &str) -> anyhow::Result<Vec<TraceJob>> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, header)) if header.trim() == HEADER => {}
        _ => bail!("line 1: the header must be `{HEADER}`"),
    }
    let mut jobs = Vec::new();
    for (i, line) in lines {
        let at = i + 1;
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        ensure!(cols.len() == 7, "line {at}: {} columns, want 7 ({HEADER})", cols.len());
        let num = |c: usize, name: &str| -> anyhow::Result<f64> {
            cols[c]
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| format!("line {at}: {name} {:?} is not a number of 0 or more", cols[c]))
        };
        let int = |c: usize, name: &str| -> anyhow::Result<u32> {
            cols[c]
                .parse::<u32>()
                .ok()
                .filter(|x| *x > 0)
                .with_context(|| format!("line {at}: {name} {:?} is not a whole number above 0", cols[c]))
        };
        let job = TraceJob {
            submit_s: num(0, "submit_s")?,
            queue: cols[1].to_string(),
            user: cols[2].to_string(),
            nodes: int(3, "nodes")?,
            gpus_per_node: int(4, "gpus_per_node")?,
            run_s: num(5, "run_s")?,
            limit_s: num(6, "limit_s")?,
        };
        ensure!(job.limit_s >= job.run_s, "line {at}: limit_s {} is below run_s {}", job.limit_s, job.run_s);
        jobs.push(job);
    }
    jobs.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shape(load: f64) -> Shape {
        Shape { nodes: 1000, gpus_per_node: 8, load, span_s: 86_400.0, seed: 7, time_scale: 1.0 }
    }

    #[test]
    fn the_synthetic_trace_offers_the_load_asked_with_the_mix_asked() {
        let jobs = synthetic(&shape(0.9));
        let offered: f64 = jobs.iter().map(|j| f64::from(j.gpus()) * j.run_s).sum::<f64>() / (8000.0 * 86_400.0);
        assert!((offered - 0.9).abs() < 0.15, "offered {offered}");
        let one = jobs.iter().filter(|j| j.nodes == 1).count() as f64 / jobs.len() as f64;
        assert!((0.8..0.9).contains(&one), "{one} of jobs on one node");
        assert!(jobs.iter().any(|j| j.nodes >= 64));
        assert!(jobs.iter().all(|j| j.limit_s >= j.run_s && j.run_s <= MAX_RUN_S));
        assert_eq!(jobs, synthetic(&shape(0.9)), "the same seed gives the same trace");
    }

    #[test]
    fn a_trace_survives_csv_and_bad_lines_are_named() {
        let jobs = synthetic(&Shape { span_s: 3600.0, ..shape(0.5) });
        let back = parse_csv(&to_csv(&jobs)).unwrap();
        assert_eq!(back.len(), jobs.len());
        assert_eq!((back[0].nodes, &back[0].queue), (jobs[0].nodes, &jobs[0].queue));
        let e = parse_csv(&format!("{HEADER}\n1,q,u,0,8,10,20\n")).unwrap_err().to_string();
        assert!(e.contains("line 2: nodes \"0\""), "{e}");
        let e = parse_csv(&format!("{HEADER}\n1,q,u,1,8,30,20\n")).unwrap_err().to_string();
        assert!(e.contains("limit_s 20 is below run_s 30"), "{e}");
        assert!(parse_csv("a,b\n").is_err());
    }
}
