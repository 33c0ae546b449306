//! A local Cohort cluster made of real processes for integration tests: one
//! `cohort-controller` and N `cohort-agent`s, each agent a "node" with its own
//! loopback address (127.0.0.2, 127.0.0.3, ...), talking over real sockets.
//!
//! The binaries come from the same target directory as the test (build them
//! first: `cargo build --workspace`).
//!
//! Clusters run with TLS like a real one: `cohort-controller init` makes a CA
//! per cluster, agents join with a join token, clients use the admin token.
//! A cluster whose controller flags include `--insecure` runs plaintext.
#![allow(clippy::unwrap_used)]

pub mod etcd;
pub mod proxy;
pub mod store_faults;

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{GetJobRequest, Job, JobFile, JobState, ListNodesRequest, NodeState, SubmitJobRequest};
use cohort_runtime::tls::{Bearer, Claims, ClientTls, Role, TokenKey, files};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A job-API client of a test cluster (with the admin token under TLS).
pub type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// A TLS cluster's CA and tokens.
pub struct ClusterTls {
    /// The controllers' TLS directory (ca.crt, ca.key, token.key, controller.crt, ...).
    pub dir: PathBuf,
    pub ca_pem: String,
    pub admin_token: String,
    pub join_token: String,
    pub token_key: TokenKey,
}

impl ClusterTls {
    fn init(dir: PathBuf) -> anyhow::Result<ClusterTls> {
        let out = Command::new(bin("cohort-controller"))
            .args(["init", "--id", "controller", "--tls-dir"])
            .arg(&dir)
            .output()
            .context("running cohort-controller init")?;
        if !out.status.success() {
            bail!("cohort-controller init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).with_context(|| format!("reading {name}"));
        let token_key = TokenKey::from_text(&read(files::TOKEN_KEY)?)?;
        // Every agent of the cluster joins with it: reusable (join tokens are single-use by default).
        let mut join = Claims::new(Role::Join, "tests", Duration::from_secs(3600));
        join.reusable = true;
        let join_token = token_key.mint(&join);
        Ok(ClusterTls {
            ca_pem: read(files::CA_CERT)?,
            admin_token: read(files::ADMIN_TOKEN)?.trim().to_string(),
            join_token,
            token_key,
            dir,
        })
    }

    /// A token of `role` for `user`, valid for an hour.
    pub fn token(&self, role: Role, user: &str) -> String {
        self.token_key.mint(&Claims::new(role, user, Duration::from_secs(3600)))
    }

    /// A job-API client of `url` sending `token` (the server must hold a controller certificate).
    pub async fn client(&self, url: &str, token: Option<&str>) -> anyhow::Result<Client> {
        let tls = ClientTls { ca_pem: self.ca_pem.clone(), identity: None };
        let endpoint = tls.apply(Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(5)))?;
        let channel = endpoint.connect().await?;
        Ok(JobServiceClient::with_interceptor(channel, Bearer::new(token)?))
    }
}

/// Where `cargo build` put the binaries of this workspace.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // Tests live in target/<profile>/deps/, binaries of this crate in target/<profile>/.
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") { dir.parent().unwrap().to_path_buf() } else { dir.to_path_buf() }
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} not found: run `cargo build --workspace` before the tests", path.display());
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The python of `<repo>/.venv-swift/<version>/`, the venv with the real ms-swift `version` that
/// `tools/swift-flags/venvs.sh` creates (tests/run.sh runs it before the tests).
pub fn swift_python(version: &str) -> PathBuf {
    let python = repo_root().join(".venv-swift").join(version).join("bin").join("python");
    assert!(
        python.exists(),
        "{} not found: run `tools/swift-flags/venvs.sh {version}` (tests/run.sh does) to install ms-swift {version}",
        python.display()
    );
    python
}

/// Megatron-LM core_r0.15.0 as extracted by `tools/swift-flags/venvs.sh`: ms-swift 3.x imports it from
/// `MEGATRON_LM_PATH` (else it `git clone`s it).
pub fn megatron_lm_path() -> PathBuf {
    let path = repo_root().join(".venv-swift").join("megatron-lm-core_r0.15.0");
    assert!(path.join("megatron").is_dir(), "{} not found: run `tools/swift-flags/venvs.sh`", path.display());
    path
}

