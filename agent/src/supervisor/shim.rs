//! The shim: `cohort-agent shim`, one per process of a launch, between the
//! agent and the rank (like containerd-shim or conmon). It lets ranks survive
//! an agent restart:
//!
//! - it calls `setsid`, so it leads a session and process group of its own
//!   that holds the rank too: the agent's death does not reach it, and the
//!   agent stops the rank by signalling the group (pgid = shim pid);
//! - the rank writes its output straight to files (append), never to a pipe
//!   whose reader could die;
//! - it handles SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 by doing nothing (the rank starts with
//!   the default dispositions), so a group SIGTERM stops the rank and the shim
//!   lives to record it;
//! - it writes the rank's exit status to the exit file atomically, then
//!   SIGKILLs its group: what the rank left behind, and itself. When the
//!   launch was being stopped (the agent's stop marker, or a fence), it first
//!   waits for what the rank left to end by itself: those may be saving a
//!   checkpoint ([`wait_for_the_rest_of_a_stopped_launch`]).
//!
//! A SIGKILL to the group kills the shim too: then there is no exit file.
//!
//! One JSON line on the shim's stdout (a pipe the agent reads once) tells the
//! agent the rank's pid, or why it could not be started.
//!
//! The job's environment is everything a submitter controls (`LD_PRELOAD`,
//! `PYTHONPATH`, ...), and the shim and `exec-as` run as root: so it never is
//! their process environment. It arrives as JSON on the shim's stdin
//! ([`JobEnv`]), goes on to `exec-as` the same way, and is applied only to the
//! final exec of the rank, after the switch to the rank's user.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser;
use cohort_proto::now_unix_ms;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::getpgrp;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use super::state::ExitRecord;

/// The first argument that makes `cohort-agent` a shim.
pub const SUBCOMMAND: &str = "shim";

#[derive(Parser, Debug)]
#[command(name = "cohort-agent")]
enum ShimCli {
    /// Runs one process of a launch for the agent (internal).
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(clap::Args, Debug)]
struct ShimArgs {
    /// Where to write the exit status (JSON) once the process has exited.
    #[arg(long)]
    exit_file: PathBuf,
    /// The process's stdout (appended to).
    #[arg(long)]
    stdout: PathBuf,
    /// The process's stderr (appended to).
    #[arg(long)]
    stderr: PathBuf,
    /// A file whose modification time the agent renews whenever a controller
    /// acknowledges it; older than `fence_after_ms` means no agent is in touch
    /// with a controller (even a dead agent): the shim stops the rank itself.
    #[arg(long)]
    lease_file: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    fence_after_ms: u64,
    /// Made by the agent before it signals the group to stop or save: after
    /// the rank's exit, what the rank left is let end by itself.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// SIGTERM-to-SIGKILL grace of a fence stop.
    #[arg(long, default_value_t = 10_000)]
    grace_ms: u64,
    /// Start the process as this user: `uid:gid:group,group` (through
    /// `cohort-agent exec-as`, which drops privileges and execs it).
    #[arg(long)]
    run_as: Option<String>,
    /// Read the process's environment ([`JobEnv`]) from stdin.
    #[arg(long)]
    env_stdin: bool,
    /// The job's cgroup (one directory per hierarchy on cgroup v1): the
    /// process joins it (through `exec-as`) before its exec; the shim stays
    /// outside, so a process at the job's limits cannot stop it recording the exit.
    #[arg(long)]
    cgroup: Vec<PathBuf>,
    /// The process's command line.
    #[arg(last = true, required = true)]
    argv: Vec<OsString>,
}

/// The variables the rank gets on top of the shim's own environment, in order
/// (a later one wins): sent as one JSON document on stdin.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct JobEnv {
    pub vars: Vec<(String, String)>,
}

/// More than this on stdin is refused: a job's env is limited far below it by the API.
const MAX_ENV_BYTES: u64 = 16 << 20;

