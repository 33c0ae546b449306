//! What the bench measures against a running controller and fleet.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{CancelJobRequest, GetJobRequest, GetLeaderRequest, Job, JobFile, JobState, SubmitJobRequest};
use prost::Message;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::fleet::{Fleet, node_index};
use crate::procs::{self, ControllerProc, CpuWindow};

pub type Client = JobServiceClient<Channel>;

/// Nearest-rank percentiles of samples in ms.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        if samples.is_empty() {
            return Stats::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Stats { n: v.len(), p50: pick(0.5), p99: pick(0.99), max: v[v.len() - 1] }
    }

    pub fn json(&self) -> Value {
        if self.n == 0 {
            return Value::Null;
        }
        json!({ "n": self.n, "p50": self.p50, "p99": self.p99, "max": self.max })
    }
}

/// The first `max` characters of `text`, with "..." when cut (a gang's reason names every node).
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_ms_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

fn state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

fn is_terminal(job: &Job) -> bool {
    matches!(state(job), JobState::Succeeded | JobState::Failed | JobState::Cancelled)
}

/// A command job on `nodes` whole simulated nodes (8 GPUs each).
pub fn gang_yaml(name: &str, nodes: usize, quick: bool) -> String {
    let argv = if quick { "[/bin/true, --quick]" } else { "[/bin/sleep, infinity]" };
    format!("name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 8\ncommand: {argv}\n")
}

pub async fn submit(client: &mut Client, yaml: &str) -> anyhow::Result<Job> {
    let file = JobFile { yaml: yaml.into(), source_name: "cohort-bench.yaml".into(), ..JobFile::default() };
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        client.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("SubmitJob got no answer within 60 s"))?
    .context("SubmitJob")?;
    response.into_inner().job.context("SubmitJob answered without a job")
}

/// Polls GetJob every `poll` until `done(job)`; fails on a terminal job that is not done.
pub async fn wait_job(
    client: &mut Client,
    id: &str,
    poll: Duration,
    within: Duration,
    done: impl Fn(&Job) -> bool,
) -> anyhow::Result<Job> {
    let deadline = Instant::now() + within;
    loop {
        // A controller stuck on its lock answers late or never: the deadline holds for each call too.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let job = tokio::time::timeout(left, client.get_job(GetJobRequest { job: id.into() }))
            .await
            .map_err(|_| anyhow::anyhow!("GetJob {id} got no answer within {within:?}"))?
            .context("GetJob")?
            .into_inner();
        if done(&job) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!(
                "job {id} is {:?} ({} live processes) after {within:?}: {}",
                state(&job),
                job.live_processes,
                clip(&job.reason, 100)
            );
        }
        tokio::time::sleep(poll).await;
    }
}

async fn cancel_and_clear(client: &mut Client, id: &str, within: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(within, client.cancel_job(CancelJobRequest { job: id.into() }))
        .await
        .map_err(|_| anyhow::anyhow!("CancelJob {id} got no answer within {within:?}"))?
        .context("CancelJob")?;
    wait_job(client, id, Duration::from_millis(50), within, |j| is_terminal(j) && j.live_processes == 0).await?;
    Ok(())
}

// ------------------------------------------------------------ steady state

/// Waits until the controller keeps up: one-second spans in which every
/// heartbeat is acked (2% slack) and the slowest ack took under a second, for
/// `spans` spans in a row. Returns the seconds it took, or None after `within`.
pub async fn settle(fleet: &Fleet, spans: usize, within: Duration) -> Option<f64> {
    let start = Instant::now();
    let mut good = 0;
    while start.elapsed() < within {
        let sent = fleet.shared.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed);
        let acks = fleet.shared.acks.load(std::sync::atomic::Ordering::Relaxed);
        fleet.start_recording();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let worst = Stats::of(&fleet.stop_recording()).max;
        let sent = fleet.shared.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed) - sent;
        let acks = fleet.shared.acks.load(std::sync::atomic::Ordering::Relaxed) - acks;
        let keeps_up = acks as f64 >= 0.98 * sent as f64 && (acks as f64) <= 1.02 * sent as f64 + 1.0 && worst < 1000.0;
        good = if keeps_up { good + 1 } else { 0 };
        if good >= spans {
            return Some(start.elapsed().as_secs_f64());
        }
    }
    None
}

