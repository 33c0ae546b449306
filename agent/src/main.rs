//! `cohort-agent`: the Cohort node agent (one per node, run by systemd).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cohort_agent::cgroup::JobLimits;
use cohort_agent::rank_user::RankUserPolicy;
use cohort_agent::submitter_account::SubmitterAccounts;
use cohort_agent::supervisor::{self, OutputBudget};
use cohort_agent::{AgentConfig, AgentDeps, gpu, serve};
use cohort_proto::EnvVar;

/// Registers this node with the controller, reports its GPUs, and starts,
/// supervises and stops the processes of the jobs placed on it.
#[derive(clap::Parser, Debug)]
#[command(version)]
struct Args {
    /// The controllers' gRPC addresses, comma-separated, e.g.
    /// 10.0.0.1:7070,10.0.0.2:7070 (https:// unless --insecure); the agent finds the leader.
    #[arg(long, env = "COHORT_CONTROLLER", default_value = "127.0.0.1:7070", value_delimiter = ',')]
    controller: Vec<String>,
    /// Stop every rank after this long without reaching any controller
    /// (fencing: the controller may already run the job elsewhere).
    #[arg(long, env = "COHORT_FENCE_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    fence_after: Duration,
    /// This node's name (default: the host name).
    #[arg(long, env = "COHORT_NODE_NAME")]
    node_name: Option<String>,
    /// The address other nodes reach this one at; becomes MASTER_ADDR when
    /// this node holds node rank 0.
    #[arg(long, env = "COHORT_ADVERTISE_ADDR")]
    advertise_addr: IpAddr,
    /// Where launches keep their output files and scratch directories.
    #[arg(long, env = "COHORT_WORK_DIR", default_value = "/var/lib/cohort-agent")]
    work_dir: PathBuf,
    /// Node labels for `node_selector`, as k=v,k=v.
    #[arg(long, env = "COHORT_LABELS", value_parser = parse_labels, default_value = "")]
    labels: Labels,
    /// Offer N fake GPU slots instead of reading NVML (development machines without GPUs).
    #[arg(long, env = "COHORT_FAKE_GPUS")]
    fake_gpus: Option<u32>,
    /// Fake GPUs in NVLink islands of these sizes, e.g. 4,4 (8 GPUs, 0-3 and 4-7),
    /// for planner tests; implies --fake-gpus.
    #[arg(long, env = "COHORT_FAKE_GPU_ISLANDS", value_delimiter = ',')]
    fake_gpu_islands: Option<Vec<u32>>,
    /// Test hook for alerting: follow FILE and turn lines such as `xid 1 79`,
    /// `ecc-dbe 0`, `ecc-sbe 0` or `throttle 2 HW_SLOWDOWN` into the events and
    /// readings NVML would give (fake GPUs only; see agent/HEALTH.md).
    #[arg(long, env = "COHORT_FAKE_GPU_EVENTS")]
    fake_gpu_events: Option<PathBuf>,
    /// Where GPUs are read: `auto` runs NVML in a child process of the agent
    /// (`cohort-agent gpu-reader`: NVML's memory, its calls that block and its
    /// faults stay out of the agent; it is restarted if it hangs or dies) and
    /// the fake in the agent; `process` and `inline` put either backend in the
    /// child or in the agent.
    #[arg(long, env = "COHORT_GPU_READER", value_enum, default_value_t = gpu::ReaderMode::Auto)]
    gpu_reader: gpu::ReaderMode,
    /// How often GPU telemetry is read; heartbeats carry the latest reading.
    #[arg(long, env = "COHORT_TELEMETRY_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    telemetry_interval: Duration,
    /// Offer only these GPU indices, e.g. 0,1 (several agents sharing one host).
    #[arg(long, env = "COHORT_GPU_INDICES", value_delimiter = ',')]
    gpu_indices: Option<Vec<u32>>,
    /// The shared ModelScope cache, given to every process as MODELSCOPE_CACHE.
    #[arg(long, env = "COHORT_MODELSCOPE_CACHE")]
    modelscope_cache: Option<String>,
    /// A Megatron-LM checkout, given as MEGATRON_LM_PATH (ms-swift 3.x clones one otherwise).
    #[arg(long, env = "COHORT_MEGATRON_LM_PATH")]
    megatron_lm_path: Option<String>,
    /// The interface NCCL and Gloo must use (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).
    #[arg(long, env = "COHORT_NET_IFNAME")]
    net_ifname: Option<String>,
    /// The interpreter preflight probes when a job names none.
    #[arg(long, env = "COHORT_PYTHON", default_value = "python3")]
    python: String,
    /// The local cache staged inputs are copied into (default: <work-dir>/cache).
    #[arg(long, env = "COHORT_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The most each user's staging cache on this node may hold (e.g. 500GiB):
    /// after a staging, least recently used content that no running or
    /// preparing job uses goes until it fits. 0: no limit.
    #[arg(long, env = "COHORT_CACHE_MAX", default_value = "500GiB", value_parser = parse_size)]
    cache_max: u64,
    /// How many files staging copies at once.
    #[arg(long, default_value_t = 4)]
    stage_parallel: usize,
    /// py-spy for the stack dumps of hung jobs (default: `py-spy` on PATH;
    /// without it, ranks that registered faulthandler for SIGUSR1 dump themselves).
    #[arg(long, env = "COHORT_PY_SPY")]
    py_spy: Option<PathBuf>,
    /// Threads that run the agent's tasks (0: one per CPU, tokio's default).
    /// A node agent waits on sockets, pipes and timers; two are plenty, and
    /// each more costs memory (its stack, and a malloc arena of its own).
    #[arg(long, env = "COHORT_AGENT_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Longest wait between reconnection attempts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// On SIGTERM, leave the ranks running (their shims keep them) for the
    /// next agent to adopt: for upgrades under a unit with KillMode=process.
    #[arg(long, env = "COHORT_KEEP_RANKS_ON_EXIT", value_parser = clap::builder::BoolishValueParser::new())]
    keep_ranks_on_exit: bool,
    /// The cluster CA certificate (ca.crt from `cohort-controller init`); kept in
    /// --tls-dir after joining.
    #[arg(long, env = "COHORT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// A join token (`cohort token create --role join`): needed once, while this
    /// node has no certificate.
    #[arg(long, env = "COHORT_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where the node's key and certificate live (default: <work-dir>/tls).
    #[arg(long, env = "COHORT_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The port other nodes fetch this node's staged content from (its peer
    /// service, on --advertise-addr; mutual TLS with node certificates, or
    /// plaintext with --insecure). 0: serve none (this node still fetches
    /// from others).
    #[arg(long, env = "COHORT_PEER_PORT", default_value_t = 7071)]
    peer_port: u16,
    /// Files larger than this many MiB travel between nodes in pieces of it,
    /// each checked on arrival and served on at once, so that a few large
    /// files (a model's shards) spread as fast as many small ones.
    #[arg(long, env = "COHORT_PEER_PIECE_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    peer_piece_mib: u64,
    /// A fetch from peers that gets nothing this long (no piece, no peer
    /// offering one, no peer telling it reads the source on) gives up, and
    /// the node reads the source itself.
    #[arg(long, env = "COHORT_PEER_STALL", default_value = "60s", value_parser = humantime::parse_duration)]
    peer_stall: Duration,
    /// Plaintext to a controller started with --insecure: no certificates, and
    /// anyone who can reach the controller can command this node.
    #[arg(long, env = "COHORT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure: bool,
    /// The user ranks run as when a job names none (a name or uid; default:
    /// the agent's own user, which must not be root unless --allow-root-ranks).
    #[arg(long, env = "COHORT_RANK_USER")]
    rank_user: Option<String>,
    /// Other users a job may choose with `user:`, comma-separated; `*` allows
    /// any user (root still needs --allow-root-ranks).
    #[arg(long, env = "COHORT_ALLOWED_RANK_USERS", value_delimiter = ',')]
    allowed_rank_users: Vec<String>,
    /// Let ranks run as root (uid 0). Off: a job or a configuration that would
    /// run them as root is refused.
    #[arg(long, env = "COHORT_ALLOW_ROOT_RANKS", value_parser = clap::builder::BoolishValueParser::new())]
    allow_root_ranks: bool,
    /// Where the cgroup hierarchy is mounted: each job's processes on this
    /// node run in a cgroup of their own there (v2 or v1, found out at start;
    /// none when not writable, with a warning). Empty: no per-job cgroups.
    #[arg(long, env = "COHORT_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Memory each job may use on this node (e.g. 200GiB): over it the
    /// kernel's OOM killer stops a process and the job fails saying so.
    #[arg(long, env = "COHORT_JOB_MEMORY_MAX", value_parser = parse_size)]
    job_memory_max: Option<u64>,
    /// Processes and threads each job may have on this node (a fork bomb stops there).
    #[arg(long, env = "COHORT_JOB_PIDS_MAX")]
    job_pids_max: Option<u64>,
    /// CPU time each job may use on this node, in cores (e.g. 12 or 1.5).
    #[arg(long, env = "COHORT_JOB_CPUS")]
    job_cpus: Option<f64>,
    /// Bytes of output per second each process may send to the controller on
    /// average (e.g. 1MiB; 0: no limit). More is dropped with a gap record in
    /// `cohort logs`; the node's output files keep everything.
    #[arg(long, env = "COHORT_OUTPUT_RATE", default_value = "1MiB", value_parser = parse_size)]
    output_rate: u64,
    /// Bytes of output a process may send at once above --output-rate.
    #[arg(long, env = "COHORT_OUTPUT_BURST", default_value = "8MiB", value_parser = parse_size)]
    output_burst: u64,
    /// Run a submitter's jobs as the existing Unix user of the same name (a
    /// site whose token user names are its LDAP/sssd login names). Users with
    /// a uid below 1000 are never used. Off: each submitter gets an account
    /// the agent makes, `cohort-<name>`.
    #[arg(long, env = "COHORT_MAP_SUBMITTERS_TO_USERS")]
    map_submitters_to_users: bool,
    /// uids of the accounts the agent makes for submitters (`first-last`);
    /// keep it clear of the site's own users (LDAP ranges included).
    #[arg(long, env = "COHORT_SUBMITTER_UIDS", default_value = "62000-62999", value_parser = parse_uid_range)]
    submitter_uids: std::ops::RangeInclusive<u32>,
    /// Name prefix of the accounts the agent makes for submitters.
    #[arg(long, env = "COHORT_SUBMITTER_ACCOUNT_PREFIX", default_value = "cohort-")]
    submitter_account_prefix: String,
}

