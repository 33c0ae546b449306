#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_proto::{EnvVar, LaunchCommand, ProcessSpec};

use super::*;

/// The `cohort-agent` binary, which the supervisor runs as its shim. `cargo
/// test -p cohort-agent` builds it (the crate has integration tests).
fn shim_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join("cohort-agent");
    assert!(bin.exists(), "{} not found: run `cargo build -p cohort-agent` first", bin.display());
    bin
}

fn supervisor_in(dir: &Path) -> (Supervisor, mpsc::Receiver<Outbound>) {
    let (tx, rx) = mpsc::channel(1024);
    (Supervisor::with_shim("test-node".into(), dir.into(), tx, shim_binary()), rx)
}

fn supervisor() -> (Supervisor, mpsc::Receiver<Outbound>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (sup, rx) = supervisor_in(dir.path());
    (sup, rx, dir)
}

fn launch(job: &str, scripts: &[&str], grace_ms: u32) -> LaunchCommand {
    LaunchCommand {
        metrics_dir: String::new(),
        user: String::new(),
        job_id: job.into(),
        attempt: 1,
        node_rank: 0,
        workdir: String::new(),
        stop_grace_ms: grace_ms,
        processes: scripts
            .iter()
            .enumerate()
            .map(|(i, s)| ProcessSpec {
                index: i as u32,
                argv: vec!["sh".into(), "-c".into(), s.to_string()],
                env: vec![EnvVar { name: "GREETING".into(), value: "hi".into() }],
                global_rank: None,
            })
            .collect(),
    }
}