impl JobEnv {
    /// Reads the whole of stdin (the sender closes it).
    fn read_stdin() -> Result<JobEnv, String> {
        let mut text = Vec::new();
        std::io::stdin()
            .take(MAX_ENV_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("reading the job's environment from stdin: {e}"))?;
        if text.len() as u64 > MAX_ENV_BYTES {
            return Err(format!("the job's environment is over {MAX_ENV_BYTES} bytes"));
        }
        serde_json::from_slice(&text).map_err(|e| format!("the job's environment on stdin is not valid: {e}"))
    }

    /// The JSON the agent and the shim write to the next process's stdin.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"vars\":[]}".to_vec())
    }
}

/// The first argument that makes `cohort-agent` drop to a user and exec a program.
pub const EXEC_AS: &str = "exec-as";

#[derive(Parser, Debug)]
#[command(name = "cohort-agent")]
enum ExecAsCli {
    /// Joins the job's cgroup, becomes `uid:gid:groups` and execs the command
    /// (internal; the shim uses it).
    #[command(hide = true)]
    ExecAs {
        /// The user to become; none: stay who we are.
        #[arg(long)]
        run_as: Option<String>,
        /// The job's cgroup directories to join first (as root, before the switch).
        #[arg(long)]
        cgroup: Vec<PathBuf>,
        /// Read the program's environment ([`JobEnv`]) from stdin before switching user.
        #[arg(long)]
        env_stdin: bool,
        #[arg(last = true, required = true)]
        argv: Vec<OsString>,
    },
}

/// The shim's one-line answer to the agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handshake {
    Started { rank_pid: u32 },
    Failed { error: String },
}

/// Whether this process was started as a shim (checked before anything else runs).
pub fn invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == SUBCOMMAND)
}

/// Whether this process was started as `cohort-agent exec-as`.
pub fn exec_as_invoked() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == EXEC_AS)
}

/// `cohort-agent exec-as`: joins the job's cgroup (so the rank and all it
/// forks count there, and the shim does not), sets the supplementary groups,
/// the group and the user (in that order, while still allowed to), then execs the command in
/// this same process, so the pid the shim reported stays the rank's. The job's
/// environment is applied by that exec only, as the new user, and stdin is
/// /dev/null again. Returns only on failure, with 127 (what a shell gives for
/// a command it cannot run).
pub fn exec_as_main() -> i32 {
    let ExecAsCli::ExecAs { run_as, cgroup, env_stdin, argv } = ExecAsCli::parse();
    let fail = |message: String| {
        eprintln!("cohort-agent exec-as: {message}");
        127
    };
    let env = if env_stdin {
        match JobEnv::read_stdin() {
            Ok(env) => env,
            Err(e) => return fail(e),
        }
    } else {
        JobEnv::default()
    };
    if let Err(e) = crate::cgroup::join(&cgroup) {
        return fail(format!("cannot join the job's cgroup: {e}"));
    }
    if let Some(run_as) = run_as {
        // Another user than the agent's: other users' processes are none of its business.
        if let Err(e) = crate::private_proc::enter() {
            eprintln!("cohort-agent exec-as: {e}");
        }
        if let Err(e) = crate::rank_user::become_user(&run_as) {
            return fail(e.to_string());
        }
    }
    let error = Command::new(&argv[0]).args(&argv[1..]).envs(env.vars).stdin(Stdio::null()).exec();
    fail(format!("{}: {error}", PathBuf::from(&argv[0]).display()))
}

/// Runs the shim; returns its exit status. One thread and no logging: it
/// lives as long as the rank (tokio only installs the signal handlers).
pub fn main() -> i32 {
    let ShimCli::Shim(args) = ShimCli::parse();
    run(args)
}

