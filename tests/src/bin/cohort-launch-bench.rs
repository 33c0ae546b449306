//! `cohort-launch-bench`: launch latency, failure teardown latency and idle
//! footprint of a local Cohort cluster made of real processes (one
//! `cohort-controller`, three `cohort-agent`s on 127.0.0.2-4; see the
//! `cohort-tests` harness).
//!
//! The controller and agent binaries are taken from the directory this binary
//! lives in, so build them with the same profile. For release figures:
//!
//! ```text
//! cargo build --release --workspace && target/release/cohort-launch-bench [--runs 20] [--json]
//! ```
//!
//! What it measures (all times in ms):
//! 1. Submit-to-all-ranks-started of the 3-node rendezvous job
//!    (`running_unix_ms - submitted_unix_ms`, controller clock), against a
//!    baseline that spawns the same three `python3 rendezvous.py` processes
//!    directly with the same environment contract (just before the first spawn
//!    to the third spawn returned). For information also submit-to-Succeeded
//!    (`finished_unix_ms - submitted_unix_ms`) against the baseline's
//!    spawn-to-all-exited.
//! 2. With `FAIL_NODE_RANK=1 FAIL_CODE=3`: from node1's process exit to the
//!    last other process gone (`ended_unix_ms`, agent clocks on this machine).
//! 3. Idle RSS of the controller and each agent right after start and after
//!    the runs, and their CPU use over a 10 s idle window.
//!
//! The table goes to stdout; with `--json` it goes to stderr and stdout holds
//! exactly one JSON object.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use cohort_proto::{Job, JobState};
use cohort_tests::{Cluster, NodeSpec, repo_root, state};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Launch latency, failure teardown latency and idle footprint of a local Cohort cluster")]
struct Args {
    /// Runs of each measured job (and of the baseline).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

const NODES: usize = 3;

const RENDEZVOUS: &str = "
name: bench-launch
kind: command
nodes: 3
gpus_per_node: 1
workdir: tests/payloads
command: [python3, rendezvous.py]
";

const JOB_DEADLINE: Duration = Duration::from_secs(60);
const IDLE_WINDOW: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.runs > 0, "--runs must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let machine = machine();
    let cluster =
        Cluster::start((0..NODES).map(|i| NodeSpec::loopback(i, 1)).collect()).await.context("starting the cluster")?;
    let procs = Procs::of(&cluster)?;
    let rss_start = procs.rss()?;

    // The baseline's MASTER_PORTs come from a port block of its own, held
    // the same way the harness holds the cluster's.
    let baseline_ports = PortBlock::take()?;

    let mut launch = Vec::new();
    let mut success = Vec::new();
    let mut base_spawn = Vec::new();
    let mut base_exit = Vec::new();
    for run in 0..args.runs {
        eprint!("\rlaunch run {}/{}", run + 1, args.runs);
        let job = cluster.submit(RENDEZVOUS).await?;
        let job = cluster.wait_finished(&job.id, JOB_DEADLINE).await?;
        ensure!(state(&job) == JobState::Succeeded, "rendezvous job {} did not succeed: {}", job.id, job.reason);
        ensure!(job.running_unix_ms > 0, "job {} succeeded but was never seen Running", job.id);
        launch.push((job.running_unix_ms - job.submitted_unix_ms) as f64);
        success.push((job.finished_unix_ms - job.submitted_unix_ms) as f64);

        let port = baseline_ports.port(run);
        let (spawned, exited) = tokio::task::spawn_blocking(move || baseline(port, run)).await??;
        base_spawn.push(spawned);
        base_exit.push(exited);
    }
    eprintln!();

    let fail_yaml = format!("{RENDEZVOUS}env: {{FAIL_NODE_RANK: '1', FAIL_CODE: '3'}}\n");
    let mut teardown = Vec::new();
    for run in 0..args.runs {
        eprint!("\rfailure run {}/{}", run + 1, args.runs);
        let job = cluster.submit(&fail_yaml).await?;
        let job = cluster.wait_finished(&job.id, JOB_DEADLINE).await?;
        teardown.push(teardown_ms(&job)? as f64);
    }
    eprintln!();

