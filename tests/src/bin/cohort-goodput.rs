//! `cohort-goodput`: the share of a training job's time that becomes progress
//! under faults. It starts a real controller and real agents with fake GPUs on
//! loopback (the test harness's `Cluster`), runs a simulated training job on
//! all but one node (`tests/payloads/goodput_trainer.py`: steps in lockstep,
//! a Megatron-layout checkpoint every `--ckpt-every` steps, resume from the
//! newest complete one, a start and a load that take time) compressed by
//! `--time-factor`, and injects faults from a seeded schedule: kill -9 of a
//! rank, kill -9 of an agent and its ranks, a partition of an agent from the
//! controller, SIGSTOP of a rank (see `cohort_goodput/faults.rs` for the mix),
//! and a full disk: the checkpoints go to a tmpfs (so the benchmark needs
//! root), which it fills at a seeded step and frees once an operator would
//! have (`--disk-repair-minutes`); saves fail with ENOSPC in between.
//!
//! ```text
//! cargo build --workspace --bins
//! target/debug/cohort-goodput --seeds 1,2,3                  # default controller and agent flags
//! target/debug/cohort-goodput --seeds 1,2,3 --tuned          # agents --fence-after 4s
//! # the issue's rate for 6 GPUs, a week of training, Young/Daly's checkpoint interval:
//! target/debug/cohort-goodput --seeds 1,2,3 --mtbf-minutes 1667 --sim-minutes 10080 --step-s 60 \
//!     --ckpt-every 41 --time-factor 2000 --backoff 10s --run-limit-s 1500
//! ```
//!
//! Output: goodput (useful steps × step time / wall time), in compressed time
//! as measured and in simulated time (the payload's times scaled back up,
//! Cohort's as measured), and the loss per cause: detection, teardown,
//! waiting (fence deadline, backoff, capacity), launch, the trainer's start,
//! checkpoint load, work redone since the checkpoint, saves.
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "cohort_goodput/account.rs"]
mod account;
#[path = "cohort_goodput/faults.rs"]
mod faults;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, Tmpfs, children_of, is_root, is_terminal, state};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::account::{Account, Injected, Losses, Seen};
use crate::faults::{FaultKind, Schedule};

#[derive(Parser)]
#[command(about = "Goodput of a simulated training job under seeded faults, with the loss per cause")]
struct Args {
    /// Seeds of the fault schedule, one run each, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Agents (nodes); the job takes all but one, the spare replaces a lost node.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Fake GPUs per agent (the job takes them all).
    #[arg(long, default_value_t = 2)]
    gpus: u32,
    /// Simulated training time, minutes (fault-free).
    #[arg(long, default_value_t = 120.0)]
    sim_minutes: f64,
    /// Simulated seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_s: f64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 60)]
    ckpt_every: u64,
    /// Simulated seconds one checkpoint save takes.
    #[arg(long, default_value_t = 30.0)]
    save_s: f64,
    /// Simulated seconds from exec to training (imports, NCCL init).
    #[arg(long, default_value_t = 120.0)]
    start_s: f64,
    /// Simulated seconds to load a checkpoint.
    #[arg(long, default_value_t = 60.0)]
    load_s: f64,
    /// Simulated time is this many times real time (for the payload; Cohort runs in real time).
    #[arg(long, default_value_t = 100.0)]
    time_factor: f64,
    /// Mean simulated minutes between faults for this job. The issue's rate (one per
    /// 10 minutes per 1,000 GPUs) gives the default job's 6 GPUs one per 1,667 minutes
    /// (`--mtbf-minutes 1667` with a long `--sim-minutes`); the default is that rate
    /// scaled up about 67× so that a 2-hour run sees several.
    #[arg(long, default_value_t = 25.0)]
    mtbf_minutes: f64,
    /// Real seconds before a crashed agent is started again or a partition heals.
    #[arg(long, default_value_t = 15.0)]
    repair_s: f64,
    /// The job's restart backoff (doubles with every restart; Cohort's default is 10s).
    #[arg(long, default_value = "500ms")]
    backoff: String,
    /// The job's hang_timeout (real time).
    #[arg(long, default_value = "5s")]
    hang_timeout: String,
    /// Tuned fencing: agents `--fence-after 4s` (the controller's default
    /// detection, 2.5 s, is what the tuned `--node-ttl 3s` used to buy).
    #[arg(long)]
    tuned: bool,
    /// Most real seconds one run may take.
    #[arg(long, default_value_t = 900)]
    run_limit_s: u64,
    /// Full disks per run, on top of the mix (the checkpoints go to a tmpfs
    /// the benchmark fills, so it needs root); 0 leaves them out.
    #[arg(long, default_value_t = 1)]
    disk_fulls: usize,
    /// Simulated minutes from the first save that failed on a full disk until
    /// an operator frees it.
    #[arg(long, default_value_t = 30.0)]
    disk_repair_minutes: f64,
}

