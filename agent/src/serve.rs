//! A whole node agent as one function, like the controller's
//! `serve(config, shutdown)`: `cohort-agent` runs one with the signal
//! handler's shutdown, tests and benches run N of them in one process, each
//! with its own work dir, fake GPUs and shutdown handle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cohort_proto::{EnvVar, NodeInfo};
use tokio::sync::watch;

use crate::cgroup::{JobCgroups, JobLimits, agent_cgroup_name};
use crate::gpu::{self, GpuBackend};
use crate::peer::Peers;
use crate::prepare::Preparer;
use crate::rank_user::RankUserPolicy;
use crate::session;
use crate::stage::Stager;
use crate::supervisor::{self, OutputBudget, Supervisor};

/// Everything an agent is told (the `cohort-agent` flags, parsed).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// The address other nodes reach this one at (MASTER_ADDR on node rank 0).
    pub advertise_addr: IpAddr,
    /// Every controller's URL; `host:port` gets https:// (http:// when insecure).
    pub controller_urls: Vec<String>,
    /// Plaintext to a controller started with --insecure: no certificates.
    pub insecure: bool,
    pub work_dir: PathBuf,
    pub labels: HashMap<String, String>,
    /// Set in every process's environment (MODELSCOPE_CACHE, NCCL_SOCKET_IFNAME, ...).
    pub node_env: Vec<EnvVar>,
    /// How often GPU telemetry is read.
    pub telemetry_interval: Duration,
    /// Offer only these GPU indices (None: all).
    pub gpu_indices: Option<Vec<u32>>,
    /// The interpreter preflight probes when a job names none.
    pub python: String,
    /// The staging cache (default: <work_dir>/cache).
    pub cache_dir: Option<PathBuf>,
    /// The most each user's staging cache may hold before least recently
    /// used content goes (None: no limit).
    pub cache_max: Option<u64>,
    pub stage_parallel: usize,
    /// py-spy for stack dumps of hung jobs (None: look on PATH).
    pub py_spy: Option<PathBuf>,
    pub max_backoff: Duration,
    /// Stop every rank after this long without reaching a controller.
    pub fence_after: Duration,
    /// On shutdown, leave the ranks running for the next agent.
    pub keep_ranks_on_exit: bool,
    pub ca_cert: Option<PathBuf>,
    pub join_token: Option<String>,
    /// Where the node's key and certificate live (default: <work_dir>/tls).
    pub tls_dir: Option<PathBuf>,
    /// The peer service's port on `advertise_addr` (0: an ephemeral one);
    /// None: serve no staged content to other nodes.
    pub peer_port: Option<u16>,
    /// Files larger than this travel between nodes in pieces of this size.
    pub peer_piece_bytes: u64,
    /// A fetch from peers without progress this long reads the source instead.
    pub peer_stall: Duration,
    pub rank_users: RankUserPolicy,
    /// Where the cgroup hierarchy is mounted; empty: no per-job cgroups.
    pub cgroup_root: PathBuf,
    pub job_limits: JobLimits,
    pub output_budget: OutputBudget,
}

/// What an agent is given rather than told: its GPUs and the binary that
/// runs its shims and `*-as` helpers.
pub struct AgentDeps {
    /// NVML, or fake GPUs ([`gpu::open_backend`]).
    pub gpus: Arc<dyn GpuBackend>,
    /// A `cohort-agent` binary: `/proc/self/exe` in the daemon (it still runs
    /// after a package upgrade replaced the file); the built binary when the
    /// agent runs inside a test.
    pub agent_exe: PathBuf,
}

impl AgentDeps {
    /// The daemon's: this very binary runs the shims.
    pub fn this_binary(gpus: Arc<dyn GpuBackend>) -> Self {
        AgentDeps { gpus, agent_exe: PathBuf::from("/proc/self/exe") }
    }
}

/// Starts the peer service (staged content for other nodes) on `addr:port`;
/// returns the port it listens on, 0 when it could not start (the node then
/// only fetches from others; said in the log).
async fn serve_peers(
    peers: &Arc<Peers>,
    tls: Option<&cohort_runtime::tls::ClientTls>,
    addr: IpAddr,
    port: u16,
    mut shutdown: watch::Receiver<bool>,
) -> u16 {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let Some(config) = tls.peer_server().filter(|_| tls.serves_peers()) else {
            tracing::warn!(
                "this node's certificate predates peer-to-peer staging (client-only): it serves no staged content to \
                 other nodes; remove its --tls-dir certificate and join again to serve"
            );
            return 0;
        };
        server = match server.tls_config(config) {
            Ok(server) => server,
            Err(e) => {
                tracing::warn!(error = %e, "peer service off: its TLS settings were refused");
                return 0;
            }
        };
    }
    let listener = match tokio::net::TcpListener::bind((addr, port)).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(%addr, port, error = %e, "peer service off: cannot listen; this node serves no staged content to others (--peer-port)");
            return 0;
        }
    };
    let bound = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let service = peers.server();
    tokio::spawn(async move {
        let stop = async move { cohort_runtime::shutdown::requested(&mut shutdown).await };
        if let Err(e) = server.add_service(service).serve_with_incoming_shutdown(incoming, stop).await {
            tracing::warn!(error = %e, "peer service stopped");
        }
    });
    tracing::info!(%addr, port = bound, "serving staged content to other nodes");
    bound
}

