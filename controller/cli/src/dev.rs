//! `cohort dev up|down|status`: a local TLS cluster on this machine that stays
//! up — one controller and N agents on loopback addresses (127.0.0.2, ...),
//! detached, with their logs and pid files in one directory.
//!
//! Layout of the directory: `cluster.json` (port, nodes, GPUs per node),
//! `controller/` (data dir, `tls/` with the CA and admin token), `join.token`,
//! `env` (the lines to paste), and per process `NAME.log` and `NAME.pid`
//! (`controller`, `node0`, `node1`, ...).

use std::fs::File;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use cohort_proto::{ListNodesRequest, NodeState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::connection::ClientArgs;

/// How long `up` waits for every node to be Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `down` gives a process between SIGTERM and SIGKILL (agents stop their ranks first).
const STOP_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_PORT: u16 = 17170;

#[derive(Subcommand, Debug)]
pub enum DevVerb {
    /// Start a local TLS cluster that stays up (a controller and N agents on
    /// 127.0.0.2, ...) and print the lines to paste: `eval "$(cohort dev up)"`.
    Up(UpArgs),
    /// Stop the dev cluster's agents (and their ranks), then its controller.
    Down {
        #[command(flatten)]
        dir: DirArg,
        /// Also delete the directory (state, certificates, logs).
        #[arg(long)]
        purge: bool,
    },
    /// Which of the dev cluster's processes run, and its nodes' states.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
}

#[derive(Args, Debug)]
pub struct DirArg {
    /// The cluster's directory (default: $XDG_STATE_HOME/cohort/dev, else ~/.cohort/dev).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Agents to start, one node each (default: what the directory had last time, else 2).
    #[arg(long)]
    pub nodes: Option<u32>,
    /// GPUs of each node: real ones when nvidia-smi lists enough, else fake slots (default: as last time, else 1).
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// The controller's port on 127.0.0.1 (default: as last time, else 17170).
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub dir: DirArg,
}

/// What `up` started, kept in `cluster.json` for `down`, `status` and the next `up`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct DevCluster {
    port: u16,
    nodes: u32,
    gpus_per_node: u32,
}

impl DevCluster {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn node_names(&self) -> Vec<String> {
        (0..self.nodes).map(|i| format!("node{i}")).collect()
    }
}

/// The dev cluster's directory and the paths in it.
struct DevDir(PathBuf);

impl DevDir {
    fn tls(&self) -> PathBuf {
        self.0.join("controller").join("tls")
    }
    fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.crt")
    }
    fn admin_token(&self) -> PathBuf {
        self.tls().join("admin.token")
    }
    fn state(&self) -> PathBuf {
        self.0.join("cluster.json")
    }
    fn pid_file(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.pid"))
    }
    fn log(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.log"))
    }

    fn read_state(&self) -> anyhow::Result<Option<DevCluster>> {
        match std::fs::read_to_string(self.state()) {
            Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not a dev cluster's state; `cohort dev down{} --purge` starts afresh",
                    self.state().display(),
                    dir_flag(Some(&self.0))
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "{}: cannot read the dev cluster's state; `cohort dev down{} --purge` starts afresh",
                    self.state().display(),
                    dir_flag(Some(&self.0))
                )
            }),
        }
    }

    /// The pid in NAME.pid when that process still runs as this cluster's
    /// (its command line names this directory: a reused pid does not count).
    fn running(&self, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(name)).ok()?.trim().parse().ok()?;
        runs_in(pid, &self.0).then_some(pid)
    }

    /// The controller first, then the agents of `cluster` (or of every NAME.pid left when unknown).
    fn process_names(&self, cluster: Option<&DevCluster>) -> Vec<String> {
        let mut names = vec!["controller".to_string()];
        match cluster {
            Some(c) => names.extend(c.node_names()),
            None => {
                let mut agents: Vec<String> = std::fs::read_dir(&self.0)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_suffix(".pid").map(str::to_string))
                    .filter(|n| n != "controller")
                    .collect();
                agents.sort();
                names.extend(agents);
            }
        }
        names
    }

    /// The lines to paste into a shell.
    fn env_lines(&self, cluster: &DevCluster) -> String {
        let quote = |p: PathBuf| shell_words::quote(&p.display().to_string()).into_owned();
        format!(
            "export COHORT_CONTROLLER={} COHORT_CA_CERT={} COHORT_TOKEN_FILE={}\n",
            cluster.url(),
            quote(self.ca_cert()),
            quote(self.admin_token())
        )
    }
}