/// What fills the checkpoints' file system (removed when it is freed).
const BALLAST: &str = ".ballast";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 2, "--agents must be at least 2 (the job takes all but one)");
    ensure!(args.time_factor >= 1.0, "--time-factor must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut results = Vec::new();
        for &seed in &args.seeds {
            eprintln!("== seed {seed} ({})", if args.tuned { "tuned" } else { "defaults" });
            let (account, injected) = run(&args, seed).await.with_context(|| format!("seed {seed}"))?;
            print_run(&args, seed, &account, &injected);
            results.push((seed, account, injected.len()));
        }
        print_summary(&args, &results);
        Ok(())
    })
}

/// Real-time seconds for simulated seconds.
fn real(args: &Args, sim_s: f64) -> f64 {
    sim_s / args.time_factor
}

fn job_yaml(args: &Args, dir: &std::path::Path, steps: u64) -> String {
    format!(
        "name: goodput\nkind: command\nnodes: {nodes}\ngpus_per_node: {gpus}\nworkdir: tests/payloads\n\
         stop_grace: 2s\nhang_timeout: {hang}\ncommand: [python3, goodput_trainer.py]\n\
         restart: {{max_restarts: 1000, backoff: {backoff}, on: [rank_failed, node_lost, hang, disk_full], \
         exclude_failed_nodes: true}}\n\
         env: {{STEPS: '{steps}', STEP_S: '{step}', CKPT_EVERY: '{every}', SAVE_S: '{save}', START_S: '{start}', \
         LOAD_S: '{load}', CKPT_DIR: '{ckpt}', GOODPUT_LOG: '{log}'}}\n",
        nodes = args.agents - 1,
        gpus = args.gpus,
        hang = args.hang_timeout,
        backoff = args.backoff,
        step = real(args, args.step_s),
        every = args.ckpt_every,
        save = real(args, args.save_s),
        start = real(args, args.start_s),
        load = real(args, args.load_s),
        ckpt = dir.join("checkpoints").display(),
        log = dir.join("goodput.jsonl").display(),
    )
}

/// A repair due: an agent to start again, a partition to heal, a full disk
/// to free.
struct Repair {
    /// i64::MAX for a full disk until it fails a save: nobody notices a full
    /// disk before something fails on it.
    due_ms: i64,
    node: usize,
    kind: FaultKind,
    /// The attempt the fault hit.
    attempt: u32,
}