fn run(args: ShimArgs) -> i32 {
    let mut agent = std::io::stdout();
    let mut answer = |h: Handshake| {
        if let Ok(line) = serde_json::to_string(&h) {
            let _ = writeln!(agent, "{line}");
            let _ = agent.flush();
        }
    };
    let env = if args.env_stdin {
        match JobEnv::read_stdin() {
            Ok(env) => env,
            Err(error) => {
                answer(Handshake::Failed { error: format!("shim: {error}") });
                return 127;
            }
        }
    } else {
        JobEnv::default()
    };
    if let Err(e) = nix::unistd::setsid() {
        answer(Handshake::Failed { error: format!("shim: setsid: {e}") });
        return 127;
    }
    // Descendants whose parent dies are re-parented to the shim, not to init:
    // torchrun's workers (sessions of their own) stay findable below it.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        answer(Handshake::Failed { error: format!("shim: cannot become a child subreaper: {e}") });
        return 127;
    }
    // Handled (by tokio's handler, which does nothing with them), neither
    // blocked nor ignored: exec resets handled signals to their default in the
    // rank, while a blocked mask or an ignored disposition would be inherited.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            answer(Handshake::Failed { error: format!("shim: {e}") });
            return 127;
        }
    };
    let _runtime = runtime.enter();
    // SIGUSR1/2 too: a preemption may ask the rank to save with one (`preempt.signal`).
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    for kind in kinds {
        if let Err(e) = signal(kind) {
            answer(Handshake::Failed { error: format!("shim: cannot handle {kind:?}: {e}") });
            return 127;
        }
    }
    let open = |path: &PathBuf| {
        use std::os::unix::fs::OpenOptionsExt;
        File::options()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("shim: {}: {e}", path.display()))
    };
    let (stdout, stderr) = match (open(&args.stdout), open(&args.stderr)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(error), _) | (_, Err(error)) => {
            answer(Handshake::Failed { error });
            return 127;
        }
    };
    let program = &args.argv[0];
    if let Some(error) = missing_program(program, &env) {
        // exec-as would only say so on the rank's stderr, as an exit 127.
        answer(Handshake::Failed { error });
        return 127;
    }
    let mut command = match args.run_as.is_some() || !args.cgroup.is_empty() {
        // The same binary, as `exec-as`: the rank keeps the pid we report.
        // The environment goes over a pipe: exec-as starts as root.
        true => {
            let mut command = Command::new("/proc/self/exe");
            command.arg0("cohort-agent").arg(EXEC_AS);
            command.args(args.run_as.iter().map(|r| format!("--run-as={r}")));
            command.args(args.cgroup.iter().map(|d| format!("--cgroup={}", d.display())));
            command.arg("--env-stdin").arg("--").args(&args.argv);
            command.stdin(Stdio::piped());
            command
        }
        false => {
            let mut command = Command::new(program);
            command.args(&args.argv[1..]).envs(env.vars.iter().map(|(k, v)| (k, v))).stdin(Stdio::null());
            command
        }
    };
    let spawned = command.stdout(stdout).stderr(stderr).spawn();
    let mut rank = match spawned {
        Ok(child) => child,
        Err(e) => {
            answer(Handshake::Failed { error: format!("{}: {e}", PathBuf::from(program).display()) });
            return 127;
        }
    };
    if let Some(mut pipe) = rank.stdin.take() {
        // exec-as reads it all before it execs; a failure shows as its exit (127) and message.
        let _ = pipe.write_all(&env.to_json());
    }
    let rank_pid = rank.id();
    answer(Handshake::Started { rank_pid });
    let fenced = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(lease) = args.lease_file.clone().filter(|_| args.fence_after_ms > 0) {
        let (after, grace) = (Duration::from_millis(args.fence_after_ms), Duration::from_millis(args.grace_ms));
        let fenced = fenced.clone();
        std::thread::spawn(move || watch_lease(&lease, after, grace, &fenced));
    }
    let status = rank.wait();
    let record = match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            ExitRecord {
                exit_code: status.code(),
                signal: status.signal(),
                ended_unix_ms: now_unix_ms(),
                rank_pid,
                note: if fenced.load(std::sync::atomic::Ordering::SeqCst) {
                    format!(
                        "fenced by its shim: no agent heard a controller for {}",
                        humantime::format_duration(Duration::from_millis(args.fence_after_ms))
                    )
                } else {
                    String::new()
                },
            }
        }
        Err(e) => ExitRecord {
            exit_code: None,
            signal: None,
            ended_unix_ms: now_unix_ms(),
            rank_pid,
            note: format!("exit unknown: the shim could not wait for the process: {e}"),
        },
    };
    let code = match (record.exit_code, record.signal) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 127,
    };
    if let Err(e) = record.write(&args.exit_file) {
        eprintln!("cohort-agent shim: cannot write {}: {e}", args.exit_file.display());
        // Exiting with the rank's code is the only way left to tell the agent.
        kill_rest_of_group();
        return code;
    }
    // The rank's status is on disk (a SIGKILL from the stopping agent during
    // this wait leaves it there); what it left may still be saving.
    if fenced.load(std::sync::atomic::Ordering::SeqCst) || args.stop_file.as_ref().is_some_and(|f| f.exists()) {
        wait_for_the_rest_of_a_stopped_launch();
    }
    // Whatever the rank left goes with it, even with no agent around, and the
    // shim with them: descendants in sessions of their own first (torchrun's
    // workers), then one signal to the group (the exit file already has the status).
    kill_descendants_outside_group();
    let _ = killpg(getpgrp(), Signal::SIGKILL);
    code
}