/// Whether `pid` is alive (not a zombie) with `dir` in its command line.
fn runs_in(pid: i32, dir: &Path) -> bool {
    // A zombie's cmdline is empty.
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let dir = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(dir.len()).any(|w| w == dir)
}

/// Processes started by an agent whose work dir lies in `dir` (ranks and their shims).
fn ranks_of(dir: &Path) -> Vec<i32> {
    let marker = [b"COHORT_AGENT_WORK_DIR=".as_slice(), dir.as_os_str().as_encoded_bytes(), b"/"].concat();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            environ.split(|b| *b == 0).any(|v| v.starts_with(&marker)).then_some(pid)
        })
        .collect()
}

fn default_dir() -> anyhow::Result<PathBuf> {
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(state).join("cohort").join("dev"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).context("HOME is not set: pass --dir")?;
    Ok(PathBuf::from(home).join(".cohort").join("dev"))
}

/// The directory as an absolute path (process command lines are matched against it).
fn dev_dir(arg: &DirArg, create: bool) -> anyhow::Result<DevDir> {
    let dir = match &arg.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    if create {
        std::fs::create_dir_all(&dir).with_context(|| format!("--dir {}: cannot create it", dir.display()))?;
    }
    match dir.canonicalize() {
        Ok(dir) => Ok(DevDir(dir)),
        Err(_) if !create => Ok(DevDir(std::path::absolute(&dir).unwrap_or(dir))),
        Err(e) => Err(e).with_context(|| format!("--dir {}", dir.display())),
    }
}

pub async fn run(verb: &DevVerb) -> anyhow::Result<ExitCode> {
    match verb {
        DevVerb::Up(args) => up(args).await,
        DevVerb::Down { dir, purge } => down(&dev_dir(dir, false)?, *purge),
        DevVerb::Status { dir } => status(&dev_dir(dir, false)?).await,
    }
}

/// `name` next to this `cohort` binary, else on PATH.
fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the cohort binary")?;
    if let Some(path) = exe.parent().map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is neither next to {} nor on PATH: build it (`cargo build --workspace --bins`) or install it",
                exe.display()
            )
        })
}

fn check_node_count(nodes: u32) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 250 {
        bail!("--nodes {nodes}: give 1 to 250 (one loopback address each, 127.0.0.2 up)");
    }
    Ok(())
}

/// How many NVIDIA GPUs `nvidia-smi -L` lists (0 without a driver).
fn nvidia_gpus() -> u32 {
    Command::new("nvidia-smi")
        .arg("-L")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.starts_with("GPU ")).count() as u32)
        .unwrap_or(0)
}

async fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    // Checked before the directory is made: a refused `up` leaves nothing behind.
    if let Some(nodes) = args.nodes {
        check_node_count(nodes)?;
    }
    let dir = dev_dir(&args.dir, true)?;
    let previous = dir.read_state()?;
    let anything_runs = dir.process_names(previous.as_ref()).iter().any(|n| dir.running(n).is_some());
    // What the directory had last time, so that `up` after `down` is the same cluster (port, size).
    let default = previous.clone().unwrap_or(DevCluster { port: DEFAULT_PORT, nodes: 2, gpus_per_node: 1 });
    let cluster = DevCluster {
        port: args.port.unwrap_or(default.port),
        nodes: args.nodes.unwrap_or(default.nodes),
        gpus_per_node: args.gpus_per_node.unwrap_or(default.gpus_per_node),
    };
    check_node_count(cluster.nodes)?;
    if let Some(running) = previous.as_ref().filter(|p| anything_runs && **p != cluster) {
        bail!(
            "a dev cluster runs in {} with {} nodes, {} GPU{} each, on port {}: `cohort dev down{}` first to change it",
            dir.0.display(),
            running.nodes,
            running.gpus_per_node,
            if running.gpus_per_node == 1 { "" } else { "s" },
            running.port,
            dir_flag(args.dir.dir.as_deref())
        );
    }
    let missing: Vec<String> =
        dir.process_names(Some(&cluster)).into_iter().filter(|n| dir.running(n).is_none()).collect();
    if missing.is_empty() {
        eprintln!("a dev cluster already runs in {} ({} nodes)", dir.0.display(), cluster.nodes);
        print_lines(&dir, &cluster)?;
        return Ok(ExitCode::SUCCESS);
    }

    let controller_bin = find_binary("cohort-controller")?;
    let agent_bin = find_binary("cohort-agent")?;
    if !dir.ca_cert().exists() {
        step(&format!("cohort-controller init (CA and admin token in {})", dir.tls().display()));
        let out = Command::new(&controller_bin)
            .args(["init", "--id", "dev", "--tls-dir"])
            .arg(dir.tls())
            .env("COHORT_CONTROLLER_CONFIG", "/dev/null")
            .output()
            .with_context(|| format!("running {} init", controller_bin.display()))?;
        if !out.status.success() {
            bail!("cohort-controller init failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    let join_token = join_token(&dir, &controller_bin)?;
    std::fs::write(dir.state(), serde_json::to_string_pretty(&cluster)?)
        .with_context(|| format!("writing {}", dir.state().display()))?;

    let mut started = Vec::new();
    if missing.iter().any(|n| n == "controller") {
        if std::net::TcpListener::bind(("127.0.0.1", cluster.port)).is_err() {
            bail!("port {} on 127.0.0.1 is in use: pass --port with a free one", cluster.port);
        }
        step(&format!("starting the controller on {} (log: {})", cluster.url(), dir.log("controller").display()));
        let mut command = Command::new(&controller_bin);
        command
            .args(["--listen", &format!("127.0.0.1:{}", cluster.port), "--id", "dev", "--data-dir"])
            .arg(dir.0.join("controller"))
            .arg("--tls-dir")
            .arg(dir.tls());
        started.push(("controller".to_string(), spawn_detached(&dir, "controller", command)?));
    }
    let gpus = nvidia_gpus();
    let real = gpus >= cluster.nodes * cluster.gpus_per_node;
    let root = nix::unistd::geteuid().is_root();
    for (i, name) in cluster.node_names().iter().enumerate() {
        if !missing.contains(name) {
            continue;
        }
        let address = format!("127.0.0.{}", i + 2);
        let gpu_args = match real {
            true => {
                let first = i as u32 * cluster.gpus_per_node;
                let indices: Vec<String> = (first..first + cluster.gpus_per_node).map(|g| g.to_string()).collect();
                vec!["--gpu-indices".to_string(), indices.join(",")]
            }
            false => vec!["--fake-gpus".to_string(), cluster.gpus_per_node.to_string()],
        };
        let mut command = Command::new(&agent_bin);
        command
            .args(["--controller", &cluster.url(), "--node-name", name, "--advertise-addr", &address])
            .arg("--work-dir")
            .arg(dir.0.join(name))
            .arg("--ca-cert")
            .arg(dir.ca_cert())
            .args(["--join-token", &join_token, "--net-ifname", "lo", "--max-backoff", "1s"])
            .args(&gpu_args);
        if root {
            // Ranks run as the agent's user; as root that has to be said (a real node names a rank-user).
            command.arg("--allow-root-ranks");
        }
        step(&format!("starting agent {name} on {address} (log: {})", dir.log(name).display()));
        started.push((name.clone(), spawn_detached(&dir, name, command)?));
    }
    if !real {
        eprintln!(
            "   ({} NVIDIA GPUs here for {} x {}: each node gets fake GPU slots; jobs run on CPU)",
            gpus, cluster.nodes, cluster.gpus_per_node
        );
    }
    wait_ready(&dir, &cluster, &mut started).await?;
    print_lines(&dir, &cluster)?;
    Ok(ExitCode::SUCCESS)
}

fn dir_flag(dir: Option<&Path>) -> String {
    dir.map(|d| format!(" --dir {}", shell_words::quote(&d.display().to_string()))).unwrap_or_default()
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

/// A reusable join token kept in the directory, so that agents started again later can join.
fn join_token(dir: &DevDir, controller_bin: &Path) -> anyhow::Result<String> {
    let path = dir.0.join("join.token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_string());
    }
    let out = Command::new(controller_bin)
        .args(["token", "--role", "join", "--reusable", "--ttl", "3650d", "--tls-dir"])
        .arg(dir.tls())
        .env("COHORT_CONTROLLER_CONFIG", "/dev/null")
        .output()
        .with_context(|| format!("running {} token", controller_bin.display()))?;
    if !out.status.success() {
        bail!(
            "cohort-controller token failed: {}\n\
             (the TLS files in {} are incomplete: `cohort dev down{} --purge` starts afresh)",
            String::from_utf8_lossy(&out.stderr).trim(),
            dir.tls().display(),
            dir_flag(Some(&dir.0))
        );
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    write_private(&path, &token)?;
    Ok(token)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Starts `command` in a process group of its own (a Ctrl-C in this terminal
/// does not reach it), output appended to NAME.log, its pid in NAME.pid.
fn spawn_detached(dir: &DevDir, name: &str, mut command: Command) -> anyhow::Result<Child> {
    let log_path = dir.log(name);
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    // The user's COHORT_* settings are for the CLI; the daemons get only their flags
    // (COHORT_PYTHON stays: the interpreter ranks use).
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("COHORT_") && k != "COHORT_PYTHON") {
            command.env_remove(key);
        }
    }
    use std::os::unix::process::CommandExt as _;
    let child = command
        // No /etc/cohort/*.toml of the machine: a dev cluster is only its flags.
        .env("COHORT_CONTROLLER_CONFIG", "/dev/null")
        .env("COHORT_AGENT_CONFIG", "/dev/null")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    std::fs::write(dir.pid_file(name), child.id().to_string())
        .with_context(|| format!("writing {}", dir.pid_file(name).display()))?;
    Ok(child)
}

/// The last lines of a log, for an error.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn dev_client_args(dir: &DevDir) -> ClientArgs {
    ClientArgs { ca_cert: Some(dir.ca_cert()), token_file: Some(dir.admin_token()), ..ClientArgs::default() }
}

/// The state of each node the controller knows, by name.
async fn node_states(dir: &DevDir, cluster: &DevCluster) -> anyhow::Result<Vec<(String, String)>> {
    let mut client = dev_client_args(dir).connect(&cluster.url()).await?;
    let nodes = client.list_nodes(ListNodesRequest {}).await?.into_inner().nodes;
    Ok(nodes
        .iter()
        .map(|n| {
            let name = n.info.as_ref().map(|i| i.name.clone()).unwrap_or_default();
            let state = match NodeState::try_from(n.state) {
                Ok(NodeState::Ready) => "Ready".to_string(),
                _ => crate::nodes::node_state(n),
            };
            (name, state)
        })
        .collect())
}

/// Polls until every node is Ready; fails naming the log of a process that exited meanwhile.
async fn wait_ready(dir: &DevDir, cluster: &DevCluster, started: &mut [(String, Child)]) -> anyhow::Result<()> {
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(cluster.nodes.into());
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let names = cluster.node_names();
    let mut said = usize::MAX;
    loop {
        for (name, child) in started.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bar.finish_and_clear();
                bail!(
                    "{name} exited during start ({status}); its log {} ends with:\n{}\n\
                     (the others still run: `cohort dev down{}` stops them, `cohort dev up` starts what is missing)",
                    dir.log(name).display(),
                    tail(&dir.log(name), 15),
                    dir_flag(Some(&dir.0))
                );
            }
        }
        let ready = match node_states(dir, cluster).await {
            Ok(states) => names.iter().filter(|n| states.iter().any(|(s, st)| s == *n && st == "Ready")).count(),
            Err(_) => 0,
        };
        if ready == names.len() {
            bar.finish_and_clear();
            eprintln!("==> {} nodes Ready after {:.1}s", ready, start.elapsed().as_secs_f64());
            return Ok(());
        }
        if ready != said {
            bar.set_message(format!("waiting for the nodes: {ready}/{} Ready", names.len()));
            if bar.is_hidden() {
                eprintln!("   {ready}/{} nodes Ready ({:.0}s)", names.len(), start.elapsed().as_secs_f64());
            }
            said = ready;
        }
        if start.elapsed() > READY_TIMEOUT {
            bar.finish_and_clear();
            bail!(
                "only {ready} of {} nodes Ready after {}s: see the logs in {} (`cohort dev status`)",
                names.len(),
                READY_TIMEOUT.as_secs(),
                dir.0.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The export line on stdout (so `eval "$(cohort dev up)"` works), the rest on stderr.
fn print_lines(dir: &DevDir, cluster: &DevCluster) -> anyhow::Result<()> {
    let lines = dir.env_lines(cluster);
    std::fs::write(dir.0.join("env"), &lines).with_context(|| format!("writing {}/env", dir.0.display()))?;
    eprintln!(
        "\nPaste this into your shell (or `source {}/env`, or `eval \"$(cohort dev up{})\"`):",
        dir.0.display(),
        dir_flag(Some(&dir.0))
    );
    say!("{}", lines.trim_end());
    eprintln!(
        "then try: cohort nodes; cohort run -N {} --wait -- hostname; cohort submit examples/jobs/tiny-sft.yaml",
        cluster.nodes
    );
    eprintln!("stop it with `cohort dev down{}` (`--purge` also deletes {})", dir_flag(Some(&dir.0)), dir.0.display());
    Ok(())
}

/// Waits up to `grace` for a process sent SIGTERM to be gone, then SIGKILLs it; true when it had to be killed.
fn wait_gone_or_kill(pid: i32, dir: &Path, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !runs_in(pid, dir) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    true
}

fn down(dir: &DevDir, purge: bool) -> anyhow::Result<ExitCode> {
    if !dir.0.exists() {
        eprintln!("no dev cluster in {}", dir.0.display());
        return Ok(ExitCode::SUCCESS);
    }
    let cluster = dir.read_state().ok().flatten();
    let names = dir.process_names(cluster.as_ref());
    // Agents first: each stops its ranks on SIGTERM; then the controller.
    let (controller, agents) = names.split_at(1);
    let mut stopped = 0;
    for group in [agents, controller] {
        let running: Vec<(&String, i32)> = group.iter().filter_map(|n| Some((n, dir.running(n)?))).collect();
        for (name, pid) in &running {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
            eprintln!("stopping {name} (pid {pid})");
        }
        for (name, pid) in &running {
            if wait_gone_or_kill(*pid, &dir.0, STOP_GRACE) {
                eprintln!("{name} (pid {pid}) did not stop within {}s: killed", STOP_GRACE.as_secs());
            }
            stopped += 1;
        }
    }
    let left = ranks_of(&dir.0);
    for pid in &left {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    if !left.is_empty() {
        eprintln!("killed {} rank processes the agents left: {left:?}", left.len());
    }
    for name in &names {
        let _ = std::fs::remove_file(dir.pid_file(name));
    }
    if purge {
        std::fs::remove_dir_all(&dir.0).with_context(|| format!("removing {}", dir.0.display()))?;
        eprintln!("removed {}", dir.0.display());
    }
    eprintln!(
        "{}",
        match stopped {
            0 => format!("no dev cluster process was running in {}", dir.0.display()),
            n => format!("stopped {n} processes of the dev cluster in {}", dir.0.display()),
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn status(dir: &DevDir) -> anyhow::Result<ExitCode> {
    let Some(cluster) = dir.read_state()? else {
        say!("no dev cluster in {} (`cohort dev up` starts one)", dir.0.display());
        return Ok(ExitCode::from(1));
    };
    let states = match dir.running("controller") {
        Some(_) => node_states(dir, &cluster).await.map_err(|e| format!("{e:#}")),
        None => Err(format!("the controller is not running (`cohort dev up{}` starts it)", dir_flag(Some(&dir.0)))),
    };
    say!("dev cluster in {}: controller {}", dir.0.display(), cluster.url());
    let mut all = true;
    for name in dir.process_names(Some(&cluster)) {
        let pid = dir.running(&name);
        all &= pid.is_some();
        let process = pid.map(|p| format!("running (pid {p})")).unwrap_or_else(|| "stopped".into());
        let node = match &states {
            Ok(states) if name != "controller" => states
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| "not registered".into()),
            _ => String::new(),
        };
        say!("  {name:<12} {process:<22} {node:<14} {}", dir.log(&name).display());
    }
    if let Err(e) = &states {
        say!("  node states unknown: {e}");
    }
    Ok(if all && states.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_export_line_survives_a_shell_when_the_dir_has_spaces_and_quotes() {
        let dir = DevDir(PathBuf::from("/tmp/it's a dev dir"));
        let cluster = DevCluster { port: 17170, nodes: 2, gpus_per_node: 1 };
        let script = format!(
            "{}printf '%s\\n' \"$COHORT_CONTROLLER\" \"$COHORT_CA_CERT\" \"$COHORT_TOKEN_FILE\"",
            dir.env_lines(&cluster)
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "https://127.0.0.1:17170\n/tmp/it's a dev dir/controller/tls/ca.crt\n/tmp/it's a dev dir/controller/tls/admin.token\n"
        );
    }

    #[test]
    fn a_pid_file_naming_a_process_of_another_dir_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DevDir(tmp.path().to_path_buf());
        // This test's own pid: alive, but its command line does not name the dir (a reused pid).
        std::fs::write(dir.pid_file("node0"), std::process::id().to_string()).unwrap();
        assert_eq!(dir.running("node0"), None);
        let mut child = Command::new("sh").args(["-c", "sleep 30"]).arg(tmp.path()).spawn().unwrap();
        std::fs::write(dir.pid_file("node0"), child.id().to_string()).unwrap();
        // Until its exec the child still has this test's command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while dir.running("node0").is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(dir.running("node0"), Some(child.id() as i32));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(dir.running("node0"), None);
    }
}