async fn run(args: &Args, seed: u64) -> anyhow::Result<(Account, Vec<Injected>)> {
    let nodes: Vec<NodeSpec> = (0..args.agents)
        .map(|i| {
            let mut node = NodeSpec::loopback(i, args.gpus);
            node.partitionable = true;
            if args.tuned {
                node.extra_args = vec!["--fence-after".into(), "4s".into()];
            }
            node
        })
        .collect();
    let mut cluster = Cluster::start_with(nodes, &[]).await?;
    let steps = (args.sim_minutes * 60.0 / args.step_s).round() as u64;
    let ckpt_dir = cluster.dir.path().join("checkpoints");
    // Declared after the cluster, so unmounted before its directory goes.
    let _tmpfs = if args.disk_fulls > 0 {
        ensure!(is_root(), "--disk-fulls needs root (the checkpoints go to a tmpfs it fills); pass --disk-fulls 0");
        std::fs::create_dir_all(&ckpt_dir)?;
        Some(Tmpfs::mount(&ckpt_dir, "64m")?)
    } else {
        None
    };
    let job = cluster.submit(&job_yaml(args, cluster.dir.path(), steps)).await?;
    let log_path = cluster.dir.path().join("goodput.jsonl");
    let mut log = LogTail::new(log_path.clone());
    let mut schedule = Schedule::new(seed, args.mtbf_minutes * 60.0);
    let mut disk_steps =
        schedule.disk_full_steps(args.disk_fulls, args.ckpt_every, steps.saturating_sub(args.ckpt_every));
    let mut seen: BTreeMap<u32, Seen> = BTreeMap::new();
    let mut injected: Vec<Injected> = Vec::new();
    let mut repairs: Vec<Repair> = Vec::new();
    // The next fault: when (unix ms), armed once the attempt has made a step.
    let mut next_fault: Option<(u32, i64)> = None;
    let deadline = now_ms() + args.run_limit_s as i64 * 1000;
    let done = loop {
        let now = now_ms();
        if now > deadline {
            bail!("the job did not finish within {} s; logs in {}", args.run_limit_s, cluster.dir.path().display());
        }
        for r in repairs.extract_if(.., |r| r.due_ms <= now) {
            match r.kind {
                FaultKind::NodeCrash => cluster.restart_agent(r.node),
                FaultKind::DiskFull => {
                    std::fs::remove_file(ckpt_dir.join(BALLAST)).context("freeing the full disk")?;
                    eprintln!("  the full disk freed");
                }
                _ => cluster.partitions[r.node].iter().for_each(|p| p.heal()),
            }
        }
        // While a disk is full, attempts may fail at their saves: no other fault is drawn.
        let disk_full = repairs.iter().any(|r| r.kind == FaultKind::DiskFull);
        log.update();
        let Ok(j) = cluster.job(&job.id).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // A save failed on the full disk: the operator's clock starts.
        for r in repairs.iter_mut().filter(|r| r.kind == FaultKind::DiskFull && r.due_ms == i64::MAX) {
            if j.attempts.iter().any(|a| a.attempt >= r.attempt && account::failed_on_full_disk(a)) {
                r.due_ms = now + (real(args, args.disk_repair_minutes * 60.0) * 1000.0) as i64;
            }
        }
        observe(&j, &mut seen, now);
        if is_terminal(&j) && j.live_processes == 0 {
            break j;
        }
        if state(&j) == JobState::Running && !is_terminal(&j) {
            let hit = injected.last().is_some_and(|f| f.attempt == j.attempt);
            if !hit && !disk_full && disk_steps.first().is_some_and(|s| log.newest >= *s) {
                disk_steps.remove(0);
                let bytes = fill(&ckpt_dir).context("filling the checkpoints' tmpfs")?;
                eprintln!(
                    "  fault {}: full disk ({} MiB of ballast) at step {} (attempt {})",
                    injected.len() + 1,
                    bytes >> 20,
                    log.newest,
                    j.attempt
                );
                let node = j.processes.first().map(|p| p.node_name.clone()).unwrap_or_default();
                injected.push(Injected { kind: FaultKind::DiskFull, at_ms: now, attempt: j.attempt, node });
                repairs.push(Repair { due_ms: i64::MAX, node: 0, kind: FaultKind::DiskFull, attempt: j.attempt });
                next_fault = Some((j.attempt, i64::MAX));
                continue;
            }
            match next_fault {
                Some((attempt, _)) if attempt == j.attempt => {}
                _ if disk_full => {}
                _ if log.stepped.contains(&j.attempt) => {
                    let gap_ms = (real(args, schedule.gap_s()) * 1000.0) as i64;
                    next_fault = Some((j.attempt, now + gap_ms));
                }
                _ => {}
            }
            if let Some((attempt, at)) = next_fault
                && attempt == j.attempt
                && now >= at
            {
                let kind = schedule.kind();
                let victim = schedule.victim(j.processes.len());
                if let Some(fault) = inject(&mut cluster, &j, kind, victim) {
                    eprintln!(
                        "  fault {}: {} on {} (attempt {})",
                        injected.len() + 1,
                        kind.name(),
                        fault.node,
                        attempt
                    );
                    if matches!(kind, FaultKind::NodeCrash | FaultKind::Partition) {
                        let node = fault.node.trim_start_matches("node").parse().unwrap_or(0);
                        repairs.push(Repair { due_ms: now + (args.repair_s * 1000.0) as i64, node, kind, attempt });
                    }
                    injected.push(fault);
                }
                // One fault per attempt: the next is drawn once the next attempt steps.
                next_fault = Some((attempt, i64::MAX));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(state(&done) == JobState::Succeeded, "the job ended {:?}: {}", state(&done), done.reason);
    // The checkpoint interval advice, as `cohort status` shows it (in compressed time).
    let status = cluster.cli(&["status", &job.id]);
    for line in String::from_utf8_lossy(&status.stdout).lines() {
        if line.starts_with("checkpoint:") || line.trim_start().starts_with("Young/Daly") {
            println!("  status: {}", line.trim_start());
        }
    }
    let text = std::fs::read_to_string(&log_path).with_context(|| format!("{}", log_path.display()))?;
    let events = account::parse_events(&text);
    Ok((account::account(&done, &seen, &events, &injected, steps), injected))
}

fn now_ms() -> i64 {
    cohort_proto::now_unix_ms()
}

/// Notes when each attempt ran and when the processes of an ended one were gone.
fn observe(job: &Job, seen: &mut BTreeMap<u32, Seen>, now: i64) {
    if job.running_unix_ms > 0 {
        seen.entry(job.attempt).or_default().running_ms = job.running_unix_ms;
    }
    for record in &job.attempts {
        if record.finished_unix_ms > 0 && record.attempt < job.attempt.max(1) + 1 {
            let entry = seen.entry(record.attempt).or_default();
            // Gone: no process alive, or the next attempt already placed (it starts only after).
            if entry.gone_ms == 0 && (job.live_processes == 0 || job.attempt > record.attempt) {
                entry.gone_ms = now;
            }
        }
    }
}

/// The payload's log, read as it grows: the newest step reached and the
/// attempts that made a step.
struct LogTail {
    path: std::path::PathBuf,
    offset: u64,
    partial: String,
    newest: u64,
    stepped: BTreeSet<u32>,
}

impl LogTail {
    fn new(path: std::path::PathBuf) -> LogTail {
        LogTail { path, offset: 0, partial: String::new(), newest: 0, stepped: BTreeSet::new() }
    }

    fn update(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut text = String::new();
        let Ok(read) = file.read_to_string(&mut text) else { return };
        self.offset += read as u64;
        self.partial.push_str(&text);
        let complete = self.partial.rfind('\n').map_or(0, |i| i + 1);
        let lines: String = self.partial.drain(..complete).collect();
        for event in account::parse_events(&lines).into_iter().filter(|e| e.event == "step") {
            self.newest = self.newest.max(event.iteration);
            self.stepped.insert(event.attempt);
        }
    }
}

/// Fills the file system of `dir` with a ballast file; its size.
fn fill(dir: &std::path::Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::create(dir.join(BALLAST))?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => return Ok(written),
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return Ok(written),
            Err(e) => return Err(e),
        }
    }
}

/// The trainer process under a rank's shim (its process group leader).
fn trainer_of(shim: u32) -> Option<u32> {
    children_of(shim).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("goodput_trainer"))
    })
}