/// The controller (and etcd) at rest with the fleet heartbeating.
pub struct Steady {
    pub window_s: f64,
    pub controller_cores: f64,
    pub bench_cores: f64,
    pub etcd_cores: Option<f64>,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub heartbeats_per_s: f64,
    pub acks_per_s: f64,
    pub hb: Stats,
    pub baseline: Stats,
    pub etcd_writes_per_s: Option<f64>,
    pub session_breaks: u64,
    pub load: [f64; 3],
}

impl Steady {
    pub fn json(&self) -> Value {
        json!({
            "window_s": self.window_s,
            "controller_cpu_cores": self.controller_cores,
            "bench_cpu_cores": self.bench_cores,
            "etcd_cpu_cores": self.etcd_cores,
            "controller_rss_mib": self.rss_mib,
            "controller_peak_rss_mib": self.hwm_mib,
            "heartbeats_per_s": self.heartbeats_per_s,
            "acks_per_s": self.acks_per_s,
            "heartbeat_ack_ms": self.hb.json(),
            "baseline_get_leader_ms": self.baseline.json(),
            "etcd_writes_per_s": self.etcd_writes_per_s,
            "session_breaks": self.session_breaks,
            "load_average": self.load,
        })
    }
}

pub struct EtcdProbe<'a> {
    pub endpoint: &'a str,
    pub pid: Option<u32>,
}

pub async fn steady(
    fleet: &Fleet,
    controller: &ControllerProc,
    client: &mut Client,
    window: Duration,
    etcd: Option<&EtcdProbe<'_>>,
) -> anyhow::Result<Steady> {
    let shared = &fleet.shared;
    let mut pids = vec![controller.pid(), std::process::id()];
    if let Some(pid) = etcd.and_then(|e| e.pid) {
        pids.push(pid);
    }
    let revision_before = match etcd {
        Some(e) => Some(procs::etcd_revision(e.endpoint)?),
        None => None,
    };
    let sent = shared.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed);
    let acks = shared.acks.load(std::sync::atomic::Ordering::Relaxed);
    let breaks = shared.session_breaks.load(std::sync::atomic::Ordering::Relaxed);
    fleet.start_recording();
    let cpu = CpuWindow::start(&pids)?;
    let start = Instant::now();
    // Baseline: a unary round trip that takes no lock in the controller, from this process.
    let mut baseline = Vec::new();
    while start.elapsed() < window {
        let t = Instant::now();
        client.get_leader(GetLeaderRequest {}).await.context("GetLeader")?;
        baseline.push(ms(t.elapsed()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cores = cpu.cores()?;
    let elapsed = start.elapsed().as_secs_f64();
    let revision_after = match etcd {
        Some(e) => Some(procs::etcd_revision(e.endpoint)?),
        None => None,
    };
    let samples = fleet.stop_recording();
    let (rss, hwm) = procs::memory_kib(controller.pid())?;
    let sent = shared.heartbeats_sent.load(std::sync::atomic::Ordering::Relaxed) - sent;
    let acks = shared.acks.load(std::sync::atomic::Ordering::Relaxed) - acks;
    Ok(Steady {
        window_s: elapsed,
        controller_cores: cores[0],
        bench_cores: cores[1],
        etcd_cores: cores.get(2).copied(),
        rss_mib: rss as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
        heartbeats_per_s: sent as f64 / elapsed,
        acks_per_s: acks as f64 / elapsed,
        hb: Stats::of(&samples),
        baseline: Stats::of(&baseline),
        etcd_writes_per_s: revision_before.zip(revision_after).map(|(b, a)| (a - b) as f64 / elapsed),
        session_breaks: shared.session_breaks.load(std::sync::atomic::Ordering::Relaxed) - breaks,
        load: procs::load_average(),
    })
}

// ------------------------------------------------------------------ launch

pub struct Gang {
    pub nodes: usize,
    /// Submit (this process's clock) to `running_unix_ms` (the controller's), ms.
    pub to_running: Vec<f64>,
    /// Submit to the last simulated agent receiving its LaunchCommand, ms.
    pub to_last_launch: Vec<f64>,
    /// Cancel to every process stopped (information), ms.
    pub cancel_to_clear: Vec<f64>,
    /// The job as GetJob returns it, encoded (what each persist writes).
    pub record_kib: f64,
    /// The controller's peak RSS (VmHWM) after this gang size, MiB.
    pub peak_rss_mib: Option<f64>,
    pub note: Option<String>,
}

impl Gang {
    pub fn json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "submit_to_running_ms": Stats::of(&self.to_running).json(),
            "submit_to_last_launch_command_ms": Stats::of(&self.to_last_launch).json(),
            "cancel_to_all_stopped_ms": Stats::of(&self.cancel_to_clear).json(),
            "job_record_kib": self.record_kib,
            "controller_peak_rss_mib": self.peak_rss_mib,
            "note": self.note,
            "samples_submit_to_running_ms": self.to_running,
        })
    }
}