/// Why `program` cannot be started when it is not there at all (a path that
/// does not exist, or a name on none of the PATH the rank gets), as the
/// spawn would say it; None when it may be there.
fn missing_program(program: &OsString, env: &JobEnv) -> Option<String> {
    let name = PathBuf::from(program);
    let found = if program.as_encoded_bytes().contains(&b'/') {
        name.exists()
    } else {
        let path = env
            .vars
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| OsString::from(v))
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_default();
        std::env::split_paths(&path).any(|dir| dir.join(&name).is_file())
    };
    (!found)
        .then(|| format!("{}: {}", name.display(), std::io::Error::from_raw_os_error(nix::errno::Errno::ENOENT as i32)))
}

/// Stops the rank once the lease is older than `after`: SIGTERM to the group
/// (the shim ignores it), SIGKILL to the others after `grace`. A missing lease
/// file is never stale (an agent that does not keep one).
fn watch_lease(lease: &std::path::Path, after: Duration, grace: Duration, fenced: &std::sync::atomic::AtomicBool) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let age = std::fs::metadata(lease).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age > after) {
            break;
        }
    }
    fenced.store(true, std::sync::atomic::Ordering::SeqCst);
    eprintln!("cohort-agent shim: no agent has heard a controller for {after:?}: fencing, stopping the rank");
    let _ = killpg(getpgrp(), Signal::SIGTERM);
    std::thread::sleep(grace);
    kill_rest_of_group();
}

/// After the rank's exit, when the launch was being stopped (the agent's
/// stop marker, or the shim's own fence): waits for the rest of the launch to
/// end by itself before the shim's SIGKILL. A rank that dies of the signal
/// at once may leave processes that are saving: `megatron sft` is ms-swift's
/// CLI (dies of SIGTERM) above torchrun, which passes the SIGTERM on to its
/// workers (their own sessions) and waits for them while Megatron's
/// exit_signal_handler saves a checkpoint. The agent ends the wait: after the
/// save grace its SIGTERM and SIGKILL reach every process of the launch (the
/// fence, likewise, after its grace).
fn wait_for_the_rest_of_a_stopped_launch() {
    let me = std::process::id();
    while super::proctree::launch_processes(me).into_iter().any(|p| p.pid != me) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLs every other process of this shim's launch: its group and its
/// descendants (found in /proc).
fn kill_rest_of_group() {
    let me = std::process::id();
    // A member may fork while we look: a few rounds catch its children.
    for _ in 0..3 {
        let rest: Vec<u32> =
            super::proctree::launch_processes(me).into_iter().map(|p| p.pid).filter(|&pid| pid != me).collect();
        if rest.is_empty() {
            return;
        }
        for pid in rest {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// SIGKILLs this shim's descendants that are not in its process group.
fn kill_descendants_outside_group() {
    let me = std::process::id();
    for p in super::proctree::launch_processes(me).into_iter().filter(|p| p.pgrp != me) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), Signal::SIGKILL);
    }
}