/// `62000-62999`: a range of uids, both ends included, none of them root.
fn parse_uid_range(text: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (first, last) = text.split_once('-').ok_or_else(|| format!("{text:?}: write first-last, e.g. 62000-62999"))?;
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| format!("{text:?}: {s:?} is not a uid"));
    let (first, last) = (number(first)?, number(last)?);
    if first == 0 || first > last {
        return Err(format!("{text:?}: the first uid must be above 0 and at most the last"));
    }
    Ok(first..=last)
}

/// `1MiB`, `64GiB`, `4096`: a byte count.
fn parse_size(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize =
        text.trim().parse().map_err(|e| format!("{text:?}: {e}; e.g. 1MiB, 512KiB, 4000000"))?;
    Ok(size.as_u64())
}

/// Every long flag can also be set in this file (flag > env > file > default).
const CONFIG: cohort_runtime::config_file::ConfigLocation =
    cohort_runtime::config_file::ConfigLocation { default_path: "/etc/cohort/agent.toml", env: "COHORT_AGENT_CONFIG" };

#[derive(Debug, Clone, Default)]
struct Labels(HashMap<String, String>);

fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = HashMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} must be key=value"))?;
        if k.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(Labels(labels))
}

fn main() -> std::process::ExitCode {
    // `cohort-agent shim ...` runs one rank for the agent: no worker threads, no logging setup.
    if supervisor::shim::invoked() {
        std::process::exit(supervisor::shim::main());
    }
    // `cohort-agent exec-as ...`: the shim starting a rank as another user.
    if supervisor::shim::exec_as_invoked() {
        std::process::exit(supervisor::shim::exec_as_main());
    }
    // `cohort-agent preflight-as ...`: preflight running a job's interpreter as the job's user.
    if cohort_agent::preflight::run::invoked() {
        std::process::exit(cohort_agent::preflight::run::preflight_as_main());
    }
    // `cohort-agent gpu-reader ...`: the agent's GPUs read in a process of their own.
    if gpu::reader::invoked() {
        std::process::exit(gpu::reader::reader_main());
    }
    // `cohort-agent files-as ...`: a job's stage sources, datasets and shared paths, as the job's user.
    if cohort_agent::job_files::invoked() {
        std::process::exit(cohort_agent::job_files::files_as_main());
    }
    cohort_runtime::exit_code(agent())
}

