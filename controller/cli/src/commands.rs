//! The `cohort` command line: a gRPC client of the controller's JobService.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::connection::ApiChannel as Channel;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{
    CancelJobRequest, DeleteJobRequest, DoctorRequest, GetJobRequest, Job, JobFile, JobLogLine, JobState,
    ListJobsRequest, ListNodesRequest, LogStream, ProcessPhase, ResumeJobRequest, StreamLogsRequest, SubmitJobRequest,
    WatchJobRequest,
};
use cohort_proto::{ClearGpuRequest, NodeRequest};

use cohort_proto::names::state_name;
use cohort_shared::metrics::describe_exit;

use crate::nodes::{gpus, node_state, nodes};
use crate::output::{Format, Output, ago, print_json, status_error, table};
use crate::plan::plan;

/// Cohort: run multi-node training jobs (ms-swift `megatron sft`, torchrun,
/// any command) on a cluster of GPU nodes.
#[derive(Parser, Debug)]
#[command(name = "cohort", version)]
pub struct Cli {
    /// The controllers' gRPC addresses, comma-separated; any of them answers
    /// (https:// unless --insecure).
    #[arg(long, global = true, env = "COHORT_CONTROLLER", default_value = "127.0.0.1:7070")]
    pub controller: String,
    #[command(flatten)]
    pub connection: crate::connection::ClientArgs,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// List the nodes, their state and GPUs (`-o wide`: unhealthy GPUs, fence deadlines).
    Nodes {
        /// table, json, or wide.
        #[arg(long = "output", short = 'o', default_value = "table", value_parser = ["table", "json", "wide"])]
        output: String,
    },
    /// Every GPU of every node with its health, utilisation, memory and job.
    Gpus {
        #[command(flatten)]
        format: Format,
    },
    /// No new work on NODE; running jobs go on.
    Cordon { node: String },
    /// Cordon NODE and show it Draining until its jobs have ended.
    Drain {
        node: String,
        /// Wait until no job runs on the node.
        #[arg(long)]
        wait: bool,
    },
    /// Let NODE take new work again.
    Uncordon { node: String },
    /// Declare a GPU that the health policy marked unhealthy healthy again.
    ClearGpu {
        node: String,
        /// The GPU's index on that node.
        index: u32,
    },
    /// Validate a job file and show where and how it would run, without launching it.
    Plan {
        /// The job file (YAML).
        file: PathBuf,
        /// Also have one node per distinct environment parse the job's rendered
        /// ms-swift command line with its own ms-swift (exit 4 when one refuses).
        #[arg(long)]
        check: bool,
        #[command(flatten)]
        format: Format,
    },
    /// Check job files offline: YAML, fields, ms-swift flags (exit 2 when one is invalid).
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a command on the cluster without a job file, like `srun`:
    /// `cohort run -N 2 --gpus-per-node 8 --wait -- torchrun --nproc-per-node 8 train.py`.
    Run {
        #[command(flatten)]
        inline: crate::compose::Inline,
        #[command(flatten)]
        after: AfterSubmit,
    },
    /// Print a shell completion script: `cohort completion bash > /etc/bash_completion.d/cohort`.
    Completion { shell: clap_complete::Shell },
    /// Submit a job file.
    Submit {
        file: PathBuf,
        #[command(flatten)]
        overrides: crate::compose::Overrides,
        #[command(flatten)]
        after: AfterSubmit,
    },
    /// List jobs, oldest first.
    Jobs {
        /// Only jobs that are pending, running, or still stopping.
        #[arg(long)]
        active: bool,
        /// Only jobs in these states (comma-separated: pending,running,failed,...).
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Only jobs submitted by this user (the token's user).
        #[arg(long)]
        user: Option<String>,
        /// Only jobs of this name.
        #[arg(long)]
        name: Option<String>,
        /// Only jobs of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only the jobs of this job array (its id, as `submit --array` printed it).
        #[arg(long)]
        array: Option<String>,
        /// Only the newest N of what is left.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        format: Format,
    },
    /// Show a job: state, progress, cause of failure, attempts, preflight, every process.
    Status {
        /// Job id, or name (the newest job of that name).
        job: String,
        #[command(flatten)]
        format: Format,
    },
    /// Print a job's output.
    Logs {
        job: String,
        /// Only this node's output.
        #[arg(long)]
        node: Option<String>,
        /// Keep printing new output until the job has finished.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines of what is already there.
        #[arg(long)]
        tail: Option<u32>,
        /// Print the lines as the ranks wrote them: terminal escape sequences
        /// and control characters included (by default they are removed, so
        /// that a job cannot drive the reader's terminal).
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        format: Format,
    },
    /// Stop every process of a job on every node.
    Cancel {
        job: String,
        /// Wait until every process is gone.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        format: Format,
    },
    /// Remove finished jobs: their records, output and metrics (a job array's id: every element).
    Delete {
        #[arg(required = true)]
        jobs: Vec<String>,
        #[command(flatten)]
        format: Format,
    },
    /// A job's training metrics (iteration, loss, learning rate, ...), parsed from its last rank's output.
    Metrics {
        job: String,
        /// Keep printing new points until the job has finished.
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        format: Format,
    },
    /// Plot a job's loss and learning rate against iteration.
    Plot {
        job: String,
        /// The image to write: .png or .svg.
        #[arg(long = "out", required_unless_present = "legacy_path")]
        path: Option<PathBuf>,
        /// Deprecated spelling of --out (`-o` is the output format in every other verb).
        #[arg(short = 'o', long = "output", hide = true, conflicts_with = "path")]
        legacy_path: Option<PathBuf>,
    },
    /// Start a new attempt of a failed or cancelled megatron-sft job from its newest complete checkpoint.
    Resume {
        job: String,
        #[command(flatten)]
        format: Format,
    },
    /// The Python stack of every node (python, torch, CUDA, NCCL, transformer_engine, ...), mismatches marked.
    Doctor {
        #[command(flatten)]
        format: Format,
    },
    /// Check datasets without a cluster.
    #[command(subcommand)]
    Dataset(DatasetVerb),
    /// Write a pipeline's before/after report (report.md and report.html) and print the Markdown.
    Report {
        job: String,
        /// Where to write report.md and report.html.
        #[arg(long = "dir", short = 'd', default_value = ".")]
        dir: PathBuf,
    },
    /// The conversion cache: Megatron checkpoints converted by earlier pipelines.
    #[command(subcommand)]
    Cache(CacheVerb),
    /// Every queue: weight, quota, GPUs used, borrowed and lent, running and waiting jobs, fair share.
    Queues {
        #[command(flatten)]
        format: Format,
    },
    /// Change the queues (admin): `cohort queue set team-a --gpus 32 --weight 2`, `cohort queue delete team-a`.
    #[command(subcommand)]
    Queue(crate::queues::QueueVerb),
    /// GPU-hours per user and queue (GPUs × wall time of every attempt), like Slurm's sreport.
    Usage {
        /// From when: a duration back from now (`7d`), a date (`2026-12-01`) or a time, UTC; default: everything.
        #[arg(long)]
        since: Option<String>,
        /// One row per user, per queue, or per user and queue.
        #[arg(long, value_enum, default_value_t = crate::queues::UsageBy::Both)]
        by: crate::queues::UsageBy,
        /// Output format.
        #[arg(long = "output", short = 'o', value_enum, default_value_t = crate::queues::UsageOutput::Table)]
        output: crate::queues::UsageOutput,
    },
    /// Make tokens: join tokens for new nodes, API tokens for people (admin only).
    #[command(subcommand)]
    Token(crate::token::TokenVerb),
    /// A local TLS cluster that stays up: `cohort dev up`, `cohort dev status`, `cohort dev down`.
    #[command(subcommand)]
    Dev(crate::dev::DevVerb),
}

/// What `submit` and `run` do once the job is queued.
#[derive(clap::Args, Debug)]
pub struct AfterSubmit {
    /// Wait until the job has finished; exit 0 only if it succeeded.
    #[arg(long)]
    wait: bool,
    /// Print the job's output while it runs (implies --wait).
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    format: Format,
}

#[derive(Subcommand, Debug)]
pub enum CacheVerb {
    /// List the converted checkpoints: key, model, layout, ms-swift version, path, hits.
    Ls {
        #[command(flatten)]
        format: Format,
    },
    /// Forget an entry and delete its directory (a unique prefix of the key is enough).
    Rm { key: String },
    /// The nodes' staging caches: what each holds, for which user, how large, last used, pinned by which job.
    Staged {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        format: Format,
    },
    /// Remove content from a node's staging caches (admin); content a job uses is refused.
    Evict {
        /// The node.
        node: String,
        /// Digests as `cohort cache staged` shows them (a unique prefix of at least 8 digits is enough).
        #[arg(required = true)]
        digests: Vec<String>,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatasetVerb {
    /// Validate JSONL datasets row by row (messages, ShareGPT, query/response, alpaca) and show statistics.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// `fail` exits 1 on any bad row; `warn` only when no row is valid.
        #[arg(long, value_enum, default_value_t = PolicyArg::Fail)]
        policy: PolicyArg,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    Fail,
    Warn,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Local verbs first: they need no controller.
    if let Verb::Dataset(DatasetVerb::Check { files, policy }) = &cli.command {
        return dataset_check(files, *policy);
    }
    if let Verb::Validate { files } = &cli.command {
        let files = files.iter().map(|f| read_job_file(f)).collect::<anyhow::Result<Vec<_>>>()?;
        return Ok(crate::compose::validate(&files));
    }
    if let Verb::Completion { shell } = &cli.command {
        use clap::CommandFactory as _;
        use std::io::Write as _;
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "cohort", &mut script);
        return match std::io::stdout().write_all(&script) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(e).context("writing the completion script to stdout")
            }
            _ => Ok(ExitCode::SUCCESS),
        };
    }
    // Flag values the controller is not needed for fail before any connection.
    let filter = match &cli.command {
        Verb::Jobs { state, user, name, queue, limit, array, .. } => JobFilter {
            array: array.clone(),
            ..JobFilter::new(state, user.clone(), name.clone(), *limit)?.in_queue(queue.clone())
        },
        _ => JobFilter::default(),
    };
    let since = match &cli.command {
        Verb::Usage { since: Some(since), .. } => crate::queues::parse_since(since, cohort_proto::now_unix_ms())?,
        _ => 0,
    };
    if let Verb::Plot { path, legacy_path, .. } = &cli.command
        && let Some(path) = path.as_ref().or(legacy_path.as_ref())
    {
        crate::plot::image_format(path)?;
    }
    // `plan`, `submit` and `run` make the file first, so a bad path or flag fails before any connection.
    let file = match &cli.command {
        Verb::Plan { file, .. } => Some(read_job_file(file)?),
        Verb::Submit { file, overrides, .. } => Some(overrides.apply(read_job_file(file)?)?),
        Verb::Run { inline, .. } => {
            let cwd = std::env::current_dir()
                .context("cohort run: the current directory is gone (deleted?): cd into one that exists")?;
            Some(inline.job_file(&cwd)?)
        }
        _ => None,
    };
    // `sync:` is packed before any connection too: a missing or oversized directory fails first.
    let packed = match (&cli.command, &file) {
        (Verb::Plan { .. } | Verb::Submit { .. } | Verb::Run { .. }, Some(file)) => match crate::sync::sync_of(file) {
            Some(spec) => {
                Some(crate::sync::pack(Path::new(&file.base_dir), &spec, cohort_shared::spec::sync::MAX_SYNC_BYTES)?)
            }
            None => None,
        },
        _ => None,
    };
    let mut file = file;
    if let Verb::Dev(verb) = &cli.command {
        return crate::dev::run(verb).await;
    }
    if let Verb::Token(verb) = &cli.command {
        return crate::token::run(&cli.connection, &cli.controller, verb).await;
    }
    let mut client = cli.connection.connect(&cli.controller).await?;
    match cli.command {
        Verb::Dev(_) => Ok(ExitCode::SUCCESS), // run above
        Verb::Nodes { output } => {
            let out = if output == "json" { Output::Json } else { Output::Table };
            nodes(&mut client, out, output == "wide").await
        }
        Verb::Gpus { format } => gpus(&mut client, format.output).await,
        Verb::Cordon { node } => {
            let node = client.cordon_node(NodeRequest { node }).await.map_err(status_error)?.into_inner();
            say!("{}: {}", node.info.clone().map(|i| i.name).unwrap_or_default(), node_state(&node));
            Ok(ExitCode::SUCCESS)
        }
        Verb::Uncordon { node } => {
            let node = client.uncordon_node(NodeRequest { node }).await.map_err(status_error)?.into_inner();
            say!("{}: {}", node.info.clone().map(|i| i.name).unwrap_or_default(), node_state(&node));
            Ok(ExitCode::SUCCESS)
        }
        Verb::Drain { node, wait } => {
            let mut drained =
                client.drain_node(NodeRequest { node: node.clone() }).await.map_err(status_error)?.into_inner();
            while wait && !drained.jobs.is_empty() {
                eprintln!("{node}: waiting for {}", drained.jobs.join(", "));
                tokio::time::sleep(Duration::from_secs(2)).await;
                let all = client.list_nodes(ListNodesRequest {}).await.map_err(status_error)?.into_inner().nodes;
                drained = all.into_iter().find(|n| n.info.as_ref().is_some_and(|i| i.name == node)).unwrap_or_default();
            }
            say!("{node}: {}", node_state(&drained));
            Ok(ExitCode::SUCCESS)
        }
        Verb::ClearGpu { node, index } => {
            client.clear_gpu(ClearGpuRequest { node: node.clone(), gpu_index: index }).await.map_err(status_error)?;
            say!("{node}: GPU {index} cleared");
            Ok(ExitCode::SUCCESS)
        }
        Verb::Plan { format, check, .. } => {
            if let Some(packed) = &packed {
                eprintln!(
                    "sync: {} ({}): each node unpacks it into <agent --work-dir>/jobs/<job id>/workdir, where the \
                     processes start",
                    packed.dir.display(),
                    packed.summary()
                );
            }
            plan(&mut client, file.unwrap_or_default(), check, format.output).await
        }
        Verb::Submit { after: AfterSubmit { wait, follow, format }, .. }
        | Verb::Run { after: AfterSubmit { wait, follow, format }, .. } => {
            let out = format.output;
            if let (Some(packed), Some(file)) = (&packed, file.as_mut()) {
                let archive = crate::sync::upload(&mut client, packed).await.map_err(status_error)?;
                eprintln!("sync: uploaded {} ({})", packed.dir.display(), packed.summary());
                file.sync = Some(archive);
            }
            let response = submit_retrying(&client, file).await.map_err(status_error)?.into_inner();
            let job = response.job.unwrap_or_default();
            for warning in &response.warnings {
                eprintln!("warning: {warning}");
            }
            if out == Output::Json && !(wait || follow) {
                print_json(&job)?;
                return Ok(ExitCode::SUCCESS);
            }
            if !job.array_id.is_empty() {
                return submitted_array(&mut client, (&cli.connection, &cli.controller), &job, wait || follow, out)
                    .await;
            }
            eprintln!("submitted job {}", job.id);
            if follow {
                // Logs exist once the job runs; until then say why it waits.
                let queued = wait_until(&mut client, (&cli.connection, &cli.controller), &job.id, started).await?;
                if never_fits(&queued) {
                    print_final(&queued, out)?;
                    return Ok(exit_for(&queued));
                }
                logs(&mut client, &job.id, None, true, None, false, Output::Table).await?;
            }
            if wait || follow {
                let job = wait_finished(&mut client, (&cli.connection, &cli.controller), &job.id).await?;
                print_final(&job, out)?;
                return Ok(exit_for(&job));
            }
            say!("{}", job.id);
            Ok(ExitCode::SUCCESS)
        }
        Verb::Jobs { active, format, .. } => {
            let mut jobs =
                client.list_jobs(ListJobsRequest { active_only: active }).await.map_err(status_error)?.into_inner();
            jobs.jobs = filter.apply(jobs.jobs);
            if format.output == Output::Json {
                print_json(&jobs)?;
            } else {
                print_jobs(&jobs.jobs);
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Status { job, format } => {
            let job = client.get_job(GetJobRequest { job }).await.map_err(status_error)?.into_inner();
            if format.output == Output::Json {
                print_json(&job)?;
            } else {
                print_status(&job);
                crate::checkpoints::print_advice(&mut client, &job).await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Logs { job, node, follow, tail, raw, format } => {
            logs(&mut client, &job, node, follow, tail, raw, format.output).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Cancel { job: named, wait, format } => {
            let mut job =
                client.cancel_job(CancelJobRequest { job: named.clone() }).await.map_err(status_error)?.into_inner();
            if !job.array_id.is_empty() && job.array_id == named {
                let connection = (&cli.connection, cli.controller.as_str());
                return array_finished(&mut client, connection, &named, wait, format.output).await;
            }
            if wait {
                job = wait_finished(&mut client, (&cli.connection, &cli.controller), &job.id).await?;
            }
            print_final(&job, format.output)?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Delete { jobs, format } => {
            let deleted = client.delete_job(DeleteJobRequest { jobs }).await.map_err(status_error)?.into_inner();
            if format.output == Output::Json {
                print_json(&deleted)?;
            } else {
                for id in &deleted.deleted {
                    say!("deleted job {id}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Verb::Metrics { job, follow, format } => {
            crate::metrics::metrics(&mut client, &job, follow, format.output).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Plot { job, path, legacy_path } => {
            if legacy_path.is_some() {
                eprintln!(
                    "warning: `cohort plot -o PATH` is deprecated: use `--out PATH` (-o is the output format elsewhere)"
                );
            }
            let path = path.or(legacy_path).unwrap_or_default();
            crate::metrics::plot(&mut client, &job, &path).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Resume { job, format } => {
            let job = client.resume_job(ResumeJobRequest { job }).await.map_err(status_error)?.into_inner();
            print_final(&job, format.output)?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Doctor { format } => {
            let table =
                client.doctor(DoctorRequest {}).await.map_err(status_error)?.into_inner().table.unwrap_or_default();
            if format.output == Output::Json {
                print_json(&table)?;
            } else {
                crate::metrics::print_preflight(&table);
            }
            Ok(if table.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Verb::Dataset(_) | Verb::Token(_) | Verb::Validate { .. } | Verb::Completion { .. } => Ok(ExitCode::SUCCESS),
        Verb::Report { job, dir } => {
            crate::pipeline::report(&mut client, &job, &dir).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Cache(CacheVerb::Ls { format }) => {
            crate::pipeline::cache_ls(&mut client, format.output).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Cache(CacheVerb::Rm { key }) => {
            crate::pipeline::cache_rm(&mut client, &key).await?;
            Ok(ExitCode::SUCCESS)
        }
        Verb::Cache(CacheVerb::Staged { node, format }) => {
            crate::node_caches::staged(&mut client, node.as_deref().unwrap_or_default(), format.output).await
        }
        Verb::Cache(CacheVerb::Evict { node, digests, format }) => {
            crate::node_caches::evict(&mut client, &node, &digests, format.output).await
        }
        Verb::Queues { format } => crate::queues::queues(&mut client, format.output).await,
        Verb::Queue(verb) => crate::queues::queue(&mut client, verb).await,
        Verb::Usage { by, output, .. } => crate::queues::usage(&mut client, since, by, output).await,
    }
}

fn dataset_check(files: &[PathBuf], policy: PolicyArg) -> anyhow::Result<ExitCode> {
    use cohort_shared::dataset::{DatasetPolicy, check_jsonl};
    let policy = match policy {
        PolicyArg::Fail => DatasetPolicy::Fail,
        PolicyArg::Warn => DatasetPolicy::Warn,
    };
    let mut allowed = true;
    for file in files {
        let report = check_jsonl(file)?;
        say!("{}", report.render());
        allowed &= policy.allows(&report);
    }
    Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Job files bigger than this are not even read (the controller's own limit,
/// --max-job-file-size, is 1 MiB by default).
const MAX_JOB_FILE_READ: u64 = 64 << 20;

fn read_job_file(path: &Path) -> anyhow::Result<JobFile> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read job file {}", path.display()))?;
    let mut yaml = String::new();
    file.take(MAX_JOB_FILE_READ + 1)
        .read_to_string(&mut yaml)
        .with_context(|| format!("cannot read job file {}", path.display()))?;
    if yaml.len() as u64 > MAX_JOB_FILE_READ {
        anyhow::bail!(
            "job file {} is larger than {} MiB; a job file is a short YAML text",
            path.display(),
            MAX_JOB_FILE_READ >> 20
        );
    }
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let base_dir = absolute.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(JobFile { yaml, source_name: path.display().to_string(), base_dir, ..JobFile::default() })
}

fn finished(job: &Job) -> bool {
    matches!(JobState::try_from(job.state), Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled))
        && job.live_processes == 0
}

/// Pending, and no idle cluster of the current nodes could ever hold it.
fn never_fits(job: &Job) -> bool {
    job.state == JobState::Pending as i32 && job.reason.starts_with(cohort_proto::names::NEVER_FITS)
}

/// What `--wait` says while the job has not started: its state and reason,
/// each time they change (`None`: nothing new to say).
#[derive(Default)]
struct WaitingNote {
    last: Option<(i32, String)>,
}

impl WaitingNote {
    fn update(&mut self, job: &Job) -> Option<String> {
        let waiting = matches!(JobState::try_from(job.state), Ok(JobState::Pending | JobState::Restarting));
        if !waiting || job.reason.is_empty() {
            self.last = None;
            return None;
        }
        let now = (job.state, job.reason.clone());
        if self.last.as_ref() == Some(&now) {
            return None;
        }
        self.last = Some(now);
        Some(format!("job {}: {}: {}", job.id, state_name(job.state), terminal_safe(&job.reason)))
    }
}

fn exit_for(job: &Job) -> ExitCode {
    if job.state == JobState::Succeeded as i32 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Follows the job's events until it has finished and its processes are gone.
/// A broken connection or a controller between leaders (an etcd member lost,
/// a standby taking over) is not the job's end: the watch is opened again
/// with backoff, for about half a minute of consecutive failures, through the
/// first reachable controller of the list again (the one we used may be gone).
async fn wait_finished(
    client: &mut JobServiceClient<Channel>,
    connection: (&crate::connection::ClientArgs, &str),
    job: &str,
) -> anyhow::Result<Job> {
    wait_until(client, connection, job, finished).await
}

/// Whether the job has left the queue: preparing, running or finished.
fn started(job: &Job) -> bool {
    !matches!(JobState::try_from(job.state), Ok(JobState::Pending | JobState::Unspecified))
}

/// Follows the job's events until `until` holds or it can never be placed,
/// saying each new pending reason on stderr (see [`wait_finished`]).
async fn wait_until(
    client: &mut JobServiceClient<Channel>,
    (connection, urls): (&crate::connection::ClientArgs, &str),
    job: &str,
    until: fn(&Job) -> bool,
) -> anyhow::Result<Job> {
    let mut bars = crate::metrics::StageBars::new();
    let mut note = WaitingNote::default();
    let mut delays = reconnect_delays();
    loop {
        let status = match follow_until(client, job, until, &mut bars, &mut note, &mut delays).await {
            Ok(Some(job)) => return Ok(job),
            // The stream ended before the job did: ask once, else watch again.
            Ok(None) => match client.get_job(GetJobRequest { job: job.into() }).await {
                Ok(answer) if until(answer.get_ref()) || never_fits(answer.get_ref()) => {
                    return Ok(answer.into_inner());
                }
                Ok(answer) => match delays.next() {
                    Some(delay) => {
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    None => return Ok(answer.into_inner()),
                },
                Err(status) => status,
            },
            Err(status) => status,
        };
        if !is_transport_failure(&status) {
            return Err(status_error(status));
        }
        let Some(delay) = delays.next() else { return Err(status_error(status)) };
        eprintln!("wait: {}; watching job {job} again in {delay:.1?}", status.message());
        tokio::time::sleep(delay).await;
        if let Ok(again) = connection.connect(urls).await {
            *client = again;
        }
    }
}

/// The CLI's retries of a connection: 300 ms doubling to 5 s, jittered, `times` tries.
fn transport_backoff(times: usize) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(300))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(times)
        .with_jitter()
}

fn reconnect_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    transport_backoff(10).build()
}

/// One watch of the job: `Some(job)` once `until` holds (or it never fits), `None` when the
/// stream ended first. Each event received restores the reconnect budget.
async fn follow_until(
    client: &mut JobServiceClient<Channel>,
    job: &str,
    until: fn(&Job) -> bool,
    bars: &mut crate::metrics::StageBars,
    note: &mut WaitingNote,
    delays: &mut backon::ExponentialBackoff,
) -> Result<Option<Job>, tonic::Status> {
    let mut events = client.watch_job(WatchJobRequest { job: job.into() }).await?.into_inner();
    while let Some(event) = events.message().await? {
        *delays = reconnect_delays();
        if let Some(job) = event.job {
            bars.update(&job);
            if let Some(line) = note.update(&job) {
                eprintln!("{line}");
            }
            if until(&job) || never_fits(&job) {
                return Ok(Some(job));
            }
        }
    }
    Ok(None)
}

/// After an array's submit: its id on stdout; with `--wait`, every element's end.
async fn submitted_array(
    client: &mut JobServiceClient<Channel>,
    connection: (&crate::connection::ClientArgs, &str),
    first: &Job,
    wait: bool,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let id = &first.array_id;
    eprintln!("submitted job array {id}: {} job(s), {id}_<index> (`cohort jobs --array {id}`)", first.array_size);
    if wait {
        return array_finished(client, connection, id, true, out).await;
    }
    if out == Output::Json {
        print_json(first)?;
    } else {
        say!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Every element of an array (each waited for with `wait`): JSON as `cohort
/// jobs`, else one line each; exit 0 only if every element succeeded.
async fn array_finished(
    client: &mut JobServiceClient<Channel>,
    connection: (&crate::connection::ClientArgs, &str),
    array: &str,
    wait: bool,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let all = client.list_jobs(ListJobsRequest { active_only: false }).await.map_err(status_error)?.into_inner().jobs;
    let mut jobs = Vec::new();
    for job in all.into_iter().filter(|j| j.array_id == array) {
        jobs.push(if wait { wait_finished(client, connection, &job.id).await? } else { job });
    }
    if out == Output::Json {
        print_json(&cohort_proto::ListJobsResponse { jobs: jobs.clone() })?;
    } else {
        for job in &jobs {
            say!("job {}: {} ({})", job.id, state_name(job.state), job.reason);
        }
    }
    let all_ok = jobs.iter().all(|j| j.state == JobState::Succeeded as i32);
    Ok(if all_ok || !wait { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_final(job: &Job, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(job);
    }
    say!("job {}: {} ({})", job.id, state_name(job.state), job.reason);
    if never_fits(job) {
        eprintln!(
            "job {0} stays queued but cannot start until nodes join or its request shrinks: `cohort cancel {0}`, \
             or change nodes/gpus_per_node/node_selector and submit again",
            job.id
        );
    }
    if job.output_dropped_bytes > 0 {
        say!("job {}: {} bytes of output dropped (gap records in `cohort logs`)", job.id, job.output_dropped_bytes);
    }
    Ok(())
}

async fn logs(
    client: &mut JobServiceClient<Channel>,
    job: &str,
    node: Option<String>,
    follow: bool,
    tail: Option<u32>,
    raw: bool,
    out: Output,
) -> anyhow::Result<()> {
    if let Some(node) = &node {
        check_node_of_job(client, job, node).await?;
    }
    let request =
        StreamLogsRequest { job: job.into(), node: node.unwrap_or_default(), follow, tail: tail.unwrap_or(0) };
    let mut lines = client.stream_logs(request).await.map_err(status_error)?.into_inner();
    // JSON: one document of every line, or with --follow one JSON line per record as it comes
    // (JSON escapes control characters itself).
    let mut records = Vec::new();
    while let Some(line) = lines.message().await.map_err(status_error)? {
        match out {
            Output::Json if follow => crate::output::print_json_line(&line)?,
            Output::Json => records.push(line),
            Output::Table => print_line(&line, raw),
        }
    }
    if out == Output::Json && !follow {
        say!("{}", serde_json::to_string_pretty(&crate::json::list_document("lines", &records)?)?);
    }
    Ok(())
}

/// `logs --node NODE` of a job placed on other nodes would print nothing, as if
/// the ranks had been silent: say which nodes it has instead. A job not placed
/// yet (or a pipeline, placed stage by stage) is not checked.
async fn check_node_of_job(client: &mut JobServiceClient<Channel>, job: &str, node: &str) -> anyhow::Result<()> {
    let job = client.get_job(GetJobRequest { job: job.into() }).await.map_err(status_error)?.into_inner();
    let Some(plan) = job.plan.as_ref().filter(|p| !p.nodes.is_empty()) else { return Ok(()) };
    let nodes: Vec<&str> = plan.nodes.iter().map(|n| n.node_name.as_str()).collect();
    if !nodes.contains(&node) {
        anyhow::bail!(
            "--node {node}: job {} has no rank on {node}; its nodes are {} (`cohort status {}` lists its ranks)",
            job.id,
            nodes.join(", "),
            job.id
        );
    }
    Ok(())
}

/// A rank's line made safe for a terminal: escape sequences (colours, cursor
/// moves, title changes) and control characters other than tab removed.
pub fn terminal_safe(text: &str) -> String {
    // strip-ansi-escapes drops tabs with the other controls: keep them.
    text.split('\t').map(strip_ansi_escapes::strip_str).collect::<Vec<_>>().join("\t")
}

fn print_line(l: &JobLogLine, raw: bool) {
    let Some(line) = &l.line else { return };
    let safe;
    let text = if raw {
        &line.text
    } else {
        safe = terminal_safe(&line.text);
        &safe
    };
    if line.stream == LogStream::Stderr as i32 {
        say!("{}/{} ! {text}", l.node_name, line.process_index);
    } else {
        say!("{}/{} | {text}", l.node_name, line.process_index);
    }
}

/// `cohort jobs` filters (the default keeps every job).
#[derive(Default)]
struct JobFilter {
    states: Vec<i32>,
    user: Option<String>,
    name: Option<String>,
    queue: Option<String>,
    limit: Option<usize>,
    array: Option<String>,
}

impl JobFilter {
    fn new(
        states: &[String],
        user: Option<String>,
        name: Option<String>,
        limit: Option<usize>,
    ) -> anyhow::Result<Self> {
        let known: Vec<JobState> = (1..).map_while(|s| JobState::try_from(s).ok()).collect();
        let states = states
            .iter()
            .map(|wanted| {
                known
                    .iter()
                    .find(|s| state_name(**s as i32).eq_ignore_ascii_case(wanted.trim()))
                    .map(|s| *s as i32)
                    .ok_or_else(|| {
                        let names: Vec<&str> = known.iter().map(|s| state_name(*s as i32)).collect();
                        anyhow::anyhow!(
                            "--state {wanted:?}: not a job state; one of {}",
                            names.join(", ").to_lowercase()
                        )
                    })
            })
            .collect::<anyhow::Result<Vec<i32>>>()?;
        Ok(JobFilter { states, user, name, queue: None, limit, array: None })
    }

    fn in_queue(self, queue: Option<String>) -> Self {
        JobFilter { queue, ..self }
    }

    fn apply(&self, jobs: Vec<Job>) -> Vec<Job> {
        let mut kept: Vec<Job> = jobs
            .into_iter()
            .filter(|j| self.states.is_empty() || self.states.contains(&j.state))
            .filter(|j| self.user.as_ref().is_none_or(|u| j.file.as_ref().is_some_and(|f| &f.submitted_by == u)))
            .filter(|j| self.name.as_ref().is_none_or(|n| &j.name == n))
            .filter(|j| self.queue.as_ref().is_none_or(|q| &j.queue == q))
            .filter(|j| self.array.as_ref().is_none_or(|a| &j.array_id == a))
            .collect();
        if let Some(limit) = self.limit {
            kept.drain(..kept.len().saturating_sub(limit));
        }
        kept
    }
}

fn print_jobs(jobs: &[Job]) {
    let mut t = table(&["ID", "KIND", "STATE", "QUEUE", "NODES×GPUS", "ATTEMPT", "SUBMITTED", "DURATION", "REASON"]);
    for job in jobs {
        t.add_row(vec![
            job.id.clone(),
            job.kind.clone(),
            state_name(job.state).to_string(),
            if job.queue.is_empty() { "-".to_string() } else { job.queue.clone() },
            format!("{}×{}", job.nodes, job.gpus_per_node),
            job.attempt.to_string(),
            ago(job.submitted_unix_ms),
            duration(job),
            job.reason.clone(),
        ]);
    }
    say!("{t}");
}

fn print_status(job: &Job) {
    say!("job:       {} ({})", job.id, job.kind);
    say!("state:     {}", state_name(job.state));
    say!("reason:    {}", job.reason);
    if job.stages.is_empty() {
        say!("size:      {} node(s) × {} GPU(s), priority {}", job.nodes, job.gpus_per_node, job.priority);
        if !job.queue.is_empty() {
            say!("queue:     {}", job.queue);
        }
        say!("attempt:   {}", job.attempt);
    }
    say!("submitted: {}", ago(job.submitted_unix_ms));
    if !job.after.is_empty() {
        let after: Vec<String> = job.after.iter().map(|d| format!("{}:{}", d.job, d.condition)).collect();
        say!("after:     {}", after.join(", "));
    }
    if let Some(runs_as) = runs_as(job) {
        say!("runs as:   {runs_as}");
    }
    if job.started_unix_ms > 0 {
        say!("duration:  {}", duration(job));
    }
    if let Some(f) = &job.failure {
        say!("failure:   {}", f.message);
    }
    crate::failures::print_failure_status(job);
    crate::metrics::print_training_status(job);
    crate::pipeline::print_stages(job);
    if job.live_processes > 0 {
        say!("alive:     {} process(es)", job.live_processes);
    }
    if job.output_dropped_bytes > 0 {
        say!(
            "output:    {} bytes dropped by the agents (over the output budget; see the gap records in `cohort logs`, the nodes' output files keep everything)",
            job.output_dropped_bytes
        );
    }
    if let Some(plan) = &job.plan {
        say!("master:    {}:{}", plan.master_addr, plan.master_port);
        if !plan.argv.is_empty() {
            say!("command:   {}", shell_words::join(&plan.argv));
        }
        let mut t = table(&["NODE", "NODE RANK", "PROCESS", "RANK", "PID", "USER", "PHASE", "EXIT"]);
        for p in &job.processes {
            let phase = match ProcessPhase::try_from(p.phase) {
                Ok(ProcessPhase::Launching) => "Launching",
                Ok(ProcessPhase::Running) => "Running",
                Ok(ProcessPhase::Exited) => "Exited",
                Ok(ProcessPhase::SpawnFailed) => "SpawnFailed",
                Ok(ProcessPhase::Lost) => "Lost",
                _ => "Unknown",
            };
            let exit = if p.phase == ProcessPhase::Exited as i32 {
                let how = describe_exit(p.exit_code, p.signal);
                if p.stopped_by_agent { format!("{how} (stopped)") } else { how }
            } else {
                String::new()
            };
            t.add_row(vec![
                p.node_name.clone(),
                p.node_rank.to_string(),
                p.index.to_string(),
                p.global_rank.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                if p.pid > 0 { p.pid.to_string() } else { "-".into() },
                if p.user.is_empty() { "-".into() } else { p.user.clone() },
                phase.to_string(),
                exit,
            ]);
        }
        say!("{t}");
    }
}

/// The Unix users the job's processes run as (from the nodes once they
/// started), else who it will run as: its submitter's own account or the
/// nodes' rank-user.
fn runs_as(job: &Job) -> Option<String> {
    let mut users: Vec<&str> = job.processes.iter().map(|p| p.user.as_str()).filter(|u| !u.is_empty()).collect();
    users.sort_unstable();
    users.dedup();
    if !users.is_empty() {
        return Some(users.join(", "));
    }
    let submitter = job.file.as_ref()?.default_user.strip_prefix("submitter:")?;
    Some(format!("{submitter}'s own Unix account on each node (unless the job names `user:`)"))
}

fn duration(job: &Job) -> String {
    if job.started_unix_ms <= 0 {
        return "-".into();
    }
    let end = if job.finished_unix_ms > 0 { job.finished_unix_ms } else { cohort_proto::now_unix_ms() };
    let secs = ((end - job.started_unix_ms).max(0) / 1000) as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Submits with a fresh request id, retrying transport failures with the same
/// id: a submit whose answer was lost is not made twice (the controller
/// returns the first job for a repeated id).
async fn submit_retrying(
    client: &JobServiceClient<Channel>,
    file: Option<cohort_proto::JobFile>,
) -> Result<tonic::Response<cohort_proto::SubmitJobResponse>, tonic::Status> {
    use backon::Retryable;
    let request_id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let attempt = || {
        let mut client = client.clone();
        let request = SubmitJobRequest { file: file.clone(), request_id: request_id.clone() };
        async move { client.submit_job(request).await }
    };
    attempt
        .retry(transport_backoff(5))
        .when(is_transport_failure)
        .notify(|status: &tonic::Status, delay: Duration| {
            eprintln!("submit: {}; retrying in {delay:.1?} with the same request id", status.message());
        })
        .await
}

/// A failure of the connection rather than an answer of the controller.
fn is_transport_failure(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable => true,
        // A connection reset mid-call reaches tonic as Unknown or Internal with an h2 error.
        Code::Unknown | Code::Internal => {
            let m = status.message();
            m.contains("transport") || m.contains("h2 protocol error") || m.contains("connection")
        }
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn only_transport_failures_are_retried_under_the_same_request_id() {
        use tonic::{Code, Status};
        assert!(super::is_transport_failure(&Status::unavailable("tcp connect error")));
        assert!(super::is_transport_failure(&Status::unknown("transport error")));
        assert!(super::is_transport_failure(&Status::internal("h2 protocol error: connection reset")));
        // Answers of the controller are final.
        for code in [Code::InvalidArgument, Code::PermissionDenied, Code::ResourceExhausted, Code::Aborted] {
            assert!(!super::is_transport_failure(&Status::new(code, "connection")), "{code:?}");
        }
        assert!(!super::is_transport_failure(&Status::internal("store write failed")));
    }

    #[test]
    fn wait_says_each_new_pending_reason_once_and_stops_at_never_fits() {
        use cohort_proto::{Job, JobState};
        let job = |state: JobState, reason: &str| Job {
            id: "j-1".into(),
            state: state as i32,
            reason: reason.into(),
            ..Default::default()
        };
        let mut note = super::WaitingNote::default();
        let cordoned = job(JobState::Pending, "waiting for free GPUs: node1 is cordoned");
        assert_eq!(
            note.update(&cordoned).as_deref(),
            Some("job j-1: Pending: waiting for free GPUs: node1 is cordoned")
        );
        assert_eq!(note.update(&cordoned), None, "an unchanged reason is said once");
        assert_eq!(note.update(&job(JobState::Running, "")), None);
        assert!(note.update(&job(JobState::Restarting, "backoff")).is_some());
        assert!(!super::never_fits(&cordoned));
        let never = job(JobState::Pending, &format!("{}: 3 nodes wanted, 2 exist", cohort_proto::names::NEVER_FITS));
        assert!(super::never_fits(&never));
        assert!(!super::never_fits(&job(JobState::Failed, cohort_proto::names::NEVER_FITS)));
    }

    #[test]
    fn jobs_filters_by_state_user_name_and_keeps_the_newest() {
        use cohort_proto::{Job, JobFile, JobState};
        let job = |id: &str, state: JobState, user: &str| Job {
            id: id.into(),
            name: id.split('-').next().unwrap_or_default().into(),
            state: state as i32,
            file: Some(JobFile { submitted_by: user.into(), ..Default::default() }),
            ..Default::default()
        };
        let jobs = vec![
            job("a-1", JobState::Failed, "alice"),
            job("b-2", JobState::Running, "bob"),
            job("a-3", JobState::Succeeded, "alice"),
            job("a-4", JobState::Failed, "alice"),
        ];
        let ids = |f: super::JobFilter| f.apply(jobs.clone()).into_iter().map(|j| j.id).collect::<Vec<_>>();
        let filter = |states: &[&str], user: Option<&str>, name: Option<&str>, limit| {
            let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
            super::JobFilter::new(&states, user.map(Into::into), name.map(Into::into), limit).unwrap()
        };
        assert_eq!(ids(filter(&["FAILED"], None, None, None)), ["a-1", "a-4"]);
        assert_eq!(ids(filter(&["failed", "running"], None, None, Some(2))), ["b-2", "a-4"]);
        assert_eq!(ids(filter(&[], Some("alice"), None, None)), ["a-1", "a-3", "a-4"]);
        assert_eq!(ids(filter(&[], None, Some("b"), None)), ["b-2"]);
        let err = super::JobFilter::new(&["done".into()], None, None, None).err().unwrap().to_string();
        assert!(err.contains("--state \"done\"") && err.contains("succeeded"), "{err}");
    }

    #[test]
    fn terminal_escapes_and_control_characters_do_not_reach_the_terminal() {
        assert_eq!(super::terminal_safe("\x1b[31mred\x1b[0m\0nul\x07\tend"), "rednul\tend");
        assert_eq!(super::terminal_safe("\x1b]0;title\x07plain"), "plain");
        assert_eq!(super::terminal_safe("iteration 5/20 | loss 1.0"), "iteration 5/20 | loss 1.0");
    }
}