fn inject(cluster: &mut Cluster, job: &Job, kind: FaultKind, victim: usize) -> Option<Injected> {
    let process = job.processes.get(victim)?;
    let node_index: usize = process.node_name.trim_start_matches("node").parse().ok()?;
    let at_ms = now_ms();
    match kind {
        FaultKind::RankCrash => kill(Pid::from_raw(trainer_of(process.pid)? as i32), Signal::SIGKILL).ok()?,
        FaultKind::Hang => kill(Pid::from_raw(trainer_of(process.pid)? as i32), Signal::SIGSTOP).ok()?,
        FaultKind::NodeCrash => {
            cluster.kill_agent(node_index);
            // The host is gone: its ranks with it (a crashed agent's shims would outlive it).
            let _ = killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
        }
        FaultKind::Partition => cluster.partitions[node_index].iter().for_each(|p| p.cut()),
        // Drawn apart from the mix (see `run`).
        FaultKind::DiskFull => return None,
    }
    Some(Injected { kind, at_ms, attempt: job.attempt, node: process.node_name.clone() })
}

fn row(name: &str, count: u32, l: &Losses) -> String {
    format!(
        "  {name:<12} {count:>3}  detect {:>6.2}  teardown {:>5.2}  wait {:>6.2}  launch {:>5.2}  | start {:>5.2}  load {:>5.2}  redo {:>6.2}",
        l.detect_s, l.teardown_s, l.wait_s, l.launch_s, l.start_s, l.load_s, l.redo_s
    )
}