    let rss_after = procs.rss()?;
    eprintln!("measuring CPU over a {}s idle window", IDLE_WINDOW.as_secs());
    let cpu = procs.idle_cpu(IDLE_WINDOW).await?;

    let launch_s = Stats::of(&launch);
    let base_spawn_s = Stats::of(&base_spawn);
    let success_s = Stats::of(&success);
    let base_exit_s = Stats::of(&base_exit);
    let teardown_s = Stats::of(&teardown);

    let mut t = String::new();
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    t += &format!("machine: {} CPUs, kernel {}, {}\n", machine.nproc, machine.kernel, machine.cpu);
    t += &format!("build: {profile}; binaries from {}\n", cohort_tests::bin_dir().display());
    t += &format!("runs: {} per measurement; {NODES} nodes x 1 fake GPU on 127.0.0.2-{}\n\n", args.runs, NODES + 1);
    t += &format!("{:<52} {:>9} {:>9} {:>9} {:>9}\n", "latency (ms)", "p50", "p90", "max", "min");
    for (name, s) in [
        ("1. cohort submit -> all ranks started", &launch_s),
        ("   baseline spawn x3 -> all spawn() returned", &base_spawn_s),
        ("   cohort submit -> Succeeded (info)", &success_s),
        ("   baseline spawn -> all exited (info)", &base_exit_s),
        ("2. rank exit -> last other process gone", &teardown_s),
    ] {
        t += &format!("{name:<52} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n", s.p50, s.p90, s.max, s.min);
    }
    t += &format!(
        "   ratio cohort/baseline, start (p50, p90): {:.1}x, {:.1}x\n",
        launch_s.p50 / base_spawn_s.p50,
        launch_s.p90 / base_spawn_s.p90
    );
    t += &format!(
        "   ratio cohort/baseline, to done (p50, p90): {:.2}x, {:.2}x\n\n",
        success_s.p50 / base_exit_s.p50,
        success_s.p90 / base_exit_s.p90
    );
    t += &format!(
        "{:<14} {:>8} {:>16} {:>16} {:>14}\n",
        "3. process", "pid", "RSS start (KiB)", "RSS after (KiB)", "idle CPU (%)"
    );
    for (i, p) in procs.list.iter().enumerate() {
        t += &format!("{:<14} {:>8} {:>16} {:>16} {:>14.3}\n", p.name, p.pid, rss_start[i], rss_after[i], cpu[i]);
    }
    t += &format!(
        "{:<14} {:>8} {:>16} {:>16} {:>14.3}\n",
        "total",
        "",
        rss_start.iter().sum::<u64>(),
        rss_after.iter().sum::<u64>(),
        cpu.iter().sum::<f64>()
    );
    t +=
        &format!("   (CPU: utime+stime over a {}s idle window after the runs, % of one core)\n", IDLE_WINDOW.as_secs());

