#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_proto::{EnvVar, LaunchCommand, ProcessSpec};

use super::*;

fn supervisor() -> (Supervisor, mpsc::Receiver<Outbound>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel(1024);
    (Supervisor::new("test-node".into(), dir.path().into(), tx), rx, dir)
}

fn launch(job: &str, scripts: &[&str], grace_ms: u32) -> LaunchCommand {
    LaunchCommand {
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