/// The node's per-job cgroups, or None with a log line that says why.
fn job_cgroups(config: &AgentConfig) -> Option<JobCgroups> {
    let limits = config.job_limits;
    if config.cgroup_root.as_os_str().is_empty() {
        tracing::info!("per-job cgroups off (cgroup-root is empty)");
        return None;
    }
    match JobCgroups::set_up(&config.cgroup_root, &agent_cgroup_name(&config.node_name, &config.work_dir), limits) {
        Ok(cgroups) => {
            tracing::info!(?limits, "each job's processes run in a cgroup of their own: {}", cgroups.describe());
            Some(cgroups)
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "per-job cgroups off: jobs on this node share the agent's cgroup and no job-memory-max, \
                 job-pids-max or job-cpus applies; run the agent as root on a host with cgroup v2 or v1 mounted"
            );
            None
        }
    }
}

/// Runs a whole agent until `shutdown` turns true: reads the GPUs, recovers
/// what the last agent left running, joins (TLS) and holds the session to
/// the controller; then stops every rank (unless `keep_ranks_on_exit`) and
/// returns.
pub async fn serve(config: AgentConfig, deps: AgentDeps, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let name = config.node_name.clone();
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating --work-dir {}", config.work_dir.display()))?;
    let cgroups = job_cgroups(&config);

    let (gpu_events_tx, mut gpu_events) = tokio::sync::mpsc::channel(1024);
    let gpu_config = gpu::MonitorConfig { interval: config.telemetry_interval, keep: config.gpu_indices.clone() };
    let gpu_monitor = gpu::GpuMonitor::start(deps.gpus, gpu_config, gpu_events_tx).await?;
    let gpus = gpu_monitor.gpus().to_vec();
    if gpus.is_empty() {
        tracing::warn!(note = %gpu_monitor.note(), "this node offers no GPUs");
    } else {
        tracing::info!(count = gpus.len(), note = %gpu_monitor.note(), "GPU inventory");
    }
    let node = NodeInfo {
        name: name.clone(),
        advertise_addr: config.advertise_addr.to_string(),
        labels: config.labels.clone(),
        gpus,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        gpu_note: gpu_monitor.note().to_string(),
        node_env: config.node_env.clone(),
        fence_after_ms: config.fence_after.as_millis() as u32,
        work_dir: std::path::absolute(&config.work_dir)
            .unwrap_or_else(|_| config.work_dir.clone())
            .display()
            .to_string(),
        // Set once the peer service listens (after joining: it serves with the node's certificate).
        peer_port: 0,
    };

    let (out_tx, out_rx) = tokio::sync::mpsc::channel(8192);
    // GPU events go up at once, on the session's outbound queue.
    let gpu_out = out_tx.clone();
    tokio::spawn(async move {
        while let Some(event) = gpu_events.recv().await {
            let msg = cohort_proto::AgentMessage { msg: Some(cohort_proto::agent_message::Msg::GpuEvent(event)) };
            if gpu_out.send(supervisor::Outbound::Message(msg)).await.is_err() {
                return;
            }
        }
    });
    let rank_users = config.rank_users.clone();
    // A node that could not run a job without `user:` says so now, not at the first launch.
    let identity = rank_users.check().map_err(|e| anyhow::anyhow!("rank-user: {e}"))?;
    tracing::info!(user = %identity.name, uid = identity.uid, allowed = ?rank_users.allowed, "ranks run as");
    let submitters = &rank_users.submitters;
    tracing::info!(
        prefix = %submitters.prefix,
        uids = ?submitters.uids,
        map_existing = submitters.map_existing,
        "a submitter's jobs without `user:` run as its own account"
    );
    // A line is up to 64 KiB: a smaller burst would drop every long line.
    let budget = config.output_budget;
    if budget.per_second > 0 && budget.burst < 128 * 1024 {
        anyhow::bail!("--output-burst {} is below 128KiB: lines of up to 64 KiB could never pass", budget.burst);
    }
    let supervisor =
        Supervisor::with_shim(name.clone(), config.work_dir.clone(), out_tx.clone(), deps.agent_exe.clone())
            .with_rank_users(rank_users.clone())
            .with_cgroups(cgroups.clone())
            .with_output_budget(budget);
    let py_spy = supervisor::stacks::find_py_spy(config.py_spy.clone());
    tracing::info!(py_spy = ?py_spy, "stack dumps of hung jobs: {}", if py_spy.is_some() { "py-spy" } else { "faulthandler (SIGUSR1) where the trainer registered it" });
    supervisor.set_py_spy(py_spy);
    // Before registering, so that the controller hears what survived the last agent.
    let recovery = supervisor.recover().await;
    tracing::info!(?recovery, "launch state recovered");
    let recovered = supervisor.launches_ended().await.into_iter().filter(|(_, ended)| !ended).map(|(k, _)| k).collect();
    let scheme = if config.insecure { "http" } else { "https" };
    let urls: Vec<String> = config
        .controller_urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(|u| if u.contains("://") { u.to_string() } else { format!("{scheme}://{u}") })
        .collect();
    if urls.is_empty() {
        anyhow::bail!("--controller names no URL");
    }
    let tls = if config.insecure {
        tracing::warn!(
            "--insecure: plaintext to the controller, no certificate; whoever reaches the controller can command this node"
        );
        None
    } else {
        if let Some(url) = urls.iter().find(|u| u.starts_with("http://")) {
            anyhow::bail!("--controller {url}: plaintext http:// needs --insecure; use https:// with --ca-cert");
        }
        let tls_dir = config.tls_dir.clone().unwrap_or_else(|| config.work_dir.join("tls"));
        let join = crate::join::JoinConfig {
            node: &name,
            tls_dir: &tls_dir,
            ca_cert: config.ca_cert.as_deref(),
            join_token: config.join_token.as_deref(),
            controller_urls: &urls,
            max_backoff: config.max_backoff,
        };
        // Shut down while joining: nothing of this agent runs yet, what it recovered stays.
        tokio::select! {
            tls = crate::join::node_tls(join) => Some(tls?),
            _ = cohort_runtime::shutdown::requested(&mut shutdown) => {
                tracing::info!("shut down while joining");
                return Ok(());
            }
        }
    };
    let cache_dir = config.cache_dir.clone().unwrap_or_else(|| config.work_dir.join("cache"));
    let peers = Peers::new(
        name.clone(),
        tls.clone(),
        deps.agent_exe.clone(),
        cache_dir.clone(),
        rank_users.clone(),
        config.peer_piece_bytes,
        config.peer_stall,
    );
    let mut node = node;
    node.peer_port = match config.peer_port {
        Some(port) => u32::from(serve_peers(&peers, tls.as_ref(), config.advertise_addr, port, shutdown.clone()).await),
        None => 0,
    };
    let cache_dir = config.cache_dir.clone().unwrap_or_else(|| config.work_dir.join("cache"));
    let preparer = Preparer {
        node_name: name.clone(),
        python: config.python.clone(),
        node_env: config.node_env.iter().map(|v| (v.name.clone(), v.value.clone())).collect(),
        stager: Arc::new(Stager::new(cache_dir.clone(), config.stage_parallel.max(1))),
        out: out_tx,
        report: tokio::sync::watch::channel(None).0,
        rank_users,
        cache_keeper: Arc::new(crate::cache_keeper::CacheKeeper::new(
            config.cache_max,
            cache_dir,
            deps.agent_exe.clone(),
            Some(supervisor.clone()),
            recovered,
        )),
        helper: deps.agent_exe,
        preparing: Default::default(),
        digests: Default::default(),
        work_dir: std::path::absolute(&config.work_dir).unwrap_or_else(|_| config.work_dir.clone()),
        controller: tokio::sync::watch::channel(None).0,
        peers: peers.clone(),
    };
    let session_config = session::SessionConfig {
        controller_urls: urls,
        node,
        max_backoff: config.max_backoff,
        fence_after: config.fence_after,
        gpus: gpu_monitor,
        tls,
    };
    // The shims watch this file too: a killed agent's ranks are fenced all the same.
    let lease = config.work_dir.join("controller.lease");
    supervisor.set_fence(lease.clone(), config.fence_after);
    let liveness = session::Liveness::with_lease_file(lease);
    tokio::spawn(session::fence(liveness.clone(), config.fence_after, supervisor.clone(), shutdown.clone()));
    let probe = preparer.clone();
    tokio::spawn(async move { probe.probe_at_startup().await });
    let session =
        tokio::spawn(session::run(session_config, supervisor.clone(), preparer, liveness, out_rx, shutdown.clone()));
    tracing::info!(node = %name, "agent started");
    cohort_runtime::service::notify_ready(&format!("node {name}: supervising"));
    let _watchdog = cohort_runtime::service::spawn_watchdog();

    cohort_runtime::shutdown::requested(&mut shutdown).await;
    // A stopped agent stops its ranks: `systemctl stop` means drain the node.
    // Only a crash or kill -9 (or keep_ranks_on_exit, for an upgrade) leaves them to the next agent.
    if config.keep_ranks_on_exit {
        tracing::info!("leaving every process running for the next agent (--keep-ranks-on-exit)");
    } else {
        tracing::info!("stopping every process this agent supervises");
        supervisor.stop_all().await;
        if let Some(cgroups) = &cgroups {
            cgroups.remove_agent_dirs();
        }
    }
    let _ = session.await;
    tracing::info!(node = %name, "agent stopped");
    Ok(())
}
