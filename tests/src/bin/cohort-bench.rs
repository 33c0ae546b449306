//! `cohort-bench`: Cohort's control plane at cluster scale. It starts real
//! `cohort-controller` processes (embedded store, then etcd with two
//! controllers) and, in this process, N simulated agents: real gRPC clients,
//! one HTTP/2 connection and one Session stream each, 8 fake GPUs, heartbeats
//! every second, launches that "start" at once (see `cohort_bench/fleet.rs`).
//!
//! ```text
//! cargo build --release --workspace
//! target/release/cohort-bench [--sizes 100,1000,10000] [--repeats 10] [--json]
//! ```
//!
//! For each size: controller CPU (cores, /proc/<pid>/stat over a window) and
//! RSS, heartbeat latency (send to HeartbeatAck, per heartbeat) against a
//! GetLeader round trip from the same process (a unary call that takes no
//! lock in the controller), etcd writes per second idle and while 10 gangs
//! run (etcd's revision before and after the window), and a leader takeover
//! (SIGKILL the leader; time to the standby leading and to every agent
//! registered with it and acked by it). At the largest size: submit-to-Running
//! of gangs of 2, 16, 128 and 1,024 nodes and the teardown of a 128-node gang
//! after one rank exits with code 1.
//!
//! The table goes to stdout; with `--json` it goes to stderr and stdout holds
//! exactly one JSON object.

#[path = "cohort_bench/fleet.rs"]
mod fleet;
#[path = "cohort_bench/procs.rs"]
mod procs;
#[path = "cohort_bench/report.rs"]
mod report;
#[path = "cohort_bench/scenarios.rs"]
mod scenarios;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use cohort_tests::SparePort;
use cohort_tests::etcd::EtcdCluster;

use crate::fleet::{Fleet, FleetConfig};
use crate::procs::{ControllerArgs, ControllerProc};
use crate::report::{EmbeddedRun, EtcdRun, Launches, Results};
use crate::scenarios::EtcdProbe;

#[derive(Parser)]
#[command(about = "Controller footprint, heartbeat, launch, teardown, failover and etcd figures with simulated agents")]
pub struct Args {
    /// Fleet sizes (simulated agents), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    sizes: Vec<usize>,
    /// Gang sizes for submit-to-Running, comma-separated (run at the largest fleet size).
    #[arg(long, value_delimiter = ',', default_value = "2,16,128,1024")]
    gangs: Vec<usize>,
    /// Jobs per gang size, and teardown runs.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Nodes of the gang whose rank fails in the teardown measurement.
    #[arg(long, default_value_t = 128)]
    teardown_nodes: usize,
    /// Measurement window, seconds.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Seconds in a row the controller must keep up (every heartbeat acked within
    /// a second) after every agent is connected, before measuring.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Most seconds spent on one gang size (jobs after that are skipped, and said so).
    #[arg(long, default_value_t = 120)]
    gang_budget: u64,
    /// Most seconds one gang may take to reach Running (and to clear after its cancel).
    #[arg(long, default_value_t = 60)]
    gang_timeout: u64,
    /// Most seconds to wait for a failed gang to clear after its cancel.
    #[arg(long, default_value_t = 30)]
    gang_cleanup: u64,
    /// Gangs kept running during the second etcd window.
    #[arg(long, default_value_t = 10)]
    etcd_jobs: usize,
    /// The controllers' --leader-ttl in the etcd runs, milliseconds.
    #[arg(long, default_value_t = 3000)]
    leader_ttl_ms: u64,
    /// Agents connecting and registering at once while a fleet starts.
    #[arg(long, default_value_t = 256)]
    start_concurrency: usize,
    /// Address-space limit of each controller (prlimit --as), GiB; 0: none. A
    /// controller past it aborts instead of pushing the machine out of memory.
    #[arg(long, default_value_t = 6)]
    controller_memory_gib: u64,
    /// CPUs the controllers are confined to (`taskset -c`, e.g. `0,1`), so that
    /// the simulated agents in this process (pin it elsewhere) do not share
    /// them, as agents on other hosts would not. Default: not confined.
    #[arg(long)]
    controller_cpus: Option<String>,
    /// Skip the etcd runs.
    #[arg(long)]
    no_etcd: bool,
    /// At the largest size with etcd: the gangs (`--gangs`) on etcd, then the
    /// largest again while every etcd answer comes this much later (a proxy
    /// between the controllers and etcd), heartbeat acks recorded; 0: skip both.
    #[arg(long, default_value_t = 50)]
    etcd_delay_ms: u64,
    /// With etcd, only the gangs and the slow-etcd run: no idle and busy
    /// windows, no takeover.
    #[arg(long)]
    etcd_gangs_only: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(!args.sizes.is_empty() && args.sizes.iter().all(|s| *s > 0), "--sizes needs positive fleet sizes");
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    args.sizes.sort_unstable();
    args.sizes.dedup();
    let largest = args.sizes.last().copied().unwrap_or(0);
    // One socket per agent here and one in the controller (its own process,
    // which inherits the limit), plus etcd, clients and files.
    let fd_limit = procs::raise_fd_limit(largest as u64 + 1024);
    let mut results = Results::new(&args, fd_limit);
    let started = Instant::now();
    for &n in &args.sizes {
        eprintln!("== {n} agents, embedded store (load {:?})", procs::load_average());
        let run = embedded(&args, n, n == largest).await;
        results.embedded.push(run);
        settle_fds().await;
        if !args.no_etcd {
            eprintln!("== {n} agents, etcd store (load {:?})", procs::load_average());
            let run = etcd(&args, n, n == largest).await;
            results.etcd.push(run);
            settle_fds().await;
        }
    }
    results.elapsed_s = started.elapsed().as_secs_f64();
    results.load_end = procs::load_average();
    let table = report::table(&results);
    if args.json {
        eprint!("{table}");
        println!("{}", report::json(&results));
    } else {
        print!("{table}");
    }
    Ok(())
}