    if args.json {
        eprint!("{t}");
        let processes: Vec<Value> = procs
            .list
            .iter()
            .enumerate()
            .map(|(i, p)| {
                json!({
                    "name": p.name,
                    "pid": p.pid,
                    "rss_start_kib": rss_start[i],
                    "rss_after_kib": rss_after[i],
                    "idle_cpu_percent": cpu[i],
                })
            })
            .collect();
        let out = json!({
            "machine": { "nproc": machine.nproc, "kernel": machine.kernel, "cpu_model": machine.cpu },
            "profile": profile,
            "runs": args.runs,
            "launch_ms": {
                "cohort_submit_to_all_started": launch_s.json(),
                "baseline_spawn_to_all_spawned": base_spawn_s.json(),
                "ratio_p50": launch_s.p50 / base_spawn_s.p50,
                "ratio_p90": launch_s.p90 / base_spawn_s.p90,
                "cohort_submit_to_succeeded": success_s.json(),
                "baseline_spawn_to_all_exited": base_exit_s.json(),
                "samples": { "cohort": launch, "baseline": base_spawn, "cohort_succeeded": success, "baseline_exited": base_exit },
            },
            "failure_teardown_ms": {
                "rank_exit_to_last_other_gone": teardown_s.json(),
                "samples": teardown,
            },
            "idle": {
                "cpu_window_s": IDLE_WINDOW.as_secs(),
                "processes": processes,
                "rss_start_total_kib": rss_start.iter().sum::<u64>(),
                "rss_after_total_kib": rss_after.iter().sum::<u64>(),
                "cpu_total_percent": cpu.iter().sum::<f64>(),
            },
        });
        println!("{out}");
    } else {
        print!("{t}");
    }
    Ok(())
}

/// node1's exit to the last other process's end, after checking the job failed because of it.
fn teardown_ms(job: &Job) -> anyhow::Result<i64> {
    ensure!(state(job) == JobState::Failed, "job {} should have Failed, is {:?}: {}", job.id, state(job), job.reason);
    let failure = job.failure.as_ref().with_context(|| format!("job {} failed without a failure", job.id))?;
    ensure!(
        failure.node_name == "node1" && failure.exit_code == Some(3),
        "job {} should have failed on node1 with code 3, failure is {failure:?}",
        job.id
    );
    let failed = job.processes.iter().find(|p| p.node_name == "node1").context("no process on node1")?;
    ensure!(failed.ended_unix_ms > 0, "node1's process has no end time: {failed:?}");
    let mut last = None;
    for p in job.processes.iter().filter(|p| p.node_name != "node1") {
        ensure!(p.ended_unix_ms > 0, "job {}: {}'s process has no end time: {p:?}", job.id, p.node_name);
        last = last.max(Some(p.ended_unix_ms));
    }
    let last = last.context("no other process")?;
    Ok(last - failed.ended_unix_ms)
}

