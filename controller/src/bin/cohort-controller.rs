//! `cohort-controller`: the Cohort control-plane daemon.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cohort_controller::{ControllerConfig, ServeConfig, StoreConfig, limits, serve};

/// Plans and supervises multi-node training jobs; agents and the `cohort` CLI
/// talk to it over gRPC.
#[derive(clap::Parser, Debug)]
#[command(version)]
struct Args {
    /// Address for the gRPC API (agents and CLI).
    #[arg(long, env = "COHORT_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory of the embedded store and job logs.
    #[arg(long, env = "COHORT_DATA_DIR", default_value = "/var/lib/cohort")]
    data_dir: PathBuf,
    /// A node silent for this long is lost (e.g. 2500ms, 10s), counted in
    /// time this controller observed itself running: a paused or starved
    /// controller's own delay does not count (docs: failures.md).
    #[arg(long, env = "COHORT_NODE_TTL", default_value = "2500ms", value_parser = humantime::parse_duration)]
    node_ttl: Duration,
    /// How often agents send heartbeats.
    #[arg(long, env = "COHORT_HEARTBEAT_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Where the state lives: `embedded` (a file in --data-dir; one controller)
    /// or etcd://host:port[,host:port...] (several controllers, one leader).
    #[arg(long, env = "COHORT_STORE", default_value = "embedded")]
    store: String,
    /// Key prefix in etcd.
    #[arg(long, env = "COHORT_ETCD_PREFIX", default_value = "/cohort/")]
    etcd_prefix: String,
    /// This controller's name in the leader election (default: host name and port).
    #[arg(long, env = "COHORT_CONTROLLER_ID")]
    id: Option<String>,
    /// The URL agents and the other controllers use for this one (default: http://<listen>).
    #[arg(long, env = "COHORT_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// The leader's lease TTL: a leader that cannot renew it for this long is replaced.
    #[arg(long, env = "COHORT_LEADER_TTL", default_value = "3s", value_parser = humantime::parse_duration)]
    leader_ttl: Duration,
    /// MASTER_PORT range, FIRST-LAST; keep it outside the kernel's ephemeral range
    /// (/proc/sys/net/ipv4/ip_local_port_range, usually 32768-60999).
    #[arg(long, env = "COHORT_MASTER_PORTS", default_value = "29500-29999", value_parser = parse_port_range)]
    master_ports: (u16, u16),
    /// Serve /healthz, Prometheus /metrics and the web page on this address (e.g. 0.0.0.0:7080).
    #[arg(long, env = "COHORT_HTTP", value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Export tracing spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317).
    #[arg(long, env = "COHORT_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The CA, this controller's certificate and the token key (`cohort-controller init`);
    /// default <data-dir>/tls.
    #[arg(long, env = "COHORT_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Serve plaintext gRPC and HTTP and check no certificate or token: only on a trusted network.
    #[arg(long, env = "COHORT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure: bool,
    /// Validity of the certificates issued to joining nodes.
    #[arg(long, env = "COHORT_NODE_CERT_TTL", default_value = "365d", value_parser = humantime::parse_duration)]
    node_cert_ttl: Duration,
    /// The largest job file `cohort submit` and `cohort plan` may send (e.g. 1MiB).
    #[arg(long, env = "COHORT_MAX_JOB_FILE_SIZE", default_value = "1MiB", value_parser = limits::parse_size)]
    max_job_file_size: usize,
    /// The largest job-API request message; bigger ones are refused with OUT_OF_RANGE.
    #[arg(long, env = "COHORT_MAX_REQUEST_SIZE", default_value = "4MiB", value_parser = limits::parse_size)]
    max_request_size: usize,
    /// The largest message an agent may send (heartbeats, log batches, reports).
    #[arg(long, env = "COHORT_MAX_AGENT_MESSAGE_SIZE", default_value = "16MiB", value_parser = limits::parse_size)]
    max_agent_message_size: usize,
    /// The largest `sync:` archive (a job's local directory, packed and
    /// compressed) a client may upload (e.g. 256MiB); kept in <data-dir>/sync.
    #[arg(long, env = "COHORT_MAX_SYNC_BYTES", default_value = "256MiB", value_parser = limits::parse_size)]
    max_sync_bytes: usize,
    /// How long checking one job file from `cohort submit`/`plan` may take
    /// (waiting for a free checker included) before it is refused.
    #[arg(long, env = "COHORT_JOB_FILE_CHECK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    job_file_check_timeout: Duration,
    /// Job-API calls per second each client address may make on average (0: no limit);
    /// more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "COHORT_API_RATE_LIMIT", default_value_t = 50)]
    api_rate_limit: u32,
    /// Calls a client may make in a burst above --api-rate-limit.
    #[arg(long, env = "COHORT_API_RATE_BURST", default_value_t = 200)]
    api_rate_burst: u32,
    /// The highest `priority` a submit-role token may give a job (admin tokens: any);
    /// a job above it is refused at submit.
    #[arg(long, env = "COHORT_MAX_SUBMIT_PRIORITY", default_value_t = 100, allow_negative_numbers = true)]
    max_submit_priority: i32,
    /// The most nodes one job may ask for (0: only the registered nodes bound it);
    /// a job asking for more is refused at submit.
    #[arg(long, env = "COHORT_MAX_JOB_NODES", default_value_t = 0)]
    max_job_nodes: u32,
    /// More users a token's jobs may run as with `user:`, as
    /// `identity=user[,user...]` (`*` for every identity or any user); several
    /// rules are separated by `;` or given as repeated flags. Without a rule a
    /// token of user alice may run jobs only as the node's rank-user (no
    /// `user:`) or as `alice`; admin tokens are not bound.
    #[arg(long, env = "COHORT_ALLOW_RUN_AS", value_delimiter = ';')]
    allow_run_as: Vec<String>,
    /// Who a submit token's job without `user:` runs as: `submitter`, its
    /// submitter's own Unix account on each node (an existing user where the
    /// agent maps them, else one the agent makes, `cohort-<name>`); or
    /// `rank-user`, the node's one rank-user shared by every submitter, whose
    /// jobs can then read each other's environment (secrets) and kill each
    /// other's processes. Admin tokens and `--insecure` use the rank-user.
    #[arg(long, env = "COHORT_DEFAULT_JOB_USER", value_enum, default_value = "submitter")]
    default_job_user: cohort_controller::security::run_as::DefaultJobUser,
    /// The queues jobs wait in: a TOML file of `[[queue]]` tables (name, gpus
    /// quota, gpus_by_label, max_run_time, users, borrow), the `default` queue
    /// and `fair_share_half_life`. Without it there is one queue, `default`,
    /// open to everyone, with no quota.
    #[arg(long, env = "COHORT_QUEUES", value_name = "FILE")]
    queues: Option<PathBuf>,
    /// How pending jobs are ordered and placed: `backfill` (queues, quotas,
    /// fair share, EASY backfill) or `fifo` (one line by priority then
    /// submission, no quotas, no backfill: the order before queues, a baseline).
    #[arg(long, env = "COHORT_SCHEDULER", value_enum, default_value = "backfill")]
    scheduler: cohort_controller::queues::Scheduler,
    /// Delete finished jobs (record, output, metrics) this long after they
    /// ended, e.g. `30d`; unset: they are kept until `cohort delete`.
    #[arg(long, env = "COHORT_RETAIN_FINISHED", value_name = "AGE", value_parser = humantime::parse_duration)]
    retain_finished: Option<std::time::Duration>,
    /// How many nodes read a staged input's source at once while no node
    /// holds it: the other nodes fetch it from them, and later jobs from the
    /// nodes that hold it (peer-to-peer staging; an input without `sha256:`
    /// is fetched from them once they have read all of it).
    #[arg(long, env = "COHORT_MAX_SOURCE_PULLS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    max_source_pulls: u16,
    /// The agents' label (`--labels rack=r12`) that names a node's rack:
    /// staged content then enters each rack once, through one of its nodes,
    /// and spreads inside it from there (for racks whose links to the core
    /// are oversubscribed). Unset: any node fetches from any other.
    #[arg(long, env = "COHORT_TOPOLOGY_LABEL", value_name = "LABEL")]
    topology_label: Option<String>,
    #[command(subcommand)]
    setup: Option<cohort_controller::security::init::Setup>,
}

