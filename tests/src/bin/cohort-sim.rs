//! `cohort-sim`: replays a job trace through the controller's scheduling
//! decisions under `--scheduler fifo` (the order before queues) and
//! `--scheduler backfill` (queues with quotas and borrowing, fair share, EASY
//! backfill), and prints GPU utilisation against the offered load, the waits
//! of each size class and each queue's share of the GPU-hours against its
//! target (issue 17), and under backfill what preemption to reclaim quota
//! cost: preemptions and the work they lost, with save-first (the job saves on
//! the signal) and with periodic checkpoints only.
//!
//! It drives the controller's own functions (`cohort_controller::planner`'s
//! place, reserve and backfill; `queues`' parser, quotas and fair share) in a
//! discrete-event loop that calls them as the reconcile pass does, not the
//! whole Controller: the controller's clock is the wall clock, and a day of a
//! 1,000-node cluster must replay in minutes (see `cohort_sim/engine.rs`).
//!
//! ```text
//! cargo build -p cohort-tests --bin cohort-sim
//! target/debug/cohort-sim                      # 1,000 nodes x 8 GPUs, a day after 6 h of warm-up, load 0.9
//! target/debug/cohort-sim --quick              # 200 nodes, 2 h after 1 h, runs a quarter as long
//! target/debug/cohort-sim --write-trace t.csv  # the synthetic trace, to replay with --trace t.csv
//! target/debug/cohort-sim --philly cluster_job_log --nodes 300  # Microsoft Philly's job log
//! target/debug/cohort-sim --preempt off        # backfill without reclaiming by preemption
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "cohort_sim/engine.rs"]
mod engine;
#[path = "cohort_sim/philly.rs"]
mod philly;
#[path = "cohort_sim/report.rs"]
mod report;
#[path = "cohort_sim/trace.rs"]
mod trace;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use clap::ValueEnum;
use cohort_controller::queues::{Queues, Scheduler};

use crate::report::{CLASSES, Report, Window};
use crate::trace::{QueueMix, Shape, TraceJob};

#[derive(Parser)]
#[command(about = "Replays a job trace through the controller's scheduler, fifo against backfill")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: u32,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// Offered load: submitted GPU-hours over the cluster's, per hour.
    #[arg(long, default_value_t = 0.9)]
    load: f64,
    /// Hours measured (jobs submitted in them, GPU-hours served in them).
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Hours of arrivals before the measured ones, so that the cluster is not empty when they start.
    #[arg(long, default_value_t = 6.0)]
    warmup_hours: f64,
    /// Hours after the measured ones the replay goes on (without arrivals) for jobs still waiting.
    #[arg(long, default_value_t = 48.0)]
    drain_hours: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run times and time limits are this times the mix's (below 1 packs more jobs into fewer hours).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// 200 nodes, 2 h measured after 1 h, run times a quarter of the mix's: seconds, for a test.
    #[arg(long)]
    quick: bool,
    /// Policies to replay, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fifo,backfill")]
    policies: Vec<Scheduler>,
    /// Replay this trace (CSV: submit_s,queue,user,nodes,gpus_per_node,run_s,limit_s) instead of a synthetic one.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Replay Microsoft Philly's job log (`cluster_job_log`, JSON, github.com/msr-fiddle/philly-traces):
    /// each virtual cluster a queue, with a quota of its share of the log's GPU-hours.
    #[arg(long, value_name = "FILE", conflicts_with = "trace")]
    philly: Option<PathBuf>,
    /// Write the trace replayed to this CSV file.
    #[arg(long, value_name = "FILE")]
    write_trace: Option<PathBuf>,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// After every backfilled start, compute the head's reservation again and count it if it moved later (slow).
    #[arg(long)]
    check: bool,
    /// How backfill's preemptions (queues reclaiming lent quota; borrowers for their fair share with
    /// `--preempt-for-fair-share`) are replayed, comma-separated: one replay each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "save-first,periodic")]
    preempt: Vec<PreemptMode>,
    /// Minutes of run time between a job's periodic checkpoints (what `periodic` loses up to).
    #[arg(long, default_value_t = 30.0)]
    checkpoint_minutes: f64,
    /// Seconds per training iteration, to count the work lost in iterations.
    #[arg(long, default_value_t = 2.0)]
    step_seconds: f64,
    /// Minutes a gang runs before it may be preempted (the queue file's
    /// `preempt_exempt_time`; 0: at once).
    #[arg(long, default_value_t = 0.0)]
    preempt_exempt_minutes: f64,
    /// Borrowers below their queue's weighted share of the cluster may preempt
    /// borrowers of queues above theirs (the queue file's `preempt_for_fair_share`).
    #[arg(long)]
    preempt_for_fair_share: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum PreemptMode {
    /// Victims save on the signal: no work lost (reported as `backfill`).
    SaveFirst,
    /// Victims lose the work since their last periodic checkpoint (`backfill-periodic`).
    Periodic,
    /// No preemption: borrowers keep what they borrowed until they end (`backfill-no-preempt`).
    Off,
}