/// Spawns the three ranks directly; returns (first spawn to third spawn
/// returned, first spawn to all exited) in ms.
fn baseline(port: u16, run: usize) -> anyhow::Result<(f64, f64)> {
    let dir = repo_root().join("tests/payloads");
    let ips: Vec<String> = (0..NODES).map(|i| format!("127.0.0.{}", i + 2)).collect();
    let commands: Vec<Command> = (0..NODES)
        .map(|rank| {
            let mut c = Command::new("python3");
            c.arg("rendezvous.py")
                .current_dir(&dir)
                .env("NNODES", NODES.to_string())
                .env("NODE_RANK", rank.to_string())
                .env("NPROC_PER_NODE", "1")
                .env("WORLD_SIZE", NODES.to_string())
                .env("MASTER_ADDR", &ips[0])
                .env("MASTER_PORT", port.to_string())
                .env("CUDA_VISIBLE_DEVICES", "0")
                .env("COHORT_JOB_ID", format!("baseline-{run}"))
                .env("COHORT_ATTEMPT", "1")
                .env("COHORT_NODE_NAME", format!("node{rank}"))
                .env("COHORT_NODE_IPS", ips.join(","))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        })
        .collect();
    let start = Instant::now();
    let mut children = Vec::new();
    for mut c in commands {
        children.push(c.spawn().context("spawning python3 rendezvous.py")?);
    }
    let spawned = start.elapsed();
    // The output is a few lines, well within a pipe's buffer, so waiting in turn cannot block a rank.
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "baseline run {run}: rank {rank} exited with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let exited = start.elapsed();
    Ok((ms(spawned), ms(exited)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Stats {
    p50: f64,
    p90: f64,
    max: f64,
    min: f64,
}

impl Stats {
    /// Nearest-rank percentiles.
    fn of(samples: &[f64]) -> Stats {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Stats { p50: pick(0.5), p90: pick(0.9), max: v[v.len() - 1], min: v[0] }
    }

    fn json(&self) -> Value {
        json!({ "p50": self.p50, "p90": self.p90, "max": self.max, "min": self.min })
    }
}

struct Machine {
    nproc: usize,
    kernel: String,
    cpu: String,
}

fn machine() -> Machine {
    let nproc = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    Machine { nproc, kernel, cpu }
}

struct Proc {
    name: String,
    pid: u32,
}

/// The controller and the agents of the cluster.
struct Procs {
    list: Vec<Proc>,
}

impl Procs {
    fn of(cluster: &Cluster) -> anyhow::Result<Procs> {
        let controller = cluster.controller_pid().context("the controller is not running")?;
        let agents = cluster.agent_pids();
        ensure!(agents.len() == NODES, "expected {NODES} agents, have {}", agents.len());
        let mut list = vec![Proc { name: "controller".into(), pid: controller }];
        list.extend(agents.into_iter().enumerate().map(|(i, pid)| Proc { name: format!("agent node{i}"), pid }));
        Ok(Procs { list })
    }

    /// VmRSS of each, in KiB.
    fn rss(&self) -> anyhow::Result<Vec<u64>> {
        self.list
            .iter()
            .map(|p| {
                let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
                    .with_context(|| format!("{} (pid {}) is gone", p.name, p.pid))?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .with_context(|| format!("no VmRSS for {} (pid {})", p.name, p.pid))
            })
            .collect()
    }

    /// utime+stime in clock ticks of each.
    fn cpu_ticks(&self) -> anyhow::Result<Vec<u64>> {
        self.list
            .iter()
            .map(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
                    .with_context(|| format!("{} (pid {}) is gone", p.name, p.pid))?;
                // "pid (comm) state ...": comm may hold spaces, so split after ')'.
                let rest = stat.rfind(')').map(|i| &stat[i + 2..]).context("malformed /proc/<pid>/stat")?;
                let fields: Vec<&str> = rest.split(' ').collect();
                // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
                let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).context("no utime")?;
                let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).context("no stime")?;
                Ok(utime + stime)
            })
            .collect()
    }

    /// CPU used by each over `window`, in % of one core.
    async fn idle_cpu(&self, window: Duration) -> anyhow::Result<Vec<f64>> {
        let hz = clock_ticks_per_second();
        let before = self.cpu_ticks()?;
        let start = Instant::now();
        // The window itself is the measurement.
        tokio::time::sleep(window).await;
        let after = self.cpu_ticks()?;
        let elapsed = start.elapsed().as_secs_f64();
        Ok(before.iter().zip(&after).map(|(b, a)| (a - b) as f64 / hz / elapsed * 100.0).collect())
    }
}

/// USER_HZ, the unit of /proc/<pid>/stat times (100 on every usual Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A block of ports taken from the harness's scheme (lock files
/// cohort-test-ports-<base>.lock in the temp dir), so neither parallel tests
/// nor the bench's own cluster use the same ports.
struct PortBlock {
    _lock: Flock<File>,
    base: u16,
}

const BLOCK: u16 = 40;

impl PortBlock {
    fn take() -> anyhow::Result<PortBlock> {
        for i in 0..200u16 {
            let base = 20000 + i * BLOCK;
            let path: PathBuf = std::env::temp_dir().join(format!("cohort-test-ports-{base}.lock"));
            let Ok(file) = File::create(&path) else { continue };
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return Ok(PortBlock { _lock: lock, base });
            }
        }
        bail!("no free port block in 20000-27999")
    }

    /// A port of the block for run `run`, cycling so a port is not reused at once.
    fn port(&self, run: usize) -> u16 {
        self.base + 1 + (run % usize::from(BLOCK - 1)) as u16
    }
}
