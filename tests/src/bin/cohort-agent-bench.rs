//! The agent's single-node footprint: CPU and RSS of a real `cohort-agent`
//! supervising 8 ranks while it reports telemetry for 8 (fake) GPUs, and the
//! cost of its log capture on a rank's output throughput (lines per second
//! with capture, against the same program writing to a file directly and to
//! /dev/null, measured in the same run).
//!
//! `cargo build --release --workspace && target/release/cohort-agent-bench [--lines N] [--json]`

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cohort_proto::JobState;
use cohort_tests::{Cluster, NodeSpec, state};

#[derive(Parser)]
#[command(about = "Footprint of one agent with 8 ranks, and the overhead of its log capture")]
struct Args {
    /// Lines each throughput run prints.
    #[arg(long, default_value_t = 2_000_000)]
    lines: u64,
    /// Seconds over which CPU is measured.
    #[arg(long, default_value_t = 10)]
    window: u64,
    #[arg(long)]
    json: bool,
}

/// A rank that prints `n` numbered log-like lines as fast as it can.
fn printer(n: u64) -> String {
    format!("seq {n} | sed 's/^/iteration /'")
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("bad VmRSS")?.parse()?)
}

/// Percent of one core used by `pid` over `window`.
async fn cpu_percent(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let before = cpu_ticks(pid)?;
    tokio::time::sleep(window).await;
    Ok((cpu_ticks(pid)? - before) as f64 / hz / window.as_secs_f64() * 100.0)
}

/// Lines per second of the printer writing to `target` directly (no agent).
fn direct(lines: u64, target: &Path) -> anyhow::Result<f64> {
    let out = std::fs::File::create(target)?;
    let start = Instant::now();
    let status = Command::new("sh").args(["-c", &printer(lines)]).stdout(Stdio::from(out)).status()?;
    anyhow::ensure!(status.success(), "printer failed");
    Ok(lines as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let window = Duration::from_secs(args.window);
    let mut node = NodeSpec::loopback(0, 8);
    node.extra_args = vec!["--telemetry-interval".into(), "1s".into()];
    let cluster = Cluster::start(vec![node]).await?;
    let agent = *cluster.agent_pids().first().context("no agent")?;

    // 1. Idle with 8 fake GPUs reporting telemetry every second.
    let idle_cpu = cpu_percent(agent, window).await?;
    let idle_rss = rss_kib(agent)?;

    // 2. Supervising 8 quiet ranks.
    let flag = cluster.dir.path().join("release");
    let quiet = format!(
        "name: quiet\nkind: command\nnodes: 1\ngpus_per_node: 8\nlaunch: per-rank\n\
         command: [sh, -c, 'while [ ! -e {} ]; do sleep 0.2; done']\n",
        flag.display()
    );
    let job = cluster.submit(&quiet).await?;
    cluster.wait_job(&job.id, Duration::from_secs(30), |j| state(j) == JobState::Running).await?;
    let ranks_cpu = cpu_percent(agent, window).await?;
    let ranks_rss = rss_kib(agent)?;
    std::fs::write(&flag, "")?;
    cluster.wait_finished(&job.id, Duration::from_secs(30)).await?;

    // 3. Output throughput: one rank printing as fast as it can, through the
    // agent, against the same command writing to a file and to /dev/null.
    let tmp = cluster.dir.path().join("direct.out");
    let to_file = direct(args.lines, &tmp)?;
    let to_null = direct(args.lines, Path::new("/dev/null"))?;
    let loud = format!(
        "name: loud\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sh, -c, \"{}\"]\n",
        printer(args.lines)
    );
    let job = cluster.submit(&loud).await?;
    let done = cluster.wait_finished(&job.id, Duration::from_secs(600)).await?;
    anyhow::ensure!(state(&done) == JobState::Succeeded, "loud job: {}", done.reason);
    let p = &done.processes[0];
    let seconds = (p.ended_unix_ms - p.started_unix_ms) as f64 / 1000.0;
    let captured = args.lines as f64 / seconds;
    // The exit is reported only after every line was read and sent: this is
    // the rate at which the agent delivers a rank's output to the controller.
    let delivered = args.lines as f64 / ((done.finished_unix_ms - p.started_unix_ms) as f64 / 1000.0);
    let peak_rss = rss_kib(agent)?;

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "machine": {"cpus": cores, "profile": profile},
                "idle_8_fake_gpus": {"cpu_percent": idle_cpu, "rss_kib": idle_rss},
                "supervising_8_ranks": {"cpu_percent": ranks_cpu, "rss_kib": ranks_rss},
                "output": {"lines": args.lines, "captured_lines_per_s": captured, "delivered_lines_per_s": delivered, "direct_file_lines_per_s": to_file,
                           "direct_null_lines_per_s": to_null, "agent_rss_after_kib": peak_rss},
            })
        );
    } else {
        println!(
            "agent footprint ({cores} CPUs, {profile} build), telemetry every 1 s for 8 fake GPUs, CPU over {window:?}"
        );
        println!("{:<44} {:>10} {:>12}", "", "CPU %", "RSS (KiB)");
        println!("{:<44} {:>10.2} {:>12}", "idle", idle_cpu, idle_rss);
        println!("{:<44} {:>10.2} {:>12}", "supervising 8 ranks", ranks_cpu, ranks_rss);
        println!();
        println!("output of one rank, {} lines:", args.lines);
        println!("{:<44} {:>14.0}", "rank under the agent (writes its own file)", captured);
        println!("{:<44} {:>14.0}", "delivered to the controller by the agent", delivered);
        println!("{:<44} {:>14.0}", "baseline: same command > file", to_file);
        println!("{:<44} {:>14.0}", "baseline: same command > /dev/null", to_null);
        println!("{:<44} {:>13.2}x", "ratio captured / file", captured / to_file);
        println!("agent RSS after: {peak_rss} KiB");
    }
    Ok(())
}