fn agent() -> anyhow::Result<()> {
    cohort_runtime::telemetry::init("info");
    let args: Args = cohort_runtime::config_file::parse(CONFIG)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        runtime.worker_threads(args.worker_threads);
    }
    runtime.enable_all().build().context("starting the agent's runtime")?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.peer_stall.is_zero(),
        "--peer-stall 0s would give up every fetch from peers at once; give 1s or more"
    );
    let node_name = match args.node_name.clone() {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .context("reading the host name; pass --node-name")?
            .to_string_lossy()
            .into_owned(),
    };
    let fake = gpu::FakeGpuFlags {
        count: args.fake_gpus,
        islands: args.fake_gpu_islands.clone(),
        events_file: args.fake_gpu_events.clone(),
    };
    let deps = AgentDeps::this_binary(gpu::open_backend(fake, args.gpu_reader).map_err(anyhow::Error::msg)?);
    let mut node_env = Vec::new();
    let mut add = |name: &str, value: &Option<String>| {
        if let Some(value) = value {
            node_env.push(EnvVar { name: name.into(), value: value.clone() });
        }
    };
    add("MODELSCOPE_CACHE", &args.modelscope_cache);
    add("MEGATRON_LM_PATH", &args.megatron_lm_path);
    add("NCCL_SOCKET_IFNAME", &args.net_ifname);
    add("GLOO_SOCKET_IFNAME", &args.net_ifname);
    let submitter_homes = args.work_dir.join("homes");
    let config = AgentConfig {
        node_name,
        advertise_addr: args.advertise_addr,
        controller_urls: args.controller,
        insecure: args.insecure,
        work_dir: args.work_dir,
        labels: args.labels.0,
        node_env,
        telemetry_interval: args.telemetry_interval,
        gpu_indices: args.gpu_indices,
        python: args.python,
        cache_dir: args.cache_dir,
        cache_max: (args.cache_max > 0).then_some(args.cache_max),
        stage_parallel: args.stage_parallel,
        py_spy: args.py_spy,
        max_backoff: args.max_backoff,
        fence_after: args.fence_after,
        keep_ranks_on_exit: args.keep_ranks_on_exit,
        ca_cert: args.ca_cert,
        join_token: args.join_token,
        tls_dir: args.tls_dir,
        peer_port: (args.peer_port > 0).then_some(args.peer_port),
        peer_piece_bytes: args.peer_piece_mib << 20,
        peer_stall: args.peer_stall,
        rank_users: RankUserPolicy {
            default_user: args.rank_user.filter(|u| !u.trim().is_empty()),
            allowed: args.allowed_rank_users.iter().map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect(),
            allow_root: args.allow_root_ranks,
            submitters: SubmitterAccounts {
                prefix: args.submitter_account_prefix,
                uids: args.submitter_uids,
                map_existing: args.map_submitters_to_users,
                min_existing_uid: 1000,
                home_root: submitter_homes,
            },
        },
        cgroup_root: args.cgroup_root,
        job_limits: JobLimits {
            memory_max_bytes: args.job_memory_max,
            pids_max: args.job_pids_max,
            cpus: args.job_cpus,
        },
        output_budget: OutputBudget { per_second: args.output_rate, burst: args.output_burst },
    };
    serve(config, deps, cohort_runtime::shutdown::on_signal()).await
}