/// Collects outbound items until `index`'s exit event arrives.
async fn until_exit(rx: &mut mpsc::Receiver<Outbound>, index: u32) -> (Vec<String>, ProcessExited) {
    let mut lines = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
        match item {
            Outbound::Line { line, .. } if line.process_index == index => lines.push(line.text),
            Outbound::Message(AgentMessage {
                msg: Some(Msg::ProcessEvent(ProcessEvent { index: i, event: Some(Event::Exited(e)), .. })),
            }) if i == index => {
                return (lines, e);
            }
            _ => {}
        }
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive; read the state from /proc.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// SIGKILL is delivered asynchronously: poll until the process is gone.
async fn gone_within(pid: u32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while alive(pid) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

#[tokio::test]
async fn output_lines_arrive_before_the_exit_and_land_in_files() {
    let (sup, mut rx, dir) = supervisor();
    sup.launch(launch("out", &["echo $GREETING; echo oops >&2; exit 4"], 1000)).await.unwrap();
    let (lines, exited) = until_exit(&mut rx, 0).await;
    assert_eq!(exited.exit_code, Some(4));
    assert!(!exited.stopped_by_agent);
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(sorted, ["hi", "oops"]);
    let out = std::fs::read_to_string(dir.path().join("jobs/out/attempt-1/0.out")).unwrap();
    let err = std::fs::read_to_string(dir.path().join("jobs/out/attempt-1/0.err")).unwrap();
    assert_eq!((out.as_str(), err.as_str()), ("hi\n", "oops\n"));
    use std::os::unix::fs::PermissionsExt;
    for file in ["0.out", "0.err"] {
        let mode = std::fs::metadata(dir.path().join("jobs/out/attempt-1").join(file)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: other users' ranks must not read it");
    }
    let record = state::ExitRecord::read(&dir.path().join("jobs/out/attempt-1/0.exit")).unwrap();
    assert_eq!((record.exit_code, record.signal), (Some(4), None), "the shim recorded the exit");
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_sweeps_processes_that_left_the_group() {
    let (sup, mut rx, dir) = supervisor();
    let pidfile = dir.path().join("escaped.pid");
    // The leader ignores SIGTERM; a grandchild escapes the process group with setsid.
    let script = format!(
        "trap '' TERM; setsid sh -c 'echo $$ > {}; exec sleep 600' & while true; do sleep 0.1; done",
        pidfile.display()
    );
    sup.launch(launch("stubborn", &[&script], 300)).await.unwrap();
    let escaped: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok()) {
            break pid;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(alive(escaped));
    let leader = sup.report(false).await[0].processes[0].pid;

    sup.stop("stubborn", 1, Duration::from_millis(300)).await;
    let (_, exited) = until_exit(&mut rx, 0).await;
    assert_eq!(exited.signal, Some(9), "SIGTERM was ignored: only SIGKILL ends it");
    assert!(exited.stopped_by_agent);
    assert!(gone_within(leader, Duration::from_secs(2)).await);
    assert!(gone_within(escaped, Duration::from_secs(2)).await, "the setsid escapee must be swept");
    assert!(sup.report(false).await.is_empty());
    let ended = sup.report(true).await;
    assert_eq!(
        ended[0].processes[0].exited.as_ref().unwrap().signal,
        Some(9),
        "ended launches are remembered for a reconnect"
    );
}

#[tokio::test]
async fn a_preemption_signals_first_and_terms_only_after_the_save_grace() {
    let (sup, mut rx, _dir) = supervisor();
    // Rank 0 saves on SIGUSR1 and exits 0; rank 1 ignores it (and is stopped by the SIGTERM after the grace).
    let saver = "trap 'echo saved; exit 0' USR1; echo ready; while true; do sleep 0.05; done";
    let ignorer = "trap '' USR1; echo ready; while true; do sleep 0.05; done";
    sup.launch(launch("victim", &[saver, ignorer], 5000)).await.unwrap();
    // Both have set their traps.
    let mut ready = std::collections::HashSet::new();
    while ready.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap() {
            Outbound::Line { line, .. } if line.text == "ready" => ready.insert(line.process_index),
            _ => false,
        };
    }
    let save = Some((Signal::SIGUSR1, Duration::from_millis(800)));
    let began = Instant::now();
    let stop = tokio::spawn({
        let sup = sup.clone();
        async move { sup.stop_after("victim", 1, Duration::from_secs(5), save).await }
    });
    let (lines, saved) = until_exit(&mut rx, 0).await;
    assert_eq!(saved.exit_code, Some(0), "{lines:?}");
    assert!(lines.iter().any(|l| l == "saved"), "{lines:?}");
    assert!(saved.stopped_by_agent);
    // Rank 1 outlives the save grace, so its exit comes after rank 0's.
    let (_, stopped) = until_exit(&mut rx, 1).await;
    assert_eq!(stopped.signal, Some(15), "SIGTERM once the save grace was over");
    assert!(began.elapsed() >= Duration::from_millis(800), "the SIGTERM came before the save grace ended");
    stop.await.unwrap();
}

#[tokio::test]
async fn a_rank_that_dies_of_the_save_signal_leaves_its_saving_children_time_to_finish() {
    let (sup, mut rx, dir) = supervisor();
    let saved = dir.path().join("saved");
    // As `megatron sft`: the rank (ms-swift's CLI) dies of SIGTERM at once,
    // while its child (torchrun, Megatron's exit_signal_handler) catches it
    // and takes a while to save before it exits.
    let script = format!(
        "sh -c 'trap \"sleep 0.5; echo saved > {}; exit 0\" TERM; echo ready; while true; do sleep 0.05; done' & wait",
        saved.display()
    );
    sup.launch(launch("saver", &[&script], 5000)).await.unwrap();
    until_line(&mut rx, 0, |l| l == "ready").await;
    let save = Some((Signal::SIGTERM, Duration::from_secs(10)));
    let began = Instant::now();
    let stop = tokio::spawn({
        let sup = sup.clone();
        async move { sup.stop_after("saver", 1, Duration::from_secs(5), save).await }
    });
    let (_, exited) = until_exit(&mut rx, 0).await;
    assert_eq!(exited.signal, Some(15), "the rank's own status: it died of the signal");
    assert!(saved.exists(), "the child was killed with the rank, before it saved");
    assert!(began.elapsed() >= Duration::from_millis(500));
    assert!(began.elapsed() < Duration::from_secs(10), "the exit waited for the save grace instead of the child");
    stop.await.unwrap();
}

#[tokio::test]
async fn what_a_rank_leaves_behind_dies_with_it_when_nothing_stops_the_launch() {
    let (sup, mut rx, dir) = supervisor();
    let pidfile = dir.path().join("child.pid");
    let script = format!("sleep 600 & echo $! > {}; exit 3", pidfile.display());
    sup.launch(launch("leaver", &[&script], 5000)).await.unwrap();
    let (_, exited) = until_exit(&mut rx, 0).await;
    assert_eq!(exited.exit_code, Some(3));
    let child: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    assert!(gone_within(child, Duration::from_secs(2)).await, "the rank's child outlived it");
}

#[tokio::test]
async fn the_sweep_spares_the_same_launch_of_another_agent_on_the_host() {
    // Two agents on one host (two test clusters, or two work dirs), each running
    // attempt 1 of a job with the same id on a node of the same name.
    let (a, mut rx_a, _dir_a) = supervisor();
    let (b, _rx_b, _dir_b) = supervisor();
    a.launch(launch("twin", &["sleep 600"], 300)).await.unwrap();
    b.launch(launch("twin", &["sleep 600"], 300)).await.unwrap();
    let b_leader = b.report(false).await[0].processes[0].pid;
    a.stop("twin", 1, Duration::from_millis(300)).await;
    until_exit(&mut rx_a, 0).await;
    assert!(alive(b_leader), "stopping one agent's launch swept the other agent's process");
    b.stop("twin", 1, Duration::from_millis(300)).await;
    assert!(gone_within(b_leader, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_failing_process_stops_its_siblings_on_the_node_at_once() {
    let (sup, mut rx, _dir) = supervisor();
    sup.launch(launch("ranks", &["exec sleep 600", "exit 7"], 5000)).await.unwrap();
    let (_, failed) = until_exit(&mut rx, 1).await;
    assert_eq!(failed.exit_code, Some(7));
    let (_, sibling) = until_exit(&mut rx, 0).await;
    assert_eq!(sibling.signal, Some(15), "SIGTERM suffices for a well-behaved rank");
    assert!(sibling.stopped_by_agent);
}

#[tokio::test]
async fn a_relaunch_of_the_same_attempt_is_refused_and_a_missing_workdir_named() {
    let (sup, _rx, _dir) = supervisor();
    sup.launch(launch("dup", &["exec sleep 600"], 100)).await.unwrap();
    let err = sup.launch(launch("dup", &["true"], 100)).await.unwrap_err();
    assert!(matches!(err, LaunchError::Duplicate { .. }));
    let mut cmd = launch("nowhere", &["true"], 100);
    cmd.workdir = "/nonexistent/workdir".into();
    let err = sup.launch(cmd).await.unwrap_err().to_string();
    assert_eq!(err, "workdir /nonexistent/workdir does not exist on this node");
    sup.stop_all().await;
    assert!(sup.report(false).await.is_empty());
}

#[tokio::test]
async fn a_program_that_cannot_start_is_reported_with_its_path() {
    let (sup, mut rx, _dir) = supervisor();
    let mut cmd = launch("missing", &["true"], 100);
    cmd.processes[0].argv = vec!["/nonexistent/binary".into()];
    sup.launch(cmd).await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    let Outbound::Message(AgentMessage { msg: Some(Msg::ProcessEvent(ev)) }) = item else { panic!("{item:?}") };
    let Some(Event::SpawnFailed(error)) = ev.event else { panic!("{ev:?}") };
    assert!(error.contains("/nonexistent/binary"), "{error}");
    let exited = sup.report(true).await[0].processes[0].exited.clone().unwrap();
    assert_eq!(exited.exit_code, Some(127));
}

#[tokio::test]
async fn a_shim_killed_alone_takes_its_rank_along_and_the_exit_is_unknown() {
    let (sup, mut rx, dir) = supervisor();
    sup.launch(launch("shimkill", &["exec sleep 600"], 1000)).await.unwrap();
    let shim = sup.report(false).await[0].processes[0].pid;
    let record = LaunchRecord::load(&dir.path().join("jobs/shimkill/attempt-1/launch.json")).unwrap();
    let rank = record.processes[0].rank_pid;
    assert!(rank > 0 && rank != shim && alive(rank));
    nix::sys::signal::kill(Pid::from_raw(shim as i32), Signal::SIGKILL).unwrap();
    let (_, exited) = until_exit(&mut rx, 0).await;
    assert_eq!((exited.exit_code, exited.signal), (None, None));
    assert!(!exited.stopped_by_agent);
    assert!(exited.root_cause.starts_with("exit unknown: the shim was killed"), "{}", exited.root_cause);
    assert!(gone_within(rank, Duration::from_secs(2)).await, "the rank must not outlive its shim");
}

/// Runs `f` on a runtime of its own that is dropped afterwards: every task
/// of a supervisor made there ends, its shims run on (an agent killed -9).
fn in_an_agent_that_dies<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap().block_on(f)
}

/// Lines of process `index` until one satisfies `want`.
async fn until_line(rx: &mut mpsc::Receiver<Outbound>, index: u32, want: impl Fn(&str) -> bool) -> String {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.unwrap().unwrap();
        if let Outbound::Line { line, .. } = item
            && line.process_index == index
            && want(&line.text)
        {
            return line.text;
        }
    }
}

#[test]
fn running_processes_survive_the_agent_and_are_adopted_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let printer = format!(
        "i=0; while [ ! -e {} ]; do i=$((i+1)); echo line $i; sleep 0.05; done; echo bye; exit 0",
        flag.display()
    );
    let pids = in_an_agent_that_dies(async {
        let (sup, mut rx) = supervisor_in(dir.path());
        sup.launch(launch("adopt", &[&printer, "exec sleep 600"], 2000)).await.unwrap();
        until_line(&mut rx, 0, |l| l == "line 2").await;
        sup.report(false).await[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>()
    });

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (sup, mut rx) = supervisor_in(dir.path());
        let recovery = sup.recover().await;
        assert_eq!(recovery, Recovery { adopted: 2, ended: 0, removed: 0 });
        let running = sup.report(true).await;
        assert_eq!(running[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>(), pids, "the same shims");
        assert!(running[0].processes.iter().all(|p| p.exited.is_none()));

        // New output is streamed again, and the exit comes from the shim's exit file.
        let line = until_line(&mut rx, 0, |l| l.starts_with("line ")).await;
        std::fs::write(&flag, "").unwrap();
        let (lines, exited) = until_exit(&mut rx, 0).await;
        assert_eq!(lines.last().map(String::as_str), Some("bye"), "after {line}: {lines:?}");
        assert_eq!((exited.exit_code, exited.signal, exited.stopped_by_agent), (Some(0), None, false));

        // An adopted process is stopped like any other: SIGTERM to its group.
        sup.stop("adopt", 1, Duration::from_secs(5)).await;
        let (_, stopped) = until_exit(&mut rx, 1).await;
        assert_eq!((stopped.signal, stopped.stopped_by_agent), (Some(15), true));
        for pid in pids {
            assert!(gone_within(pid, Duration::from_secs(2)).await);
        }
        assert!(sup.report(false).await.is_empty());
    });
}

#[test]
fn an_exit_while_no_agent_runs_is_reported_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let script = format!("while [ ! -e {} ]; do sleep 0.02; done; echo failing >&2; exit 3", flag.display());
    in_an_agent_that_dies(async {
        let (sup, _rx) = supervisor_in(dir.path());
        sup.launch(launch("away", &[&script], 1000)).await.unwrap();
    });
    std::fs::write(&flag, "").unwrap();
    let exit_file = dir.path().join("jobs/away/attempt-1/0.exit");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !exit_file.exists() {
        assert!(std::time::Instant::now() < deadline, "the shim wrote no exit file");
        std::thread::sleep(Duration::from_millis(10));
    }

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (sup, _rx) = supervisor_in(dir.path());
        assert_eq!(sup.recover().await, Recovery { adopted: 0, ended: 1, removed: 0 });
        assert!(sup.report(false).await.is_empty(), "nothing runs");
        let ended = sup.report(true).await;
        let exited = ended[0].processes[0].exited.clone().unwrap();
        assert_eq!((exited.exit_code, exited.stopped_by_agent), (Some(3), false), "for the Register's `running`");
    });
}