/// A block of ports held for one cluster (controller port and MASTER_PORT
/// range), locked across test processes so parallel tests never share ports.
struct PortBlock {
    _lock: Flock<File>,
    base: u16,
}

const BLOCK: u16 = 40;

impl PortBlock {
    fn take() -> PortBlock {
        // 20000-27999: below the usual ephemeral range (32768+) and below
        // Cohort's default MASTER_PORT range.
        for i in 0..200u16 {
            let base = 20000 + i * BLOCK;
            let path = std::env::temp_dir().join(format!("cohort-test-ports-{base}.lock"));
            let Ok(file) = File::create(&path) else { continue };
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                return PortBlock { _lock: lock, base };
            }
        }
        panic!("no free test port block");
    }
}

/// A port that no other test takes while this is held (it locks a port block of
/// its own), e.g. for `--http`: `Cluster::start_with(nodes, &["--http", &spare.addr()])`.
pub struct SparePort {
    _block: PortBlock,
    pub port: u16,
}

impl SparePort {
    pub fn take() -> SparePort {
        let block = PortBlock::take();
        SparePort { port: block.base, _block: block }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

pub struct NodeSpec {
    pub name: String,
    pub address: String,
    pub fake_gpus: u32,
    pub labels: String,
    /// More `cohort-agent` flags, e.g. `--net-ifname lo`.
    pub extra_args: Vec<String>,
    /// A command line the agent is started under, e.g. `unshare -m ...` to
    /// give this node a private mount (a path that is local to it).
    pub wrapper: Vec<String>,
    /// Reach the controllers through proxies the test can cut (`partitions`).
    pub partitionable: bool,
    /// Environment of the agent over the harness's own (e.g.
    /// `COHORT_ALLOW_ROOT_RANKS=false` for a node that refuses root ranks).
    pub env: Vec<(String, String)>,
    /// The agent's work directory and log name under the cluster's directory
    /// (default: the node name; a second agent with the same name needs its own).
    pub work_dir_name: Option<String>,
}

impl NodeSpec {
    /// Node `i` (0-based) at 127.0.0.(i+2) with `gpus` fake GPUs.
    pub fn loopback(i: usize, gpus: u32) -> NodeSpec {
        NodeSpec {
            name: format!("node{i}"),
            address: format!("127.0.0.{}", i + 2),
            fake_gpus: gpus,
            labels: String::new(),
            extra_args: Vec::new(),
            wrapper: Vec::new(),
            partitionable: false,
            env: Vec::new(),
            work_dir_name: None,
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    ports: PortBlock,
    controller: Option<Child>,
    agents: Vec<Option<Child>>,
    pub nodes: Vec<NodeSpec>,
    extra_controller_args: Vec<String>,
    /// More controllers (etcd store): `standbys[i]` is controller i + 1.
    standbys: Vec<Option<Child>>,
    /// Per node, a proxy between its agent and every controller, when asked for.
    pub partitions: Vec<Vec<proxy::Partition>>,
    /// The CA and tokens; None for a cluster started with `--insecure`.
    pub tls: Option<ClusterTls>,
}

/// How many controllers a cluster may run (ports base .. base + MAX_CONTROLLERS).
const MAX_CONTROLLERS: u16 = 3;

impl Cluster {
    /// The agents' peer service port (each on its node's address): the first
    /// after the controllers', before the MASTER_PORT range.
    pub fn peer_port(&self) -> u16 {
        self.ports.base + MAX_CONTROLLERS
    }

    /// Starts a controller and one agent per node; returns once every node is Ready.
    pub async fn start(nodes: Vec<NodeSpec>) -> anyhow::Result<Cluster> {
        Self::start_with(nodes, &[]).await
    }

    pub async fn start_with(nodes: Vec<NodeSpec>, controller_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Self::new(nodes, 1, controller_args)?;
        cluster.start_prepared().await?;
        Ok(cluster)
    }

    /// A cluster of one controller with its port block and directory, nothing
    /// started yet: prepare the controller's data dir (`data_dir()`), then
    /// `start_controller` (and no agents: nodes are for `start_with`).
    pub fn prepare(controller_args: &[&str]) -> anyhow::Result<Cluster> {
        Self::prepare_with(Vec::new(), controller_args)
    }

    /// Like [`Cluster::prepare`] with nodes: prepare the data dir (e.g. mount
    /// a small disk on it), then [`Cluster::start_prepared`].
    pub fn prepare_with(nodes: Vec<NodeSpec>, controller_args: &[&str]) -> anyhow::Result<Cluster> {
        let cluster = Self::new(nodes, 1, controller_args)?;
        std::fs::create_dir_all(cluster.data_dir())?;
        Ok(cluster)
    }

    /// Starts the controller and an agent per node; returns once every node is Ready.
    pub async fn start_prepared(&mut self) -> anyhow::Result<()> {
        self.start_controller()?;
        self.start_agents().await?;
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        self.wait_nodes_ready(&names, Duration::from_secs(20)).await
    }

    /// The first controller's `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    /// A cluster with its port block and directory, nothing started yet.
    fn new(nodes: Vec<NodeSpec>, controllers: u16, controller_args: &[&str]) -> anyhow::Result<Cluster> {
        assert!((1..=MAX_CONTROLLERS).contains(&controllers));
        let ports = PortBlock::take();
        let dir = tempfile::Builder::new().prefix("cohort-test-").tempdir()?;
        let tls = match controller_args.contains(&"--insecure") {
            true => None,
            false => Some(ClusterTls::init(dir.path().join("tls"))?),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url =
            (0..controllers).map(|i| format!("{scheme}://127.0.0.1:{}", ports.base + i)).collect::<Vec<_>>().join(",");
        Ok(Cluster {
            dir,
            url,
            ports,
            controller: None,
            agents: Vec::new(),
            nodes,
            extra_controller_args: controller_args.iter().map(|s| s.to_string()).collect(),
            standbys: Vec::new(),
            partitions: Vec::new(),
            tls,
        })
    }

    /// Several controllers against one etcd (`controller_args` must name the
    /// `--store etcd://...`), agents given every controller's URL.
    pub async fn start_ha(nodes: Vec<NodeSpec>, controllers: u16, controller_args: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Self::new(nodes, controllers, controller_args)?;
        cluster.controller = Some(cluster.spawn_controller(0)?);
        for i in 1..controllers {
            let child = cluster.spawn_controller(i)?;
            cluster.standbys.push(Some(child));
        }
        cluster.start_agents().await?;
        Ok(cluster)
    }

    async fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            let mut proxies = Vec::new();
            if self.nodes[i].partitionable {
                for url in self.url.split(',') {
                    let target: std::net::SocketAddr =
                        url.trim_start_matches("http://").trim_start_matches("https://").parse()?;
                    proxies.push(proxy::Partition::start("127.0.0.1:0".parse()?, target).await?);
                }
            }
            self.partitions.push(proxies);
            let child = self.spawn_agent(i)?;
            self.agents.push(Some(child));
        }
        Ok(())
    }

    /// The controllers' URLs, comma-separated (what agents and the CLI get).
    pub fn controller_url(&self, i: u16) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.ports.base + i)
    }

    /// A job-API client of controller `i` (the admin token under TLS).
    pub async fn client_of(&self, i: u16) -> anyhow::Result<Client> {
        self.connect(&self.controller_url(i)).await
    }

    async fn connect(&self, url: &str) -> anyhow::Result<Client> {
        match &self.tls {
            Some(tls) => tls.client(url, Some(&tls.admin_token)).await,
            None => {
                let channel = Endpoint::from_shared(url.to_string())?.connect().await?;
                Ok(JobServiceClient::with_interceptor(channel, Bearer::default()))
            }
        }
    }

    /// The web page's address for `--http ADDR`, with the admin token under TLS.
    pub fn page_url(&self, addr: &str) -> String {
        match &self.tls {
            Some(tls) => format!("https://{addr}/#token={}", tls.admin_token),
            None => format!("http://{addr}/"),
        }
    }

    pub fn start_controller(&mut self) -> anyhow::Result<()> {
        self.controller = Some(self.spawn_controller(0)?);
        Ok(())
    }

    fn spawn_controller(&self, i: u16) -> anyhow::Result<Child> {
        let name = if i == 0 { "controller".to_string() } else { format!("controller-{i}") };
        let log = File::options().create(true).append(true).open(self.dir.path().join(format!("{name}.log")))?;
        let master = format!("{}-{}", self.peer_port() + 1, self.ports.base + BLOCK - 1);
        Command::new(bin("cohort-controller"))
            .args(["--listen", &format!("127.0.0.1:{}", self.ports.base + i)])
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .args(["--master-ports", &master, "--id", &name])
            .args(self.tls.iter().flat_map(|t| [OsStr::new("--tls-dir"), t.dir.as_os_str()]))
            .args(&self.extra_controller_args)
            // No /etc/cohort/controller.toml of the machine (a test passes --config).
            .env("COHORT_CONTROLLER_CONFIG", "/dev/null")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cohort-controller")
    }

    /// SIGKILLs controller `i` (0 is the first).
    pub fn kill_controller_at(&mut self, i: usize) {
        let child = if i == 0 { self.controller.take() } else { self.standbys.get_mut(i - 1).and_then(Option::take) };
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts controller `i` again with the same flags.
    pub fn restart_controller_at(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.spawn_controller(i as u16)?;
        if i == 0 {
            self.controller = Some(child);
        } else if let Some(slot) = self.standbys.get_mut(i - 1) {
            *slot = Some(child);
        }
        Ok(())
    }

    fn spawn_agent(&self, i: usize) -> anyhow::Result<Child> {
        let node = &self.nodes[i];
        let dir_name = node.work_dir_name.as_deref().unwrap_or(&node.name);
        let log = File::options().create(true).append(true).open(self.dir.path().join(format!("{dir_name}.log")))?;
        let controllers = match self.partitions.get(i).filter(|p| !p.is_empty()) {
            Some(proxies) => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                proxies.iter().map(|p| format!("{scheme}://{}", p.addr)).collect::<Vec<_>>().join(",")
            }
            None => self.url.clone(),
        };
        let mut command = match node.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("cohort-agent"));
                c
            }
            None => Command::new(bin("cohort-agent")),
        };
        command
            .args(["--controller", &controllers, "--node-name", &node.name, "--advertise-addr", &node.address])
            .arg("--work-dir")
            .arg(self.dir.path().join(dir_name))
            .args(["--fake-gpus", &node.fake_gpus.to_string(), "--labels", &node.labels, "--max-backoff", "1s"])
            .args(self.security_args_for_agent())
            .args(&node.extra_args)
            // No /etc/cohort/agent.toml of the machine (a test passes --config);
            // tests run as root and start their ranks as themselves.
            .env("COHORT_AGENT_CONFIG", "/dev/null")
            .env("COHORT_ALLOW_ROOT_RANKS", "true")
            .env("RUST_LOG", "info")
            // Each node serves its peers on its own address, on the cluster's port.
            .env("COHORT_PEER_PORT", self.peer_port().to_string())
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting cohort-agent")
    }

    /// Starts a second agent claiming node `i`'s name from another address and
    /// work directory (an impostor, or a copy-pasted config); returns its
    /// index among the agents and its log file.
    pub fn start_twin_agent(&mut self, i: usize, address: &str) -> anyhow::Result<(usize, PathBuf)> {
        let first = &self.nodes[i];
        let dir_name = format!("{}-twin", first.name);
        let twin = NodeSpec {
            name: first.name.clone(),
            address: address.to_string(),
            fake_gpus: first.fake_gpus,
            labels: first.labels.clone(),
            extra_args: first.extra_args.clone(),
            wrapper: first.wrapper.clone(),
            partitionable: false,
            env: first.env.clone(),
            work_dir_name: Some(dir_name.clone()),
        };
        self.nodes.push(twin);
        self.partitions.push(Vec::new());
        let index = self.nodes.len() - 1;
        let child = self.spawn_agent(index)?;
        self.agents.push(Some(child));
        Ok((index, self.dir.path().join(format!("{dir_name}.log"))))
    }

    /// SIGKILLs the controller (a crash) and waits for it to be gone.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The controller's exit status once it has exited by itself (None while it runs).
    pub fn controller_exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.controller.as_mut()?.try_wait().ok()??;
        self.controller = None;
        Some(status)
    }

    /// SIGTERMs the controller and waits; returns its exit status.
    pub fn stop_controller(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.controller.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        c.wait().ok()
    }

    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.agents[i].take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// SIGKILLs agent `i` (a crash) and starts it again with the same flags
    /// and work dir; its ranks' shims outlive it and the new agent adopts them.
    pub fn restart_agent(&mut self, i: usize) {
        self.kill_agent(i);
        self.agents[i] = Some(self.spawn_agent(i).unwrap());
    }

    /// What an agent of this cluster needs: the CA and a join token, or `--insecure`.
    fn security_args_for_agent(&self) -> Vec<String> {
        match &self.tls {
            Some(tls) => vec![
                "--ca-cert".into(),
                tls.dir.join(files::CA_CERT).display().to_string(),
                "--join-token".into(),
                tls.join_token.clone(),
            ],
            None => vec!["--insecure".into()],
        }
    }

    /// What the CLI needs: the CA and the admin token, or `--insecure`.
    fn security_args_for_cli(&self) -> Vec<String> {
        match &self.tls {
            Some(tls) => vec![
                "--ca-cert".into(),
                tls.dir.join(files::CA_CERT).display().to_string(),
                "--token".into(),
                tls.admin_token.clone(),
            ],
            None => vec!["--insecure".into()],
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            // Any live controller answers (standbys forward to the leader).
            for url in self.url.split(',') {
                if let Ok(c) = self.connect(url).await {
                    return Ok(c);
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no controller of {} reachable", self.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_nodes_ready(&self, names: &[String], within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(mut c) = self.client().await
                && let Ok(r) = c.list_nodes(ListNodesRequest {}).await
            {
                let ready = r
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| {
                        n.state == NodeState::Ready as i32
                            && names.iter().any(|x| Some(x) == n.info.as_ref().map(|i| &i.name))
                    })
                    .count();
                if ready == names.len() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("nodes {names:?} not Ready within {within:?}; logs in {}", self.dir.path().display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn submit(&self, yaml: &str) -> anyhow::Result<Job> {
        let file = JobFile {
            yaml: yaml.into(),
            source_name: "test.yaml".into(),
            base_dir: repo_root().display().to_string(),
            ..JobFile::default()
        };
        let r = self.client().await?.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }).await?;
        r.into_inner().job.context("no job in response")
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<Job> {
        Ok(self.client().await?.get_job(GetJobRequest { job: id.into() }).await?.into_inner())
    }

    /// Polls the job until `done(job)` or the deadline.
    pub async fn wait_job(&self, id: &str, within: Duration, done: impl Fn(&Job) -> bool) -> anyhow::Result<Job> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(job) = self.job(id).await
                && done(&job)
            {
                return Ok(job);
            }
            if tokio::time::Instant::now() > deadline {
                let job = self.job(id).await.ok();
                bail!(
                    "job {id} did not reach the expected state within {within:?}: {job:?}; logs in {}",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits a `kind: command` job of `nodes` nodes (one GPU each) whose
    /// processes run until the returned file is created, and waits until every
    /// process runs.
    pub async fn submit_held(&self, name: &str, nodes: u32) -> anyhow::Result<(Job, PathBuf)> {
        let release = self.dir.path().join(format!("release-{name}"));
        let yaml = format!(
            "name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\n\
             command: [sh, -c, 'while [ ! -e {} ]; do sleep 0.1; done']\n",
            release.display()
        );
        let job = self.submit(&yaml).await?;
        let job = self
            .wait_job(&job.id, Duration::from_secs(20), |j| state(j) == JobState::Running && j.live_processes == nodes)
            .await?;
        Ok((job, release))
    }

    /// Waits until the job is terminal and every process is gone.
    pub async fn wait_finished(&self, id: &str, within: Duration) -> anyhow::Result<Job> {
        self.wait_job(id, within, |j| is_terminal(j) && j.live_processes == 0).await
    }

    /// Runs the `cohort` CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("cohort"))
            .args(["--controller", &self.url])
            .args(self.security_args_for_cli())
            .args(args)
            .current_dir(repo_root())
            .output()
            .unwrap()
    }

    /// Runs the `cohort` CLI like [`Cluster::cli`], but gives up after
    /// `within`: kills it and returns None (a command that must not hang).
    pub async fn cli_within(&self, args: &[&str], within: Duration) -> Option<std::process::Output> {
        let child = self.cli_command(args).spawn().unwrap();
        tokio::time::timeout(within, child.wait_with_output()).await.ok().map(Result::unwrap)
    }

    /// The `cohort` CLI with this cluster's controllers and credentials, its
    /// output piped and killed when dropped: for a CLI that runs while the
    /// test goes on.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(bin("cohort"));
        command
            .args(["--controller", &self.url])
            .args(self.security_args_for_cli())
            .args(args)
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// The first process of a job's first rank, once it runs the job's
    /// program: the shim's child (exec-as execs it in place) that is no
    /// longer the agent's own helper.
    pub async fn rank_of(&self, job_id: &str) -> u32 {
        let running = self
            .wait_job(job_id, Duration::from_secs(30), |j| !j.processes.is_empty() && j.processes[0].pid > 0)
            .await
            .unwrap();
        let shim = running.processes[0].pid;
        // The shim's child is the rank once it has exec'd: until then it is a fork of the shim, still
        // the shim's program (and maybe named after the shim's thread, not "cohort-agent") with the
        // shim's credentials.
        let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let shim_exe = exe(shim);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&pid) = children_of(shim).first()
                && exe(pid).is_some_and(|e| Some(&e) != shim_exe.as_ref())
            {
                return pid;
            }
            assert!(tokio::time::Instant::now() < deadline, "no rank under the shim {shim} of {job_id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Process ids of the controller and of the agents still running.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    pub fn agent_pids(&self) -> Vec<u32> {
        self.agents.iter().flatten().map(Child::id).collect()
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first (they stop their ranks on SIGTERM), then the controller.
        let children: Vec<Child> = self
            .agents
            .iter_mut()
            .filter_map(Option::take)
            .chain(self.controller.take())
            .chain(self.standbys.iter_mut().filter_map(Option::take))
            .collect();
        for c in &children {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        for mut c in children {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if std::time::Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        if std::env::var_os("COHORT_KEEP_TEST_DIRS").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

/// A tmpfs mounted for one test (`size` as mount takes it: "3m"), unmounted
/// (lazily) when dropped. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        let out =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).output()?;
        if !out.status.success() {
            bail!("mount -t tmpfs on {} (needs root): {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether the test runs as root (needed to create users and switch to them).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// The uid of the system user `name` (no home, no login shell), created when
/// absent. Test binaries run in parallel and two `useradd` at once fail on
/// the passwd lock, so a failed one is tried again.
pub fn system_user(name: &str) -> u32 {
    let lookup = || {
        let out = Command::new("id").args(["-u", name]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().ok()).flatten()
    };
    for _ in 0..20 {
        if let Some(uid) = lookup() {
            return uid;
        }
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("useradd (package passwd) is needed to create the test's users");
        if out.status.success() {
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lookup().unwrap_or_else(|| panic!("cannot create user {name} with useradd"))
}

/// Processes whose parent is `parent` (from /proc/<pid>/stat).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let ppid: u32 = stat[stat.rfind(')')? + 2..].split(' ').nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

pub fn is_terminal(job: &Job) -> bool {
    matches!(JobState::try_from(job.state), Ok(JobState::Succeeded | JobState::Failed | JobState::Cancelled))
}

pub fn state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// Process groups of the job that still have a live (non-zombie) member; each
/// process the agent starts leads its own group.
pub fn live_groups(job: &Job) -> Vec<u32> {
    let groups: Vec<u32> = job.processes.iter().filter(|p| p.pid > 0).map(|p| p.pid).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut live: Vec<u32> = dir
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut fields = rest.split(' ');
            let state = fields.next()?;
            let pgrp: u32 = fields.nth(1)?.parse().ok()?;
            (state != "Z" && groups.contains(&pgrp)).then_some(pgrp)
        })
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

/// Every process on this machine whose environment says it belongs to the job
/// (the agent gives each process COHORT_JOB_ID; children inherit it).
pub fn processes_of_job(job_id: &str) -> Vec<u32> {
    let marker = format!("COHORT_JOB_ID={job_id}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            // Zombies have an empty environ; a live process of the job has the marker.
            environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()).then_some(pid)
        })
        .collect()
}
