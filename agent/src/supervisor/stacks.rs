//! Python stack dumps of a hung launch, taken before it is stopped: with
//! py-spy when the node has it, otherwise through `faulthandler`, which the
//! trainer registers for SIGUSR1:
//!
//! ```python
//! import faulthandler, signal
//! faulthandler.register(signal.SIGUSR1, all_threads=True)
//! ```
//!
//! SIGUSR1 goes only to processes that catch it (`SigCgt` in /proc), since
//! its default action ends a process. Every process of the launch (the
//! shim's group and descendants, torchrun's workers included) is listed with
//! its state: one stopped (T) or in uninterruptible sleep (D) is named.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{AgentMessage, DumpStacksCommand, ProcessStacks, StackDump, agent_message::Msg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Outbound, Supervisor};

/// How long py-spy may take for one process.
const PY_SPY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long faulthandler gets to write its dump after the signal.
const FAULTHANDLER_WAIT: Duration = Duration::from_millis(1000);
/// Most bytes of dump text kept per process group.
const MAX_DUMP: usize = 256 * 1024;

/// One process of a rank's launch, from /proc.
use super::proctree::Proc as Task;

impl Task {
    fn is_stuck(&self) -> bool {
        matches!(self.state, 'T' | 't' | 'D')
    }
    fn is_python(&self) -> bool {
        let base = self.argv0.rsplit('/').next().unwrap_or_default();
        base.starts_with("python") || self.comm.starts_with("python") || self.comm == "pt_main_thread"
    }
    fn describe(&self) -> String {
        let state = match self.state {
            'R' => "running",
            'S' => "sleeping",
            'D' => "uninterruptible sleep (stuck in the kernel)",
            'T' | 't' => "stopped",
            'Z' => "zombie",
            _ => "other",
        };
        format!("pid {} ({}) {} {state}", self.pid, self.comm, self.state)
    }
}

impl Supervisor {
    /// Sets the py-spy binary used for stack dumps (else faulthandler).
    pub fn set_py_spy(&self, path: Option<PathBuf>) {
        if let Some(path) = path {
            let _ = self.inner.py_spy.set(path);
        }
    }

    /// Dumps the stacks of every live process of a launch and sends the
    /// answer towards the controller.
    pub async fn dump_stacks(&self, command_id: u64, cmd: DumpStacksCommand) {
        let targets: Vec<(u32, u32, PathBuf)> = {
            let launches = self.inner.launches.lock().await;
            match launches.get(&(cmd.job_id.clone(), cmd.attempt)) {
                Some(launch) => launch
                    .processes
                    .iter()
                    .filter(|p| p.exited.is_none() && p.pid > 0)
                    .filter_map(|p| {
                        let files = launch.record.processes.iter().find(|r| r.index == p.index)?;
                        Some((p.index, p.pid, files.files.stderr.clone()))
                    })
                    .collect(),
                None => Vec::new(),
            }
        };
        let py_spy = self.inner.py_spy.get().cloned();
        let dumps = targets.into_iter().map(|(index, group, stderr)| {
            let py_spy = py_spy.clone();
            async move { dump_group(index, group, &stderr, py_spy.as_deref()).await }
        });
        let processes = futures::future::join_all(dumps).await;
        tracing::info!(job = %cmd.job_id, attempt = cmd.attempt, processes = processes.len(), "stack dump taken");
        let msg = AgentMessage {
            msg: Some(Msg::StackDump(StackDump { job_id: cmd.job_id, attempt: cmd.attempt, command_id, processes })),
        };
        let _ = self.inner.out.send(Outbound::Message(msg)).await;
    }
}

/// The py-spy to use: the configured one, else `py-spy` on PATH.
pub fn find_py_spy(configured: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(path) = configured {
        return Some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("py-spy")).find(|p| p.is_file())
}