/// The sockets of a fleet just shut down close in the background: wait, so
/// the next fleet has the descriptors.
async fn settle_fds() {
    let deadline = Instant::now() + Duration::from_secs(15);
    while procs::open_fds() > 512 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn settle_timeout(n: usize) -> Duration {
    Duration::from_secs(20 + n as u64 / 200)
}

fn connect_timeout(n: usize) -> Duration {
    Duration::from_secs(60 + n as u64 / 50)
}

/// One controller on the embedded store with `n` agents: footprint and
/// heartbeats; with `launches`, also gangs and teardown.
async fn embedded(args: &Args, n: usize, launches: bool) -> EmbeddedRun {
    let mut run = EmbeddedRun::new(n);
    let outcome = async {
        let port = SparePort::take();
        let dir = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
        let mut controller = ControllerProc::spawn(ControllerArgs {
            name: "controller",
            port: port.port,
            data_dir: dir.path(),
            master_ports: format!("{}-{}", port.port + 3, port.port + 39),
            etcd: None,
            leader_ttl: Duration::from_millis(args.leader_ttl_ms),
            memory_limit: memory_limit(args),
            cpus: args.controller_cpus.as_deref(),
        })?;
        let mut client = procs::client(&controller.url, Duration::from_secs(20)).await?;
        procs::wait_leading(&mut client, Duration::from_secs(20)).await?;
        let fleet = Fleet::start(FleetConfig {
            urls: vec![controller.url.clone()],
            agents: n,
            start_concurrency: args.start_concurrency,
        });
        let result = async {
            let t = Instant::now();
            let all = fleet.wait_acked(t, None, connect_timeout(n)).await?;
            run.connect_s = Some(all.duration_since(t).as_secs_f64());
            eprintln!("  {n} agents connected in {:.1}s", all.duration_since(t).as_secs_f64());
            run.breaks_connecting = fleet.shared.session_breaks.load(std::sync::atomic::Ordering::Relaxed);
            run.settle_s = scenarios::settle(&fleet, args.warmup as usize, settle_timeout(n)).await;
            eprintln!("  settled: {:?} s", run.settle_s);
            run.steady = Some(scenarios::steady(&fleet, &controller, &mut client, window(args), None).await?);
            if launches {
                run.launches = Some(launch_figures(args, &mut client, &fleet, &mut controller).await);
            }
            anyhow::Ok(())
        }
        .await;
        fleet.shutdown().await;
        if result.is_err() {
            run.controller_log = controller.log_errors(5);
        }
        result
    }
    .await;
    if let Err(e) = outcome {
        eprintln!("  failed: {e:#}");
        run.error = Some(format!("{e:#}"));
    }
    run
}

fn memory_limit(args: &Args) -> Option<u64> {
    (args.controller_memory_gib > 0).then_some(args.controller_memory_gib << 30)
}

fn window(args: &Args) -> Duration {
    Duration::from_secs(args.window)
}

/// One gang size; afterwards the controller's peak RSS, or how it died.
async fn gang(
    args: &Args,
    client: &mut scenarios::Client,
    fleet: &Fleet,
    controller: &mut ControllerProc,
    nodes: usize,
) -> Option<scenarios::Gang> {
    if nodes > fleet.len() {
        eprintln!("  gang of {nodes}: skipped, only {} agents", fleet.len());
        return None;
    }
    let rss = procs::RssSampler::start(controller.pid());
    let mut gang = scenarios::launch_gang(
        client,
        fleet,
        nodes,
        args.repeats,
        Duration::from_secs(args.gang_budget),
        Duration::from_secs(args.gang_timeout),
        Duration::from_secs(args.gang_cleanup),
    )
    .await;
    gang.peak_rss_mib = Some(rss.finish());
    if let Some(how) = controller.exited() {
        let note = format!("the controller died ({how}; address space capped at {} GiB)", args.controller_memory_gib);
        eprintln!("  {note}");
        gang.note = Some(gang.note.map(|n| format!("{n}; {note}")).unwrap_or(note));
    }
    Some(gang)
}

async fn launch_figures(
    args: &Args,
    client: &mut scenarios::Client,
    fleet: &Fleet,
    controller: &mut ControllerProc,
) -> Launches {
    let n = fleet.len();
    let mut launches = Launches { agents: n, gangs: Vec::new(), teardown: None, quick: None };
    // Gangs up to the teardown's size first, then the teardown, then the
    // bigger gangs: one that overwhelms the controller must not spoil the rest.
    let (small, big): (Vec<usize>, Vec<usize>) = args.gangs.iter().partition(|g| **g <= args.teardown_nodes);
    for &nodes in &small {
        launches.gangs.extend(gang(args, client, fleet, controller, nodes).await);
    }
    if args.teardown_nodes <= n && args.teardown_nodes >= 2 {
        launches.teardown = Some(scenarios::teardown(client, fleet, args.teardown_nodes, args.repeats).await);
    }
    // A gang whose processes end at once: is it ever Running?
    let quick_nodes = 16.min(n);
    launches.quick = Some(match scenarios::quick_gang(client, quick_nodes).await {
        Ok((state, running)) => (quick_nodes, format!("{state:?}"), running),
        Err(e) => (quick_nodes, format!("error: {e:#}"), false),
    });
    for &nodes in &big {
        if controller.exited().is_some() {
            break;
        }
        launches.gangs.extend(gang(args, client, fleet, controller, nodes).await);
    }
    launches
}

/// etcd (one member) and two controllers with `n` agents given both URLs:
/// writes per second idle and busy, then a leader takeover.
async fn etcd(args: &Args, n: usize, largest: bool) -> EtcdRun {
    let mut run = EtcdRun::new(n);
    let outcome = async {
        let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await.context("starting etcd")?;
        let endpoint = etcd.endpoint(0);
        // The controllers reach etcd through a proxy that can slow its answers.
        let slow = if largest && args.etcd_delay_ms > 0 {
            let target = endpoint.trim_start_matches("http://").parse().context("etcd's address")?;
            Some(cohort_tests::proxy::SlowReplies::start("127.0.0.1:0".parse()?, target).await?)
        } else {
            None
        };
        let store_url = slow.as_ref().map_or_else(|| etcd.url(), |p| format!("etcd://{}", p.addr));
        let etcd_dir = etcd.log(0).parent().map(|p| p.display().to_string()).unwrap_or_default();
        let probe = EtcdProbe { endpoint: &endpoint, pid: procs::pid_with_arg(&etcd_dir) };
        let port = SparePort::take();
        let dir = tempfile::Builder::new().prefix("cohort-bench-").tempdir()?;
        let spawn = |i: u16, name: &'static str| {
            ControllerProc::spawn(ControllerArgs {
                name,
                port: port.port + i,
                data_dir: dir.path(),
                master_ports: format!("{}-{}", port.port + 3, port.port + 39),
                etcd: Some(&store_url),
                leader_ttl: Duration::from_millis(args.leader_ttl_ms),
                memory_limit: memory_limit(args),
                cpus: args.controller_cpus.as_deref(),
            })
        };
        let mut leader = spawn(0, "controller-0")?;
        let mut leader_client = procs::client(&leader.url, Duration::from_secs(20)).await?;
        procs::wait_leading(&mut leader_client, Duration::from_secs(30)).await?;
        let standby = spawn(1, "controller-1")?;
        let mut standby_client = procs::client(&standby.url, Duration::from_secs(20)).await?;
        let fleet = Fleet::start(FleetConfig {
            urls: vec![leader.url.clone(), standby.url.clone()],
            agents: n,
            start_concurrency: args.start_concurrency,
        });
        let result = async {
            let t = Instant::now();
            let all = fleet.wait_acked(t, Some(0), connect_timeout(n)).await?;
            run.connect_s = Some(all.duration_since(t).as_secs_f64());
            eprintln!("  {n} agents connected in {:.1}s", all.duration_since(t).as_secs_f64());
            run.breaks_connecting = fleet.shared.session_breaks.load(std::sync::atomic::Ordering::Relaxed);
            run.settle_s = scenarios::settle(&fleet, args.warmup as usize, settle_timeout(n)).await;
            eprintln!("  settled: {:?} s", run.settle_s);
            if let Some(slow) = &slow {
                run.gangs = Some(gangs_on_etcd(args, &mut leader_client, &fleet, &mut leader, slow).await);
                if args.etcd_gangs_only {
                    return anyhow::Ok(());
                }
            }
            run.idle = Some(scenarios::steady(&fleet, &leader, &mut leader_client, window(args), Some(&probe)).await?);
            let nodes = (n / args.etcd_jobs.max(1)).clamp(1, 128);
            eprintln!("  {} gangs of {nodes} running", args.etcd_jobs);
            let started = Instant::now();
            let busy = async {
                let ids = scenarios::start_jobs(&mut leader_client, args.etcd_jobs, nodes).await?;
                run.busy_start_s = Some(started.elapsed().as_secs_f64());
                let steady = scenarios::steady(&fleet, &leader, &mut leader_client, window(args), Some(&probe)).await?;
                scenarios::stop_jobs(&mut leader_client, &ids).await?;
                anyhow::Ok(steady)
            }
            .await;
            match busy {
                Ok(steady) => run.busy = Some((args.etcd_jobs, nodes, steady)),
                Err(e) => {
                    let breaks = fleet.shared.session_breaks.load(std::sync::atomic::Ordering::Relaxed);
                    run.busy_error = Some(format!(
                        "{e:#} ({:.1} s after the submits; {} agent sessions ended so far)",
                        started.elapsed().as_secs_f64(),
                        breaks
                    ));
                }
            }
            eprintln!("  takeover: SIGKILL {}", leader.name);
            let takeover = scenarios::takeover(&fleet, &mut leader, &mut standby_client, connect_timeout(n)).await;
            run.takeover = Some(takeover);
            if largest && n >= 1024 {
                run.big_gang = Some(big_gang_on_etcd(&mut standby_client, &standby).await);
            }
            anyhow::Ok(())
        }
        .await;
        fleet.shutdown().await;
        if result.is_err() {
            run.controller_log = leader.log_errors(3).into_iter().chain(standby.log_errors(3)).collect();
        }
        drop(standby);
        drop(leader);
        tokio::task::spawn_blocking(move || drop(etcd)).await?;
        result
    }
    .await;
    if let Err(e) = outcome {
        eprintln!("  failed: {e:#}");
        run.error = Some(format!("{e:#}"));
    }
    run
}