/// Every long flag can also be set in this file (flag > env > file > default).
const CONFIG: cohort_runtime::config_file::ConfigLocation = cohort_runtime::config_file::ConfigLocation {
    default_path: "/etc/cohort/controller.toml",
    env: "COHORT_CONTROLLER_CONFIG",
};

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text.split_once('-').ok_or_else(|| format!("{text:?}: expected FIRST-LAST, e.g. 29500-29999"))?;
    let lo: u16 = lo.trim().parse().map_err(|_| format!("{lo:?} is not a port number"))?;
    let hi: u16 = hi.trim().parse().map_err(|_| format!("{hi:?} is not a port number"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{text:?}: FIRST must be between 1 and LAST"));
    }
    Ok((lo, hi))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cohort_runtime::exit_code(controller().await)
}

async fn controller() -> anyhow::Result<()> {
    let args: Args = cohort_runtime::config_file::parse(CONFIG)?;
    if let Some(setup) = args.setup {
        return cohort_controller::security::init::run(setup);
    }
    let telemetry =
        cohort_runtime::telemetry::init_with_otlp("info", "cohort-controller", args.otlp_endpoint.as_deref())
            .context("--otlp-endpoint")?;
    if args.heartbeat_interval >= args.node_ttl {
        anyhow::bail!(
            "--heartbeat-interval {:?} must be shorter than --node-ttl {:?}",
            args.heartbeat_interval,
            args.node_ttl
        );
    }
    let security = if args.insecure {
        None
    } else {
        let dir = args.tls_dir.clone().unwrap_or_else(|| args.data_dir.join("tls"));
        let state = cohort_controller::security::TlsState::load(&dir, args.node_cert_ttl)?;
        tracing::info!(tls_dir = %dir.display(), "TLS: agents need node certificates, clients tokens");
        Some(std::sync::Arc::new(state))
    };
    let shutdown = cohort_runtime::shutdown::on_signal();
    let _watchdog = cohort_runtime::service::spawn_watchdog();
    let store = if args.store == "embedded" {
        StoreConfig::Embedded
    } else {
        let endpoints = cohort_controller::store::parse_endpoints(&args.store)
            .with_context(|| format!("--store {:?}: use `embedded` or etcd://host:port[,host:port...]", args.store))?;
        StoreConfig::Etcd { endpoints, prefix: args.etcd_prefix.clone() }
    };
    let config = ServeConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        store,
        id: args.id,
        advertise_url: args.advertise_url,
        leader_ttl: args.leader_ttl,
        http: args.http,
        security,
        controller: ControllerConfig {
            node_ttl: args.node_ttl,
            heartbeat_interval: args.heartbeat_interval,
            master_ports: args.master_ports.0..=args.master_ports.1,
            limits: limits::ApiLimits {
                max_job_file_bytes: args.max_job_file_size,
                max_request_bytes: args.max_request_size,
                max_agent_message_bytes: args.max_agent_message_size,
                rate_per_second: args.api_rate_limit,
                rate_burst: args.api_rate_burst,
                job_file_check_timeout: args.job_file_check_timeout,
                max_sync_bytes: args.max_sync_bytes as u64,
            },
            run_as: cohort_controller::security::run_as::RunAsRules::parse(&args.allow_run_as)
                .map_err(anyhow::Error::msg)?
                .with_default_job_user(args.default_job_user),
            admission: cohort_controller::controller::admission::AdmissionLimits {
                max_submit_priority: args.max_submit_priority,
                max_job_nodes: args.max_job_nodes,
            },
            queues: match &args.queues {
                Some(path) => cohort_controller::queues::Queues::load(path)?,
                None => cohort_controller::queues::Queues::default(),
            },
            scheduler: args.scheduler,
            retain_finished: args.retain_finished,
            max_source_pulls: usize::from(args.max_source_pulls),
            topology_label: args.topology_label.unwrap_or_default().trim().to_owned(),
            ..ControllerConfig::default()
        },
    };
    let served = serve(config, shutdown).await.context("controller failed");
    tracing::info!("controller stopped");
    // Export the spans still queued (blocks: off the runtime's workers).
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
        eprintln!("{e}");
    }
    served?;
    Ok(())
}