/// Submit-to-Running of `repeats` gangs of `nodes`, one at a time, each
/// cancelled and cleared before the next; stops early past `budget`.
pub async fn launch_gang(
    client: &mut Client,
    fleet: &Fleet,
    nodes: usize,
    repeats: usize,
    budget: Duration,
    timeout: Duration,
    cleanup: Duration,
) -> Gang {
    let mut gang = Gang {
        nodes,
        to_running: Vec::new(),
        to_last_launch: Vec::new(),
        cancel_to_clear: Vec::new(),
        record_kib: 0.0,
        peak_rss_mib: None,
        note: None,
    };
    let poll = Duration::from_millis(match nodes {
        0..=16 => 5,
        17..=128 => 20,
        _ => 100,
    });
    let began = Instant::now();
    for run in 0..repeats {
        if began.elapsed() > budget {
            gang.note = Some(format!("stopped after {run} of {repeats} jobs: over the {budget:?} budget"));
            break;
        }
        eprint!("\r  gang of {nodes}: job {}/{repeats}   ", run + 1);
        let yaml = gang_yaml(&format!("bench-gang-{nodes}"), nodes, false);
        let submitted_at = Instant::now();
        let submitted_ms = unix_ms_f64();
        let mut submitted = None;
        let result = async {
            let job = submit(client, &yaml).await?;
            submitted = Some(job.id.clone());
            let running =
                wait_job(client, &job.id, poll, timeout, |j| state(j) == JobState::Running || is_terminal(j)).await?;
            ensure!(
                state(&running) == JobState::Running,
                "job {} ended {:?}: {}",
                job.id,
                state(&running),
                clip(&running.reason, 100)
            );
            let launches = fleet.launches_of(&job.id);
            let last_launch = launches.iter().max().map(|t| ms(t.duration_since(submitted_at)));
            let record = running.encoded_len() as f64 / 1024.0;
            let cancelled = Instant::now();
            cancel_and_clear(client, &job.id, Duration::from_secs(120)).await?;
            anyhow::Ok((running.running_unix_ms as f64 - submitted_ms, last_launch, record, ms(cancelled.elapsed())))
        }
        .await;
        match result {
            Ok((to_running, last_launch, record, clear)) => {
                gang.to_running.push(to_running);
                gang.to_last_launch.extend(last_launch);
                gang.record_kib = record;
                gang.cancel_to_clear.push(clear);
            }
            Err(e) => {
                let mut note =
                    format!("job {} failed {:.1} s after submit: {e:#}", run + 1, submitted_at.elapsed().as_secs_f64());
                if let Some(id) = submitted {
                    if let Ok(job) = client.get_job(GetJobRequest { job: id.clone() }).await.map(|r| r.into_inner()) {
                        gang.record_kib = job.encoded_len() as f64 / 1024.0;
                        let started = job.processes.iter().filter(|p| p.started_unix_ms > 0).count();
                        note += &format!("; {started} of {} processes recorded started", job.processes.len());
                    }
                    let launches = fleet.launches_of(&id);
                    if let Some(last) = launches.iter().max() {
                        note += &format!(
                            "; {} agents got their LaunchCommand, the last {:.0} ms after submit",
                            launches.len(),
                            ms(last.duration_since(submitted_at))
                        );
                    }
                    // A job left launching would weigh on every later measurement.
                    let cleared = Instant::now();
                    note += &match cancel_and_clear(client, &id, cleanup).await {
                        Ok(()) => format!("; cancel -> cleared in {:.1} s", cleared.elapsed().as_secs_f64()),
                        Err(e) => format!("; after cancel: {e:#}"),
                    };
                }
                gang.note = Some(note);
                break;
            }
        }
    }
    eprintln!();
    gang
}