/// The gangs on etcd, then the largest while etcd answers `--etcd-delay-ms`
/// later; heartbeat acks recorded during each.
async fn gangs_on_etcd(
    args: &Args,
    client: &mut scenarios::Client,
    fleet: &Fleet,
    leader: &mut ControllerProc,
    slow: &cohort_tests::proxy::SlowReplies,
) -> report::EtcdGangs {
    let mut gangs = report::EtcdGangs::default();
    fleet.start_recording();
    for &nodes in &args.gangs {
        gangs.gangs.extend(gang(args, client, fleet, leader, nodes).await);
    }
    gangs.hb = scenarios::Stats::of(&fleet.stop_recording());
    let Some(&largest) = args.gangs.iter().max() else { return gangs };
    let delay = Duration::from_millis(args.etcd_delay_ms);
    eprintln!("  etcd answers {} ms later", args.etcd_delay_ms);
    slow.set_delay(delay);
    fleet.start_recording();
    gangs.slow = gang(args, client, fleet, leader, largest).await;
    gangs.slow_hb = scenarios::Stats::of(&fleet.stop_recording());
    slow.set_delay(Duration::ZERO);
    gangs.delay_ms = args.etcd_delay_ms;
    gangs
}

/// Whether a 1,024-node gang launches with the etcd store (its job record is
/// megabytes; etcd refuses requests over --max-request-bytes, 1.5 MiB by default).
async fn big_gang_on_etcd(client: &mut scenarios::Client, controller: &ControllerProc) -> String {
    eprintln!("  a 1024-node gang on etcd");
    let submitted = Instant::now();
    let result = async {
        let job = scenarios::submit(client, &scenarios::gang_yaml("bench-etcd-1024", 1024, false)).await?;
        scenarios::wait_job(client, &job.id, Duration::from_millis(200), Duration::from_secs(20), |j| {
            j.state == cohort_proto::JobState::Running as i32
        })
        .await
    }
    .await;
    match result {
        Ok(_) => format!("Running {:.0} ms after submit", submitted.elapsed().as_secs_f64() * 1000.0),
        Err(e) => {
            let errors = controller.log_errors(1);
            format!("not Running: {e:#}; controller log: {}", errors.join(" | "))
        }
    }
}