#[tokio::test]
async fn state_of_launches_that_ended_long_ago_is_removed_but_their_output_kept() {
    let (sup, _rx, dir) = supervisor();
    let launch_dir = state::launch_dir(dir.path(), "old", 4);
    std::fs::create_dir_all(&launch_dir).unwrap();
    let files = state::ProcessFiles::new(&launch_dir, 0);
    std::fs::write(&files.stdout, "done\n").unwrap();
    let long_ago = now_unix_ms() - 3_600_000;
    let exit =
        state::ExitRecord { exit_code: Some(0), signal: None, ended_unix_ms: long_ago, rank_pid: 1, note: "".into() };
    exit.write(&files.exit).unwrap();
    let record = LaunchRecord {
        job_id: "old".into(),
        attempt: 4,
        grace_ms: 1000,
        node_name: "test-node".into(),
        boot_id: state::boot_id(),
        stopping_since_unix_ms: None,
        processes: vec![state::ProcessRecord {
            index: 0,
            shim_pid: 0,
            shim_start_ticks: 0,
            rank_pid: 2,
            started_unix_ms: long_ago - 1000,
            spawn_error: None,
            files: files.clone(),
        }],
    };
    record.save(&launch_dir).unwrap();

    assert_eq!(sup.recover().await, Recovery { adopted: 0, ended: 0, removed: 1 });
    assert!(sup.report(true).await.is_empty());
    assert!(!launch_dir.join(state::STATE_FILE).exists() && !files.exit.exists());
    assert_eq!(std::fs::read_to_string(&files.stdout).unwrap(), "done\n", "output stays for FetchLogs");
}