async fn dump_group(index: u32, group: u32, stderr: &Path, py_spy: Option<&Path>) -> ProcessStacks {
    let tasks = group_tasks(group);
    let stuck_pids: Vec<u32> = tasks.iter().filter(|t| t.is_stuck()).map(|t| t.pid).collect();
    // The shim leads the group; the rank and its children are the rest.
    let pythons: Vec<&Task> = tasks.iter().filter(|t| t.pid != group && t.is_python() && !t.is_stuck()).collect();
    let mut text = String::new();
    for t in tasks.iter().filter(|t| t.is_stuck()) {
        text.push_str(&format!("--- {}: no stack can be taken from a {} process\n", t.describe(), t.state));
    }
    let method = match py_spy {
        Some(py_spy) if !pythons.is_empty() => {
            for t in &pythons {
                text.push_str(&format!("--- {} (py-spy)\n", t.describe()));
                text.push_str(&py_spy_dump(py_spy, t.pid).await);
                text.push('\n');
            }
            "py-spy"
        }
        _ => {
            let registered: Vec<&&Task> = pythons.iter().filter(|t| catches(t.pid, Signal::SIGUSR1)).collect();
            if registered.is_empty() {
                "none"
            } else {
                let offset = std::fs::metadata(stderr).map(|m| m.len()).unwrap_or(0);
                for t in &registered {
                    let _ = kill(Pid::from_raw(t.pid as i32), Signal::SIGUSR1);
                }
                tokio::time::sleep(FAULTHANDLER_WAIT).await;
                let pids: Vec<String> = registered.iter().map(|t| t.pid.to_string()).collect();
                text.push_str(&format!("--- faulthandler (SIGUSR1) of pid {}\n", pids.join(", ")));
                text.push_str(&read_from(stderr, offset));
                "faulthandler"
            }
        }
    };
    if text.len() > MAX_DUMP {
        let mut cut = MAX_DUMP;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[truncated]\n");
    }
    ProcessStacks { index, method: method.into(), text, tasks: tasks.iter().map(Task::describe).collect(), stuck_pids }
}

async fn py_spy_dump(py_spy: &Path, pid: u32) -> String {
    let run =
        tokio::process::Command::new(py_spy).args(["dump", "--pid", &pid.to_string()]).kill_on_drop(true).output();
    match tokio::time::timeout(PY_SPY_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(Ok(out)) => format!(
            "py-spy failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(Err(e)) => format!("cannot run {}: {e}", py_spy.display()),
        Err(_) => format!("py-spy gave no answer within {PY_SPY_TIMEOUT:?}"),
    }
}

/// Every live process of the launch led by `group` (its shim): the group's
/// members and the shim's descendants in sessions of their own (torchrun's workers).
fn group_tasks(group: u32) -> Vec<Task> {
    super::proctree::launch_processes(group)
}

/// Whether the process has a handler for `signal` (SigCgt in /proc/PID/status).
fn catches(pid: u32, signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (signal as i32 - 1)) != 0)
}

fn read_from(path: &Path, offset: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else { return String::new() };
    if file.seek(SeekFrom::Start(offset)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(MAX_DUMP as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sigcgt_tells_which_processes_catch_a_signal() {
        // This test process does not catch SIGUSR1 (its default would end it).
        assert!(!catches(std::process::id(), Signal::SIGUSR1));
    }

    #[tokio::test]
    async fn a_registered_python_dumps_its_stack_and_a_stopped_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("0.err");
        let script = dir.path().join("rank.py");
        std::fs::write(
            &script,
            "import faulthandler, signal, time\n\
             faulthandler.register(signal.SIGUSR1, all_threads=True)\n\
             open(__file__ + '.ready', 'w').close()\n\
             def waiting_for_the_collective():\n    time.sleep(60)\n\
             waiting_for_the_collective()\n",
        )
        .unwrap();
        // A shell leads the group, as the shim does; the rank is its child.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", &format!("python3 {}; true", script.display())])
            .process_group(0)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let group = leader.id();
        let ready = dir.path().join("rank.py.ready");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            assert!(std::time::Instant::now() < deadline, "the rank never started");
            std::thread::sleep(Duration::from_millis(20));
        }

        let dump = dump_group(0, group, &stderr, None).await;
        assert_eq!(dump.method, "faulthandler", "{dump:?}");
        assert!(dump.text.contains("waiting_for_the_collective"), "{}", dump.text);
        assert!(dump.stuck_pids.is_empty());
        assert_eq!(dump.tasks.len(), 2, "{:?}", dump.tasks);

        let rank = group_tasks(group).into_iter().find(Task::is_python).unwrap().pid;
        kill(Pid::from_raw(rank as i32), Signal::SIGSTOP).unwrap();
        while !group_tasks(group).iter().any(Task::is_stuck) {
            assert!(std::time::Instant::now() < deadline, "never seen stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
        let dump = dump_group(0, group, &stderr, None).await;
        assert_eq!(dump.stuck_pids, [rank]);
        assert!(dump.text.contains(&format!("pid {rank} (python3) T stopped")), "{}", dump.text);
        let _ = nix::sys::signal::killpg(Pid::from_raw(group as i32), Signal::SIGKILL);
        let _ = leader.wait();
    }

    use std::os::unix::process::CommandExt;
}