/// Whether a quick gang (every process exits 0 right after it starts) is ever
/// recorded Running: returns (state, running_unix_ms > 0).
pub async fn quick_gang(client: &mut Client, nodes: usize) -> anyhow::Result<(JobState, bool)> {
    let job = submit(client, &gang_yaml(&format!("bench-quick-{nodes}"), nodes, true)).await?;
    let done = wait_job(client, &job.id, Duration::from_millis(20), Duration::from_secs(60), |j| {
        is_terminal(j) && j.live_processes == 0
    })
    .await?;
    Ok((state(&done), done.running_unix_ms > 0))
}

// ---------------------------------------------------------------- teardown

pub struct Teardown {
    pub nodes: usize,
    /// One rank's exit (sent by its agent) to the last other agent receiving its StopCommand, ms.
    pub to_all_stops: Vec<f64>,
    /// The same exit to GetJob showing live_processes 0 (polled every 20 ms), ms.
    pub to_live_zero: Vec<f64>,
    pub note: Option<String>,
}

impl Teardown {
    pub fn json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "failure_to_all_stop_commands_ms": Stats::of(&self.to_all_stops).json(),
            "failure_to_live_processes_0_ms": Stats::of(&self.to_live_zero).json(),
            "note": self.note,
            "samples_to_all_stops_ms": self.to_all_stops,
        })
    }
}

