//! The processes the bench runs and reads: controllers (spawned here, SIGKILLed
//! at the end), CPU and memory from /proc, the machine and its load, and
//! etcd's revision through its JSON gateway.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cohort_proto::GetLeaderRequest;
use cohort_proto::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::scenarios::clip;

pub struct ControllerProc {
    pub name: String,
    pub url: String,
    pub log: PathBuf,
    child: Option<Child>,
    pid: u32,
}

pub struct ControllerArgs<'a> {
    pub name: &'a str,
    pub port: u16,
    pub data_dir: &'a Path,
    /// FIRST-LAST
    pub master_ports: String,
    /// `etcd://...`, or None for the embedded store.
    pub etcd: Option<&'a str>,
    pub leader_ttl: Duration,
    /// Address-space limit in bytes (`prlimit --as`), or None.
    pub memory_limit: Option<u64>,
    /// `taskset -c` CPU list, or None.
    pub cpus: Option<&'a str>,
}

impl ControllerProc {
    pub fn spawn(args: ControllerArgs) -> anyhow::Result<ControllerProc> {
        std::fs::create_dir_all(args.data_dir)?;
        let log = args.data_dir.join(format!("{}.log", args.name));
        let out = File::options().create(true).append(true).open(&log)?;
        // A controller that runs away with memory must not take the shared machine
        // down with it: cap its address space (prlimit execs it, so the pid is its own).
        // taskset and prlimit exec what follows, so the pid is the controller's own.
        let mut wrapper: Vec<String> = Vec::new();
        if let Some(cpus) = args.cpus {
            wrapper.extend(["taskset".into(), "-c".into(), cpus.into()]);
        }
        if let Some(bytes) = args.memory_limit {
            wrapper.extend(["prlimit".into(), format!("--as={bytes}"), "--".into()]);
        }
        let controller = cohort_tests::bin("cohort-controller");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&controller);
                c
            }
            None => Command::new(&controller),
        };
        command
            .args(["--listen", &format!("127.0.0.1:{}", args.port), "--id", args.name])
            .arg("--data-dir")
            .arg(args.data_dir.join(args.name))
            .args(["--master-ports", &args.master_ports])
            // The simulated agents speak plaintext: the figures are the control plane's, not TLS's.
            .arg("--insecure")
            // One client polls every few ms: the job API's per-client rate limit would refuse it.
            .args(["--api-rate-limit", "0"]);
        if let Some(etcd) = args.etcd {
            let ttl = format!("{}ms", args.leader_ttl.as_millis());
            command.args(["--store", etcd, "--leader-ttl", &ttl]);
        }
        let child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting cohort-controller")?;
        Ok(ControllerProc {
            name: args.name.to_string(),
            url: format!("http://127.0.0.1:{}", args.port),
            log,
            pid: child.id(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How it ended, if it has: "exit code N" or "signal N".
    pub fn exited(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => status.to_string(),
        })
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log that look like errors.
    pub fn log_errors(&self, max: usize) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .map(strip_ansi)
            .map(|l| clip(&l, 400))
            .collect();
        lines[lines.len().saturating_sub(max)..].to_vec()
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A JobService client that accepts jobs of any size (a 1,024-node job is megabytes).
pub async fn client(url: &str, within: Duration) -> anyhow::Result<JobServiceClient<Channel>> {
    let deadline = Instant::now() + within;
    loop {
        match JobServiceClient::connect(url.to_string()).await {
            Ok(c) => return Ok(c.max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30)),
            Err(e) if Instant::now() > deadline => bail!("controller {url} not reachable within {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until the controller at `url` says it leads.
pub async fn wait_leading(client: &mut JobServiceClient<Channel>, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(info) = client.get_leader(GetLeaderRequest {}).await
            && info.get_ref().is_leader
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the controller did not lead within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// utime + stime in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("pid {pid} is gone"))?;
    // "pid (comm) state ...": comm may hold spaces, so split after ')'.
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).context("no utime")?;
    let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).context("no stime")?;
    Ok(utime + stime)
}

/// (VmRSS, VmHWM) in KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("pid {pid} is gone"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} for pid {pid}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// USER_HZ, the unit of /proc/<pid>/stat times (100 on every usual Linux).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time of several processes over a window, in cores.
pub struct CpuWindow {
    pids: Vec<u32>,
    ticks: Vec<u64>,
    start: Instant,
}

impl CpuWindow {
    pub fn start(pids: &[u32]) -> anyhow::Result<CpuWindow> {
        let ticks = pids.iter().map(|p| cpu_ticks(*p)).collect::<anyhow::Result<_>>()?;
        Ok(CpuWindow { pids: pids.to_vec(), ticks, start: Instant::now() })
    }

    pub fn cores(&self) -> anyhow::Result<Vec<f64>> {
        let hz = clock_ticks_per_second();
        let elapsed = self.start.elapsed().as_secs_f64();
        self.pids
            .iter()
            .zip(&self.ticks)
            .map(|(pid, before)| Ok((cpu_ticks(*pid)? - before) as f64 / hz / elapsed))
            .collect()
    }
}

/// The highest VmRSS of a process, sampled every 100 ms until `finish` (it
/// outlives VmHWM when the process dies).
pub struct RssSampler {
    max_kib: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let max_kib = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let max = max_kib.clone();
        let task = tokio::spawn(async move {
            while let Ok((rss, _)) = memory_kib(pid) {
                max.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { max_kib, task }
    }

    /// The highest RSS seen, MiB.
    pub fn finish(self) -> f64 {
        self.task.abort();
        self.max_kib.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    }
}

/// /proc/loadavg's 1, 5 and 15 minute averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [v.next().unwrap_or(0.0), v.next().unwrap_or(0.0), v.next().unwrap_or(0.0)]
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Raises the soft limit on open files to at least `want` (up to the hard limit);
/// returns the soft limit now.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 0 };
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

/// The pid of the process whose command line mentions `needle` (e.g. an etcd data dir).
pub fn pid_with_arg(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (pid != std::process::id() && cmdline.contains(needle)).then_some(pid)
    })
}

/// etcd's current revision: every write (put, delete, txn with writes) bumps
/// it; lease grants and keep-alives do not. Read from a range request's header
/// through etcd's JSON gateway.
pub fn etcd_revision(endpoint: &str) -> anyhow::Result<u64> {
    let addr = endpoint.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to etcd at {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    // key "a" (base64 YQ==): any key; only the header matters.
    let body = r#"{"key":"YQ=="}"#;
    let request = format!(
        "POST /v3/kv/range HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let json = response.split_once("\r\n\r\n").map(|(_, b)| b).context("etcd answered without a body")?;
    let value: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("etcd's answer is not JSON: {json}"))?;
    let revision = &value["header"]["revision"];
    revision
        .as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| revision.as_u64())
        .with_context(|| format!("no header.revision in etcd's answer: {json}"))
}

pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub mem_gib: f64,
}

pub fn machine() -> Machine {
    let nproc = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    Machine { nproc, kernel, cpu, mem_gib: mem_kib / 1024.0 / 1024.0 }
}