fn print_run(args: &Args, seed: u64, a: &Account, injected: &[Injected]) {
    println!(
        "seed {seed}: {} steps, step {:.3} s, wall {:.1} s, {} faults, {} saves ({:.1} s): goodput {:.1} % compressed, {:.1} % simulated (×{})",
        a.steps,
        a.step_s,
        a.wall_s,
        injected.len(),
        a.saves,
        a.saves_s,
        100.0 * a.goodput_compressed(),
        100.0 * a.goodput_simulated(args.time_factor),
        args.time_factor
    );
    println!("  loss, real seconds (Cohort's | the payload's, compressed ×{}):", args.time_factor);
    println!("{}", row("first start", 1, &a.initial));
    for (kind, (n, l)) in &a.by_kind {
        println!("{}", row(kind, *n, l));
    }
    println!("{}", row("all faults", injected.len() as u32, &a.faults));
    println!("  unexplained {:.1} s (slow steps, polling)", a.unexplained_s());
    let json = serde_json::json!({
        "seed": seed, "tuned": args.tuned, "steps": a.steps, "step_s": a.step_s, "wall_s": a.wall_s,
        "faults": injected.iter().map(|f| serde_json::json!({"kind": f.kind.name(), "node": f.node, "attempt": f.attempt})).collect::<Vec<_>>(),
        "goodput_compressed": a.goodput_compressed(), "goodput_simulated": a.goodput_simulated(args.time_factor),
        "first_start": a.initial.json(), "fault_losses": a.faults.json(), "saves_s": a.saves_s,
    });
    println!("  json {json}");
}

fn print_summary(args: &Args, results: &[(u64, Account, usize)]) {
    if results.is_empty() {
        return;
    }
    let n = results.len() as f64;
    let mean = |f: &dyn Fn(&Account) -> f64| results.iter().map(|(_, a, _)| f(a)).sum::<f64>() / n;
    let faults: usize = results.iter().map(|(_, _, f)| f).sum();
    let mut total = Losses::default();
    for (_, a, _) in results {
        total.detect_s += a.faults.detect_s;
        total.teardown_s += a.faults.teardown_s;
        total.wait_s += a.faults.wait_s;
        total.launch_s += a.faults.launch_s;
        total.start_s += a.faults.start_s;
        total.load_s += a.faults.load_s;
        total.redo_s += a.faults.redo_s;
    }
    let per = faults.max(1) as f64;
    println!(
        "{} seeds ({}): goodput {:.1} % compressed, {:.1} % simulated; {faults} faults; per fault, real s: detect {:.2}, teardown {:.2}, wait {:.2}, launch {:.2}; compressed s: start {:.2}, load {:.2}, redo {:.2}",
        results.len(),
        if args.tuned { "tuned" } else { "defaults" },
        100.0 * mean(&|a| a.goodput_compressed()),
        100.0 * mean(&|a| a.goodput_simulated(args.time_factor)),
        total.detect_s / per,
        total.teardown_s / per,
        total.wait_s / per,
        total.launch_s / per,
        total.start_s / per,
        total.load_s / per,
        total.redo_s / per,
    );
}