pub async fn teardown(client: &mut Client, fleet: &Fleet, nodes: usize, repeats: usize) -> Teardown {
    let mut out = Teardown { nodes, to_all_stops: Vec::new(), to_live_zero: Vec::new(), note: None };
    for run in 0..repeats {
        eprint!("\r  teardown of {nodes}: job {}/{repeats}   ", run + 1);
        let result = async {
            let job = submit(client, &gang_yaml(&format!("bench-fail-{nodes}"), nodes, false)).await?;
            let running = wait_job(client, &job.id, Duration::from_millis(20), Duration::from_secs(120), |j| {
                state(j) == JobState::Running || is_terminal(j)
            })
            .await?;
            ensure!(
                state(&running) == JobState::Running,
                "job {} ended before running: {}",
                job.id,
                clip(&running.reason, 100)
            );
            let plan = running.plan.as_ref().context("a running job without a plan")?;
            let victim = plan.nodes.get(1).context("a gang of one node")?;
            let ix = node_index(&victim.node_name).context("not a simulated node")?;
            let failed_at = fleet.exit_process(ix, &job.id, 1).await?;
            let done = wait_job(client, &job.id, Duration::from_millis(20), Duration::from_secs(60), |j| {
                is_terminal(j) && j.live_processes == 0
            })
            .await?;
            let live_zero = ms(failed_at.elapsed());
            ensure!(state(&done) == JobState::Failed, "job {} should have failed: {:?}", job.id, state(&done));
            let others = plan.nodes.len() - 1;
            let deadline = Instant::now() + Duration::from_secs(30);
            let stops = loop {
                let stops = fleet.stops_of(&job.id);
                if stops.len() >= others || Instant::now() > deadline {
                    break stops;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            ensure!(stops.len() >= others, "only {} of {others} agents got a StopCommand", stops.len());
            let last = stops.iter().max().map(|t| ms(t.saturating_duration_since(failed_at))).unwrap_or(0.0);
            anyhow::Ok((last, live_zero))
        }
        .await;
        match result {
            Ok((stops, live_zero)) => {
                out.to_all_stops.push(stops);
                out.to_live_zero.push(live_zero);
            }
            Err(e) => {
                out.note = Some(format!("run {} failed: {e:#}", run + 1));
                break;
            }
        }
    }
    eprintln!();
    out
}

// -------------------------------------------------------------- etcd store

/// Starts `count` gangs of `nodes`, waits until all run; returns their ids.
pub async fn start_jobs(client: &mut Client, count: usize, nodes: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(submit(client, &gang_yaml(&format!("bench-busy-{i}"), nodes, false)).await?.id);
    }
    for id in &ids {
        let job = wait_job(client, id, Duration::from_millis(100), Duration::from_secs(120), |j| {
            state(j) == JobState::Running || is_terminal(j)
        })
        .await?;
        ensure!(state(&job) == JobState::Running, "job {id} ended {:?}: {}", state(&job), clip(&job.reason, 100));
    }
    Ok(ids)
}

pub async fn stop_jobs(client: &mut Client, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        cancel_and_clear(client, id, Duration::from_secs(120)).await?;
    }
    Ok(())
}

pub struct Takeover {
    pub agents: usize,
    pub to_leader_s: Option<f64>,
    pub all_registered_s: Option<f64>,
    pub all_acked_s: Option<f64>,
    pub registered: usize,
    pub acked: usize,
}

impl Takeover {
    pub fn json(&self) -> Value {
        json!({
            "agents": self.agents,
            "kill_to_standby_leads_s": self.to_leader_s,
            "kill_to_all_re_registered_s": self.all_registered_s,
            "kill_to_all_acked_s": self.all_acked_s,
            "re_registered": self.registered,
            "acked": self.acked,
        })
    }
}

/// SIGKILLs the leader; times the standby (controller index 1) leading and
/// every agent registered with it and acked by it.
pub async fn takeover(fleet: &Fleet, leader: &mut ControllerProc, standby: &mut Client, within: Duration) -> Takeover {
    let t0 = Instant::now();
    leader.kill();
    let deadline = t0 + within;
    let mut to_leader = None;
    loop {
        if to_leader.is_none()
            && let Ok(info) = standby.get_leader(GetLeaderRequest {}).await
            && info.get_ref().is_leader
        {
            to_leader = Some(t0.elapsed().as_secs_f64());
        }
        let (registered, last_registered) = fleet.registered_since(t0, Some(1));
        let (acked, last_acked) = fleet.acked_since(t0, Some(1));
        let all = fleet.len();
        if (to_leader.is_some() && registered == all && acked == all) || Instant::now() > deadline {
            let at = |t: Option<Instant>, n: usize| {
                t.filter(|_| n == all).map(|t| t.saturating_duration_since(t0).as_secs_f64())
            };
            return Takeover {
                agents: all,
                to_leader_s: to_leader,
                all_registered_s: at(last_registered, registered),
                all_acked_s: at(last_acked, acked),
                registered,
                acked,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