impl PreemptMode {
    fn label(self) -> &'static str {
        match self {
            PreemptMode::SaveFirst => "backfill",
            PreemptMode::Periodic => "backfill-periodic",
            PreemptMode::Off => "backfill-no-preempt",
        }
    }
}

/// The simulated cluster's queue file: each queue's quota is its weight's
/// share of the GPUs, and its fair-share `weight` that share; it may borrow; jobs run at most as long as the longest
/// time limit of the trace, and 24 h.
fn queue_file(total_gpus: u32, queues: &[QueueMix], trace: &[TraceJob], args: &Args) -> String {
    let longest_h = trace.iter().map(|j| (j.limit_s / 3600.0).ceil() as u64).max().unwrap_or(0).max(24);
    let mut text = String::from("fair_share_half_life = \"1d\"\n");
    if args.preempt_exempt_minutes > 0.0 {
        let _ = writeln!(text, "preempt_exempt_time = \"{}s\"", (args.preempt_exempt_minutes * 60.0).round() as u64);
    }
    if args.preempt_for_fair_share {
        text.push_str("preempt_for_fair_share = true\n");
    }
    for q in queues {
        let quota = (q.weight * f64::from(total_gpus)).round() as u32;
        let _ = write!(
            text,
            "\n[[queue]]\nname = \"{}\"\ngpus = {quota}\nweight = {}\nmax_run_time = \"{longest_h}h\"\n",
            q.name,
            q.weight.max(1e-6)
        );
    }
    text
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        (args.nodes, args.hours, args.warmup_hours, args.drain_hours, args.time_scale) = (200, 2.0, 1.0, 24.0, 0.25);
    }
    let total = args.nodes * args.gpus_per_node;
    let span_s = (args.warmup_hours + args.hours) * 3600.0;
    let trace: Vec<TraceJob> = match (&args.trace, &args.philly) {
        (Some(path), _) => trace::read_csv(path)?,
        (None, Some(path)) => {
            let (trace, skipped) = philly::read(path, args.gpus_per_node, args.seed)?;
            eprintln!(
                "{}: {} jobs; left out {} without a submit time, {} without a complete attempt",
                path.display(),
                trace.len(),
                skipped.no_submit_time,
                skipped.no_complete_attempt
            );
            trace
        }
        (None, None) => trace::synthetic(&Shape {
            nodes: args.nodes,
            gpus_per_node: args.gpus_per_node,
            load: args.load,
            span_s,
            seed: args.seed,
            time_scale: args.time_scale,
        }),
    };
    if let Some(path) = &args.write_trace {
        std::fs::write(path, trace::to_csv(&trace)).with_context(|| format!("--write-trace {}", path.display()))?;
    }
    let mixes = trace::queues_of(&trace);
    let queues = Queues::parse(&queue_file(total, &mixes, &trace, &args)).map_err(anyhow::Error::msg)?;
    let window = Window { from_ms: (args.warmup_hours * 3.6e6) as i64, to_ms: (span_s * 1000.0) as i64, gpus: total };
    let until_ms = window.to_ms + (args.drain_hours * 3.6e6) as i64;
    let mut reports = Vec::new();
    let interval_ms = (args.checkpoint_minutes * 60_000.0).round().max(1.0) as i64;
    let mut replays: Vec<(String, Scheduler, Option<engine::Saving>)> = Vec::new();
    for policy in &args.policies {
        if *policy == Scheduler::Fifo {
            replays.push(("fifo".into(), *policy, None));
            continue;
        }
        for mode in &args.preempt {
            let saving = match mode {
                PreemptMode::SaveFirst => Some(engine::Saving::OnSignal),
                PreemptMode::Periodic => Some(engine::Saving::Periodic { interval_ms }),
                PreemptMode::Off => None,
            };
            replays.push((mode.label().into(), *policy, saving));
        }
    }
    for (label, policy, saving) in replays {
        let started = std::time::Instant::now();
        let mut sim = engine::Sim::new(&trace, queues.clone(), policy, args.nodes, args.gpus_per_node, args.check)?;
        if let Some(saving) = saving {
            sim = sim.preempting(saving);
        }
        let run = sim.run(until_ms);
        eprintln!("{label}: replayed in {:.1}s", started.elapsed().as_secs_f64());
        reports.push((label, report::measure(&trace, &mixes, &run, window, args.step_seconds)));
    }
    print!("{}", table(&args, &trace, &mixes, &reports));
    if let Some(path) = &args.json {
        let all: serde_json::Map<String, serde_json::Value> =
            reports.iter().map(|(label, r)| (label.clone(), r.to_json())).collect();
        std::fs::write(path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    Ok(())
}

fn hours(seconds: f64) -> String {
    match seconds {
        s if s < 60.0 => format!("{s:.0}s"),
        s if s < 3600.0 => format!("{:.1}m", s / 60.0),
        s => format!("{:.1}h", s / 3600.0),
    }
}

/// The figures as text tables, with the issue's goals checked.
fn table(args: &Args, trace: &[TraceJob], queues: &[QueueMix], reports: &[(String, Report)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cohort-sim: {} nodes x {} GPUs, {} jobs, load {:.2} asked, {:.0} h measured after {:.0} h warm-up, \
         run times x{}, seed {}\n",
        args.nodes,
        args.gpus_per_node,
        trace.len(),
        args.load,
        args.hours,
        args.warmup_hours,
        args.time_scale,
        args.seed
    );
    let _ = write!(out, "{:<19} {:>7} {:>6} {:>8}", "policy", "offered", "util", "util/off");
    for (class, ..) in CLASSES {
        let _ = write!(out, " {:>12} {:>12}", format!("{class} p50"), format!("{class} p99"));
    }
    let _ = writeln!(out, " {:>10} {:>8} {:>9} {:>11}", "backfilled", "borrowed", "unstarted", "preemptions");
    for (policy, r) in reports {
        let _ = write!(
            out,
            "{:<19} {:>6.1}% {:>5.1}% {:>7.1}%",
            policy,
            r.offered * 100.0,
            r.utilisation * 100.0,
            r.utilisation / r.offered.max(1e-12) * 100.0
        );
        for (_, w) in &r.waits {
            let _ = write!(out, " {:>12} {:>12}", hours(w.p50_s), hours(w.p99_s));
        }
        let preemptions = r.preemptions.as_ref().map_or("-".to_string(), |p| p.count.to_string());
        let _ = writeln!(out, " {:>10} {:>8} {:>9} {:>11}", r.backfilled, r.borrowed, r.unstarted, preemptions);
    }
    let _ = write!(out, "\n{:<9} {:>6} {:>8} {:>7}", "queue", "weight", "offered", "target");
    for (policy, _) in reports {
        let _ = write!(out, " {:>14}", format!("{policy} served"));
    }
    let _ = writeln!(out, " {:>18}", "borrowed GPU-h");
    for (i, q) in queues.iter().enumerate() {
        let Some((_, first)) = reports.first() else { break };
        let s = &first.shares[i];
        let _ = write!(
            out,
            "{:<9} {:>5.0}% {:>7.1}% {:>6.1}%",
            q.name,
            q.weight * 100.0,
            s.offered * 100.0,
            s.target * 100.0
        );
        for (_, r) in reports {
            let s = &r.shares[i];
            let _ = write!(out, " {:>6.1}% ({:+.1})", s.served * 100.0, (s.served - s.target) * 100.0);
        }
        let borrowed: Vec<String> = reports.iter().map(|(_, r)| format!("{:.0}", r.shares[i].borrowed_gpu_h)).collect();
        let _ = writeln!(out, " {:>18}", borrowed.join(" / "));
    }
    out.push_str(&goals(reports));
    out
}

fn goals(reports: &[(String, Report)]) -> String {
    let mut out = String::from("\n");
    let fifo = reports.iter().find(|(p, _)| p == "fifo").map(|(_, r)| r);
    let new = reports.iter().find(|(p, _)| p == "backfill").or_else(|| reports.iter().find(|(p, _)| p != "fifo"));
    let Some((label, new)) = new else { return out };
    let _ = writeln!(out, "goals, on {label}:");
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let ratio = new.utilisation / new.offered.max(1e-12);
    let _ = if new.offered > 1.0 {
        writeln!(
            out,
            "utilisation >= 95% of offered load: n/a, the trace offers {:.1}% of the cluster",
            new.offered * 100.0
        )
    } else {
        writeln!(out, "utilisation >= 95% of offered load: {:.1}% ({})", ratio * 100.0, met(ratio >= 0.95))
    };
    if let Some(fifo) = fifo {
        let (before, after) = (fifo.waits_of("1-node").p99_s, new.waits_of("1-node").p99_s);
        let cut = before / after.max(1.0);
        let _ = writeln!(
            out,
            "1-node p99 wait cut >= 5x against fifo: {} -> {} = {cut:.1}x ({})",
            hours(before),
            hours(after),
            met(cut >= 5.0)
        );
    }
    let worst = new.worst_share_error();
    let _ = writeln!(out, "every queue within 5 points of its target share: worst {worst:.1} ({})", met(worst <= 5.0));
    let c = &new.checks;
    let _ = writeln!(
        out,
        "checks: {} overcommitted placements, {} starts over quota without borrowing, {} reservations delayed by a backfill",
        c.overcommits, c.quota_breaches, c.reservations_delayed
    );
    for (label, r) in reports {
        if let Some(p) = &r.preemptions {
            let _ = writeln!(
                out,
                "{label}: {} preemptions ({} for fair share), work lost per preemption {:.1} iterations mean, {:.0} most, {:.1} GPU-h in all",
                p.count, p.for_fair_share, p.lost_iterations_mean, p.lost_iterations_max, p.lost_gpu_h
            );
        }
    }
    out
}
