//! Scenarios of the job and node state machines driven through the
//! controller's own entry points (register, heartbeat, process events,
//! reconcile) on an embedded store, with tokio's clock paused so that node
//! TTLs pass in no time.

#![allow(clippy::unwrap_used)]

use cohort_proto::process_event::Event;
use cohort_proto::{
    Heartbeat, JobState, PrepareResult, ProcessEvent, ProcessPhase, ProcessStarted, RegisterRequest, RunningLaunch,
};

use super::*;
use crate::store::EmbeddedStore;

type Session = mpsc::UnboundedReceiver<Result<ControllerMessage, Status>>;

fn node_info(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        advertise_addr: "127.0.0.1".into(),
        gpus: vec![cohort_proto::GpuInfo { index: 0, ..Default::default() }],
        ..NodeInfo::default()
    }
}

async fn open(dir: &Path) -> Arc<Controller> {
    // A controller dropped just before holds the file until its writer task ends.
    let mut tries = 0;
    let store = loop {
        match EmbeddedStore::open(&dir.join("store")) {
            Ok(store) => break Arc::new(store),
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(error = %e, "state file still held");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    Controller::load(store, dir, ControllerConfig::default()).await.unwrap()
}

/// Registers `node` (reporting `running`) and opens its session.
async fn connect(controller: &Controller, node: &str, running: Vec<RunningLaunch>) -> Session {
    let request = RegisterRequest { node: Some(node_info(node)), running, ..Default::default() };
    let registered = controller.register(request).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    controller.attach(node, &registered.session_id, tx).await.unwrap();
    rx
}

async fn submit(controller: &Controller, yaml: &str) -> String {
    let file = JobFile { yaml: yaml.into(), source_name: "t.yaml".into(), ..JobFile::default() };
    controller.submit(file, Default::default()).await.unwrap().0.id
}

/// The commands a session received since the last call.
fn commands(session: &mut Session) -> Vec<Command> {
    std::iter::from_fn(|| session.try_recv().ok()).filter_map(|m| m.ok().and_then(|m| m.command)).collect()
}

/// The preparation sent to a node since the last look.
fn prepare_sent(session: &mut Session) -> cohort_proto::PrepareCommand {
    commands(session)
        .into_iter()
        .find_map(|c| match c {
            Command::Prepare(p) => Some(p),
            _ => None,
        })
        .unwrap()
}

fn stops(commands: &[Command]) -> usize {
    commands.iter().filter(|c| matches!(c, Command::Stop(_))).count()
}

fn event(job: &str, event: Event) -> ProcessEvent {
    ProcessEvent { job_id: job.into(), attempt: 1, index: 0, event: Some(event) }
}

fn started() -> Event {
    Event::Started(ProcessStarted { pid: 100, started_unix_ms: now_unix_ms(), ..Default::default() })
}

fn exited(exit_code: Option<i32>, signal: Option<i32>) -> ProcessExited {
    ProcessExited { exit_code, signal, stopped_by_agent: signal.is_some(), ..Default::default() }
}

/// Advances the paused clock by `by`, a heartbeat from each of `alive` every 250 ms.
async fn pass(controller: &Controller, by: Duration, alive: &[&str]) {
    let beats: Vec<(&str, Vec<RunningLaunch>)> = alive.iter().map(|n| (*n, Vec::new())).collect();
    pass_reporting(controller, by, &beats).await;
}

/// [`pass`], each node's heartbeats reporting the launches it runs.
async fn pass_reporting(controller: &Controller, by: Duration, beats: &[(&str, Vec<RunningLaunch>)]) {
    // The sweep's own tick: silence counts only in time the controller ran on schedule.
    let step = Duration::from_millis(250);
    let mut passed = Duration::ZERO;
    while passed < by {
        tokio::time::advance(step).await;
        passed += step;
        for (node, running) in beats {
            controller.heartbeat(node, Heartbeat { running: running.clone(), ..Heartbeat::default() }).await;
        }
        controller.reconcile().await.unwrap();
    }
}

/// A launch of attempt 1 whose process 0 still runs.
fn running_launch(job: &str) -> Vec<RunningLaunch> {
    let process = cohort_proto::RunningProcess { index: 0, pid: 100, ..Default::default() };
    vec![RunningLaunch { job_id: job.into(), attempt: 1, processes: vec![process] }]
}

async fn stored(controller: &Controller, id: &str) -> Job {
    controller.flush_store().await;
    let record = controller.store.get(&format!("jobs/{id}")).await.unwrap().unwrap();
    JobRecord::decode(record.value.as_slice()).unwrap().job.unwrap()
}

/// Nodes n0 and n1 connected, a 2-node command job launched on them and both
/// ranks reported started; time paused from the launch on.
async fn running_gang(controller: &Controller) -> (Vec<Session>, String) {
    let mut sessions = Vec::new();
    for node in ["n0", "n1"] {
        sessions.push(connect(controller, node, Vec::new()).await);
    }
    let id = submit(controller, "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sleep, '100']\n").await;
    tokio::time::pause();
    controller.reconcile().await.unwrap();
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, started())).await;
    }
    (sessions, id)
}

#[tokio::test]
async fn a_node_lost_during_preparation_fails_the_attempt_and_stops_the_others_preparation() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut n0 = connect(&controller, "n0", Vec::new()).await;
    let _n1 = connect(&controller, "n1", Vec::new()).await;
    let yaml = "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\nshared_paths: [/data]\ncommand: [sleep, '100']\n";
    let id = submit(&controller, yaml).await;
    // Submitted with the clock running: checking a job file has a real deadline.
    tokio::time::pause();
    controller.reconcile().await.unwrap();
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Preparing as i32);
    assert!(commands(&mut n0).iter().any(|c| matches!(c, Command::Prepare(_))));
    let result = || PrepareResult { job_id: id.clone(), attempt: 1, ..PrepareResult::default() };
    controller.prepare_result("n0", result()).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Preparing as i32, "n1 has not answered");

    // n1 falls silent; n0 heartbeats on.
    pass(&controller, controller.config.node_ttl + Duration::from_secs(1), &["n0"]).await;

    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Failed as i32, "{}", job.reason);
    assert!(job.reason.starts_with("node n1 (node rank 1) lost: no heartbeat for"), "{}", job.reason);
    let failure = job.failure.as_ref().unwrap();
    assert_eq!((failure.node_name.as_str(), failure.node_rank, failure.cause.as_str()), ("n1", 1, "node_lost"));
    assert!(job.finished_unix_ms > 0);
    assert_eq!(job.attempts[0].state, JobState::Failed as i32, "the attempt is closed");
    assert!(job.processes.is_empty(), "nothing was launched");
    assert_eq!(stops(&commands(&mut n0)), 1, "n0's preparation is stopped");
    assert_eq!(stored(&controller, &id).await.state, JobState::Failed as i32, "the failure is durable");

    // n1's answer arrives late: the attempt is over, nothing launches.
    controller.prepare_result("n1", result()).await;
    let after = controller.get(&id).await.unwrap();
    assert_eq!(after.state, JobState::Failed as i32);
    assert!(!commands(&mut n0).iter().any(|c| matches!(c, Command::Launch(_))));
}

/// An input without `sha256:` that two nodes staged as different content
/// (its source changed while they read it) refuses the launch, naming
/// both digests and their nodes; the same content on both launches.
#[tokio::test]
async fn an_input_staged_as_different_content_on_two_nodes_refuses_the_launch() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut n0 = connect(&controller, "n0", Vec::new()).await;
    let _n1 = connect(&controller, "n1", Vec::new()).await;
    let yaml = "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\nstage: [{name: data, source: /data/set}]\n\
                restart: {max_restarts: 0}\ncommand: [sleep, '100']\n";
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    let staged = |id: &str, attempt: u32, digest: &str| PrepareResult {
        job_id: id.into(),
        attempt,
        staged: vec![cohort_proto::StagedInput { name: "data".into(), sha256: digest.into(), ..Default::default() }],
        ..PrepareResult::default()
    };

    let id = submit(&controller, yaml).await;
    controller.reconcile().await.unwrap();
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Preparing as i32);
    controller.prepare_result("n0", staged(&id, 1, &a)).await;
    controller.prepare_result("n1", staged(&id, 1, &b)).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Failed as i32, "{}", job.reason);
    let want =
        format!("stage input data is not the same content on every node ({} on n0; {} on n1)", &a[..12], &b[..12]);
    assert!(job.reason.contains(&want), "{}", job.reason);
    assert!(job.reason.contains("pin it with `sha256:`"), "{}", job.reason);
    assert!(!commands(&mut n0).iter().any(|c| matches!(c, Command::Launch(_))), "nothing launched");

    let same = submit(&controller, &yaml.replace("name: t", "name: same")).await;
    controller.reconcile().await.unwrap();
    controller.prepare_result("n0", staged(&same, 1, &a)).await;
    controller.prepare_result("n1", staged(&same, 1, &a)).await;
    assert!(commands(&mut n0).iter().any(|c| matches!(c, Command::Launch(_))), "the same content launches");
}

/// With `--topology-label rack`, a pinned input on a gang over two racks:
/// the node reading the source feeds its own rack, whose other node asks
/// only its rack; in the other rack one node (its first) fetches from
/// everyone and its rack-mate only from it.
#[tokio::test]
async fn with_a_topology_label_staged_content_enters_each_rack_through_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let config = ControllerConfig { topology_label: "rack".into(), ..ControllerConfig::default() };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let rack = |name: &str| if name < "n2" { "r1" } else { "r2" };
    let mut sessions = Vec::new();
    for name in ["n0", "n1", "n2", "n3"] {
        let labels = [("rack".to_owned(), rack(name).to_owned())].into();
        let node = NodeInfo { peer_port: 7071, labels, ..node_info(name) };
        let registered = controller.register(RegisterRequest { node: Some(node), ..Default::default() }).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        controller.attach(name, &registered.session_id, tx).await.unwrap();
        sessions.push((name, rx));
    }
    let yaml = format!(
        "name: t\nkind: command\nnodes: 4\ngpus_per_node: 1\nstage: [{{name: data, source: /data/set, sha256: {}}}]\n\
         command: [sleep, '100']\n",
        "c".repeat(64)
    );
    submit(&controller, &yaml).await;
    controller.reconcile().await.unwrap();
    let mut peers = std::collections::BTreeMap::new();
    for (name, session) in sessions.iter_mut() {
        let prepare = prepare_sent(session);
        let names: Vec<String> = prepare.stage[0].peers.iter().map(|p| p.node_name.clone()).collect();
        peers.insert(*name, names);
    }
    let reader = *peers.iter().find(|(_, p)| p.is_empty()).unwrap().0;
    assert_eq!(rack(reader), "r1", "the first node reads the source: {peers:?}");
    let mate = if reader == "n0" { "n1" } else { "n0" };
    assert_eq!(peers[mate], [reader.to_owned()], "fed by its rack's reader: {peers:?}");
    assert_eq!(peers["n2"], ["n0", "n1", "n3"], "r2's leader fetches from every rack: {peers:?}");
    assert_eq!(peers["n3"], ["n2"], "r2's other node, from its leader: {peers:?}");
}

/// An input without `sha256:` (a directory, a file or a URL) on a gang
/// whose nodes serve peers: one node reads the source, the others wait for
/// the digest it finds and are then sent it with the peers to fetch it from
/// (the reader and each other); when the reader fails the input, they are
/// told to read the source.
#[tokio::test]
async fn an_input_without_a_digest_is_read_by_one_node_and_its_digest_sent_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut sessions = Vec::new();
    for name in ["n0", "n1", "n2"] {
        let node = NodeInfo { peer_port: 7071, ..node_info(name) };
        let registered = controller.register(RegisterRequest { node: Some(node), ..Default::default() }).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        controller.attach(name, &registered.session_id, tx).await.unwrap();
        sessions.push((name, rx));
    }
    let yaml = "name: t\nkind: command\nnodes: 3\ngpus_per_node: 1\nstage: [{name: data, source: /data/set}, \
                {name: page, source: 'https://files.example/p.txt'}]\nrestart: {max_restarts: 0}\ncommand: [sleep, '100']\n";
    let digest = "c".repeat(64);
    let staged = |id: &str, digest: &str, error: &str| PrepareResult {
        job_id: id.into(),
        attempt: 1,
        staged: vec![
            cohort_proto::StagedInput {
                name: "data".into(),
                sha256: digest.into(),
                error: error.into(),
                path: format!("/cache/sha256/{digest}"),
                ..Default::default()
            },
            // The URL, a file: its own digest, the file in its content directory.
            cohort_proto::StagedInput {
                name: "page".into(),
                sha256: if error.is_empty() { "d".repeat(64) } else { String::new() },
                error: error.into(),
                path: format!("/cache/sha256/{}/p.txt", "d".repeat(64)),
                ..Default::default()
            },
        ],
        ..PrepareResult::default()
    };
    // Which nodes wait for the digest, and what each was sent.
    let prepared = |sessions: &mut Vec<(&'static str, Session)>| {
        let mut waiting = Vec::new();
        let mut reader = None;
        for (name, session) in sessions.iter_mut() {
            let prepare = prepare_sent(session);
            let data = prepare.stage.iter().find(|s| s.name == "data").unwrap();
            let page = prepare.stage.iter().find(|s| s.name == "page").unwrap();
            assert_eq!(page.awaits_digest, data.awaits_digest, "a URL too is read by one node, the others wait");
            if data.awaits_digest { waiting.push(*name) } else { reader = Some(*name) }
        }
        (reader.unwrap(), waiting)
    };
    let digests = |sessions: &mut Vec<(&'static str, Session)>, node: &str| -> Vec<cohort_proto::StageDigestCommand> {
        let session = &mut sessions.iter_mut().find(|(n, _)| *n == node).unwrap().1;
        commands(session)
            .into_iter()
            .filter_map(|c| match c {
                Command::StageDigest(d) => Some(d),
                _ => None,
            })
            .collect()
    };

    let id = submit(&controller, yaml).await;
    controller.reconcile().await.unwrap();
    let (reader, waiting) = prepared(&mut sessions);
    assert_eq!(waiting.len(), 2, "one node reads the source (--max-source-pulls 1), two wait");
    // A waiting node that reports first changes nothing for the others.
    controller.prepare_result(waiting[0], staged(&id, &digest, "")).await;
    assert!(digests(&mut sessions, waiting[1]).is_empty(), "only the reader answers");
    // The reader's progress: copying tells nothing, ready tells the digest.
    let progress = |id: &str, state: &str, digest: &str, path: &str| cohort_proto::StageProgress {
        job_id: id.into(),
        attempt: 1,
        status: Some(cohort_proto::StageStatus {
            node_name: "spoofed".into(),
            item: "data".into(),
            state: state.into(),
            sha256: digest.into(),
            path: path.into(),
            ..Default::default()
        }),
    };
    controller.stage_progress(reader, progress(&id, "copying", "", "")).await;
    assert!(digests(&mut sessions, waiting[1]).is_empty(), "nothing found yet");
    // A waiting node says so; status names whom it waits for.
    controller.stage_progress(waiting[0], progress(&id, "waiting", "", "")).await;
    let job = controller.get(&id).await.unwrap();
    let shown = job.staging.iter().find(|s| s.node_name == waiting[0]).unwrap();
    assert_eq!(shown.detail, format!("for {reader} to read the source"));
    let content = format!("/cache/sha256/{digest}");
    controller.stage_progress(reader, progress(&id, "ready", &digest, &content)).await;
    for node in &waiting {
        let sent = digests(&mut sessions, node);
        assert_eq!(sent.len(), 1, "{node}: {sent:?}");
        assert_eq!((sent[0].job_id.as_str(), sent[0].attempt, sent[0].item.as_str()), (id.as_str(), 1, "data"));
        assert_eq!(sent[0].sha256, digest);
        let mut peers: Vec<&str> = sent[0].peers.iter().map(|p| p.node_name.as_str()).collect();
        peers.sort();
        let mut want: Vec<&str> = [reader].into_iter().chain(waiting.iter().copied()).filter(|n| n != node).collect();
        want.sort();
        assert_eq!(peers, want, "{node} fetches from the reader and the other waiting node");
        assert!(sent[0].peers.iter().all(|p| p.address == "127.0.0.1:7071"), "{:?}", sent[0].peers);
    }
    let job = controller.get(&id).await.unwrap();
    assert!(job.staging.iter().any(|s| s.node_name == reader && s.sha256 == digest), "{:?}", job.staging);
    // Its result comes later: answered once only.
    controller.prepare_result(reader, staged(&id, &digest, "")).await;
    // The data answered once; the URL (a file) now, with peers: it travels too.
    for node in &waiting {
        let sent = digests(&mut sessions, node);
        assert_eq!(sent.len(), 1, "{node}: {sent:?}");
        assert_eq!((sent[0].item.as_str(), sent[0].sha256.clone()), ("page", "d".repeat(64)));
        assert!(sent[0].peers.iter().any(|p| p.node_name == reader), "{:?}", sent[0]);
    }

    // The reader fails the input: the waiting nodes read the source themselves.
    controller.cancel(&id).await.unwrap();
    let again = submit(&controller, &yaml.replace("name: t", "name: again")).await;
    controller.reconcile().await.unwrap();
    let (reader, waiting) = prepared(&mut sessions);
    controller.prepare_result(reader, staged(&again, "", "staging failed: no such directory")).await;
    for node in &waiting {
        let sent = digests(&mut sessions, node);
        assert_eq!(sent.len(), 2, "data and page: {node}: {sent:?}");
        assert!(sent.iter().all(|d| d.sha256.is_empty() && d.peers.is_empty()), "read the source: {sent:?}");
    }

    // The source is a file where the reader is: it travels as a directory
    // does (the file in its content directory), from the reader and each other.
    controller.cancel(&again).await.unwrap();
    let file = submit(&controller, &yaml.replace("name: t", "name: file")).await;
    controller.reconcile().await.unwrap();
    let (reader, waiting) = prepared(&mut sessions);
    let at = format!("/cache/sha256/{digest}/set");
    controller.stage_progress(reader, progress(&file, "ready", &digest, &at)).await;
    for node in &waiting {
        let sent = digests(&mut sessions, node);
        assert_eq!(sent.len(), 1, "{node}: {sent:?}");
        assert_eq!(sent[0].sha256, digest);
        assert_eq!(sent[0].peers.len(), 2, "the reader and the other waiting node: {:?}", sent[0]);
    }
}

#[tokio::test]
async fn exits_while_a_cancelled_gang_stops_leave_it_cancelled_and_stops_are_resent_until_all_exited() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let (mut sessions, id) = running_gang(&controller).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Running as i32);
    let cancelled = controller.cancel(&id).await.unwrap();
    let finished = cancelled.finished_unix_ms;
    assert!(finished > 0);
    for session in &mut sessions {
        assert_eq!(stops(&commands(session)), 1, "every node gets a stop");
    }

    // n0's rank dies of the SIGTERM with a failing status: the job stays cancelled.
    controller.process_event("n0", event(&id, Event::Exited(exited(Some(1), None)))).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled as i32);
    assert_eq!(job.reason, "cancelled by the user; stopping every process");
    assert!(job.failure.is_none(), "an exit during the stop is no failure");
    assert_eq!((job.live_processes, job.finished_unix_ms), (1, finished));

    // n1 is slow to stop: its stop is sent again, n0 (no live process) gets none.
    for node in ["n0", "n1"] {
        let running = if node == "n1" { running_launch(&id) } else { Vec::new() };
        controller.heartbeat(node, Heartbeat { running, ..Heartbeat::default() }).await;
    }
    tokio::time::advance(controller.config.stop_resend + Duration::from_millis(1)).await;
    controller.reconcile().await.unwrap();
    assert_eq!(stops(&commands(&mut sessions[0])), 0);
    assert_eq!(stops(&commands(&mut sessions[1])), 1, "the stop is resent");

    controller.process_event("n1", event(&id, Event::Exited(exited(None, Some(15))))).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!((job.state, job.live_processes), (JobState::Cancelled as i32, 0));
    assert!(job.processes.iter().all(|p| p.phase == ProcessPhase::Exited as i32));
    assert_eq!(job.attempts[0].state, JobState::Cancelled as i32);
    let stored = stored(&controller, &id).await;
    assert_eq!((stored.state, stored.live_processes), (JobState::Cancelled as i32, 0), "the last exit is durable");
}

#[tokio::test]
async fn a_rank_failure_is_not_overwritten_by_the_exits_of_the_ranks_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let (mut sessions, id) = running_gang(&controller).await;
    controller.process_event("n1", event(&id, Event::Exited(exited(Some(3), None)))).await;
    let failed = controller.get(&id).await.unwrap();
    assert_eq!(failed.state, JobState::Failed as i32);
    assert_eq!(failed.failure.as_ref().unwrap().node_name, "n1");
    assert_eq!(stops(&commands(&mut sessions[0])), 1, "the rest of the gang is stopped");

    controller.process_event("n0", event(&id, Event::Exited(exited(None, Some(15))))).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Failed as i32);
    assert_eq!(job.failure, failed.failure, "the first failure stands");
    assert_eq!((job.reason, job.finished_unix_ms), (failed.reason, failed.finished_unix_ms));
    assert_eq!(job.live_processes, 0);
}

#[tokio::test]
async fn exits_not_yet_persisted_when_the_controller_restarts_come_back_with_the_agents() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let controller = open(dir.path()).await;
        let _sessions = (connect(&controller, "n0", Vec::new()).await, connect(&controller, "n1", Vec::new()).await);
        let id =
            submit(&controller, "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sleep, '100']\n").await;
        controller.reconcile().await.unwrap();
        for node in ["n0", "n1"] {
            controller.process_event(node, event(&id, started())).await;
        }
        // n0's rank finishes; with n1's still running that changes no state and is not persisted.
        controller.process_event("n0", event(&id, Event::Exited(exited(Some(0), None)))).await;
        let stored = stored(&controller, &id).await;
        assert_eq!((stored.state, stored.live_processes), (JobState::Running as i32, 2), "the exit is in memory only");
        id
        // The controller dies here, before n1's exit arrives.
    };

    let controller = open(dir.path()).await;
    tokio::time::pause();
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Running as i32);
    // Both agents reconnect reporting what ended while no controller listened.
    let report = |code| {
        let process = cohort_proto::RunningProcess {
            index: 0,
            pid: 100,
            exited: Some(exited(Some(code), None)),
            ..Default::default()
        };
        vec![RunningLaunch { job_id: id.clone(), attempt: 1, processes: vec![process] }]
    };
    let _n0 = connect(&controller, "n0", report(0)).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Running as i32, "n1's rank may still run");
    let _n1 = connect(&controller, "n1", report(0)).await;

    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.reason);
    assert_eq!(job.live_processes, 0);
    assert_eq!(job.attempts[0].state, JobState::Succeeded as i32);
    assert_eq!(stored(&controller, &id).await.state, JobState::Succeeded as i32, "and it is durable");
    pass(&controller, Duration::from_secs(3), &["n0", "n1"]).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Succeeded as i32);
}

#[tokio::test]
async fn a_node_lost_while_running_restarts_the_job_without_it_after_the_old_gang_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut sessions = HashMap::new();
    for node in ["n0", "n1", "n2"] {
        sessions.insert(node, connect(&controller, node, Vec::new()).await);
    }
    let yaml = "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 1s\ncommand: [sleep, '100']\n\
                restart: {max_restarts: 1, backoff: 1ms, on: [node_lost], exclude_failed_nodes: true}\n";
    let id = submit(&controller, yaml).await;
    tokio::time::pause();
    controller.reconcile().await.unwrap();
    let first = controller.get(&id).await.unwrap();
    let placed: Vec<String> = first.plan.as_ref().unwrap().nodes.iter().map(|a| a.node_name.clone()).collect();
    for node in &placed {
        controller.process_event(node, event(&id, started())).await;
    }
    let (survivor, lost) = (placed[0].as_str(), placed[1].as_str());
    let spare = ["n0", "n1", "n2"].into_iter().find(|n| !placed.iter().any(|p| p == n)).unwrap();
    for session in sessions.values_mut() {
        commands(session);
    }

    let beats = [(survivor, running_launch(&id)), (spare, Vec::new())];
    pass_reporting(&controller, controller.config.node_ttl + Duration::from_secs(1), &beats).await;
    let restarting = controller.get(&id).await.unwrap();
    assert_eq!(restarting.state, JobState::Restarting as i32, "{}", restarting.reason);
    assert!(
        restarting.reason.starts_with("restart 1 of 1 in 1ms: attempt 1 failed (node_lost)"),
        "{}",
        restarting.reason
    );
    assert_eq!(restarting.finished_unix_ms, 0, "not finished while a restart comes");
    assert_eq!(restarting.excluded_nodes, [lost]);
    assert_eq!(restarting.attempts[0].state, JobState::Failed as i32);
    assert_eq!(restarting.live_processes, 1, "the survivor's rank still runs");
    assert!(restarting.not_before_unix_ms > now_unix_ms(), "held until the lost node's ranks are surely fenced");
    assert!(stops(&commands(sessions.get_mut(survivor).unwrap())) >= 1, "the survivor is told to stop");

    // The old gang must be gone before anything is placed again.
    pass_reporting(&controller, Duration::from_secs(5), &beats).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Restarting as i32);
    controller.process_event(survivor, event(&id, Event::Exited(exited(None, Some(15))))).await;
    controller.reconcile().await.unwrap();
    let queued = controller.get(&id).await.unwrap();
    assert_eq!((queued.state, queued.attempt), (JobState::Pending as i32, 1), "{}", queued.reason);

    // The fence hold is wall-clock time (the lost node's ranks stop by its clock).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while controller.get(&id).await.unwrap().attempt < 2 {
        assert!(std::time::Instant::now() < deadline, "attempt 2 never started");
        std::thread::sleep(Duration::from_millis(100));
        pass(&controller, Duration::from_secs(1), &[survivor, spare]).await;
    }
    let second = controller.get(&id).await.unwrap();
    let mut nodes: Vec<&str> = second.plan.as_ref().unwrap().nodes.iter().map(|a| a.node_name.as_str()).collect();
    nodes.sort_unstable();
    let mut expected = vec![survivor, spare];
    expected.sort_unstable();
    assert_eq!(nodes, expected, "placed again without the lost node");
    assert_eq!(second.state, JobState::Starting as i32);
    assert_eq!((second.finished_unix_ms, second.attempts.len()), (0, 2));
    assert_eq!(second.attempts[0].failure.as_ref().unwrap().cause, "node_lost", "attempt 1 keeps its failure");
    assert!(second.failure.is_none(), "the new attempt has none yet");
    assert_eq!(second.live_processes, 2);
}

/// Issue 19: a lost node's fence deadline holds the next attempt only until
/// the node shows its ranks gone: back, registered again, and reporting none
/// of the job's processes. While it still runs one, the hold stays.
#[tokio::test]
async fn a_lost_node_back_without_the_jobs_processes_releases_its_fence_hold() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let fenced = || NodeInfo { fence_after_ms: 60_000, ..node_info("n1") };
    let _n0 = connect(&controller, "n0", Vec::new()).await;
    let registered = controller.register(RegisterRequest { node: Some(fenced()), ..Default::default() }).await.unwrap();
    let (tx, _n1) = mpsc::unbounded_channel();
    controller.attach("n1", &registered.session_id, tx).await.unwrap();
    let yaml = "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 1s\ncommand: [sleep, '100']\n\
                restart: {max_restarts: 1, backoff: 1ms, on: [node_lost]}\n";
    let id = submit(&controller, yaml).await;
    tokio::time::pause();
    controller.reconcile().await.unwrap();
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, started())).await;
    }

    // n1 goes silent: lost, and the next attempt held for its 60 s fence.
    pass_reporting(&controller, controller.config.node_ttl + Duration::from_secs(1), &[("n0", running_launch(&id))])
        .await;
    controller.process_event("n0", event(&id, Event::Exited(exited(None, Some(15))))).await;
    pass(&controller, Duration::from_secs(1), &["n0"]).await;
    let held = controller.get(&id).await.unwrap();
    assert_eq!((held.state, held.attempt), (JobState::Pending as i32, 1), "{}", held.reason);
    assert!(held.not_before_unix_ms > now_unix_ms() + 50_000, "held for n1's fence: {}", held.reason);

    // n1 is back but still runs the old rank: the hold stays, and the rank is stopped.
    let request = RegisterRequest { node: Some(fenced()), running: running_launch(&id), ..Default::default() };
    let registered = controller.register(request).await.unwrap();
    let (tx, mut n1) = mpsc::unbounded_channel();
    controller.attach("n1", &registered.session_id, tx).await.unwrap();
    pass_reporting(&controller, Duration::from_secs(1), &[("n0", Vec::new()), ("n1", running_launch(&id))]).await;
    let still = controller.get(&id).await.unwrap();
    assert!(still.not_before_unix_ms > now_unix_ms() + 50_000, "n1 still runs the job's rank");
    assert_eq!(still.attempt, 1);
    assert!(stops(&commands(&mut n1)) >= 1, "the old rank on n1 is told to stop");

    // Its rank gone, n1 proves the fence: attempt 2 is placed at once, on both nodes again.
    pass(&controller, Duration::from_secs(1), &["n0", "n1"]).await;
    let second = controller.get(&id).await.unwrap();
    assert_eq!(second.attempt, 2, "{}", second.reason);
    assert!(second.not_before_unix_ms < now_unix_ms() + 50_000);
    let mut nodes: Vec<&str> = second.plan.as_ref().unwrap().nodes.iter().map(|a| a.node_name.as_str()).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["n0", "n1"]);
}

/// A submit answered by a controller that lost the lead just after its store
/// write lands after the new leader loaded the store: the new leader takes
/// the job from the store when asked for it (or when its store watch sees
/// it), so the id the client was given is never "no job"; a job this
/// controller deleted is not brought back by a late event.
#[tokio::test]
async fn a_job_stored_after_the_load_is_taken_from_the_store_when_asked_for() {
    use crate::store::Expect;
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let id = submit(&controller, "name: t\nkind: command\nnodes: 1\ncommand: ['true']\n").await;
    let mut record =
        JobRecord::decode(controller.store.get(&format!("jobs/{id}")).await.unwrap().unwrap().value.as_slice())
            .unwrap();
    // What the old leader wrote: a job this controller never held.
    record.seq = 41;
    record.job.as_mut().unwrap().id = "t-41".into();
    controller.store.put("jobs/t-41", record.encode_to_vec(), Expect::Absent).await.unwrap();
    let taken = controller.get("t-41").await.unwrap();
    assert_eq!((taken.id.as_str(), taken.state), ("t-41", JobState::Pending as i32));
    let next = submit(&controller, "name: t\nkind: command\nnodes: 1\ncommand: ['true']\n").await;
    assert_eq!(next, "t-42", "its seq is not handed out again");
    assert!(controller.list(false).await.iter().any(|j| j.id == "t-41"));

    // A record of a job this controller deleted, seen late, stays deleted.
    record.job.as_mut().unwrap().id = "t-40".into();
    controller.state.call(|state, _| state.deleted_jobs.insert("t-40".into(), Instant::now())).await;
    let revision = controller.store.put("jobs/t-40", record.encode_to_vec(), Expect::Absent).await.unwrap();
    controller.stored_job("jobs/t-40", &record.encode_to_vec(), revision).await;
    assert!(controller.get("t-40").await.is_err());
}

/// The embedded store, whose writes of keys under a held prefix wait at the
/// store until released; records every write it makes, in order.
struct HeldStore {
    inner: EmbeddedStore,
    held: tokio::sync::watch::Sender<Option<&'static str>>,
    /// Writes held when this is set fail on release, unwritten (the controller died first).
    lose_held: std::sync::atomic::AtomicBool,
    waiting: std::sync::atomic::AtomicUsize,
    written: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
}

impl HeldStore {
    fn open(dir: &Path) -> Arc<HeldStore> {
        Arc::new(HeldStore {
            inner: EmbeddedStore::open(&dir.join("store")).unwrap(),
            held: tokio::sync::watch::channel(None).0,
            lose_held: false.into(),
            waiting: 0.into(),
            written: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Waits until `n` writes wait at the store.
    async fn until_waiting(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.waiting.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "no write reached the store");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn written(&self, key: &str) -> Vec<Vec<u8>> {
        self.written.lock().unwrap().iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }
}

#[async_trait::async_trait]
impl Store for HeldStore {
    async fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, crate::store::StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, crate::store::Versioned)>, crate::store::StoreError> {
        self.inner.list(prefix).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, expect: Expect) -> Result<u64, crate::store::StoreError> {
        let mut held = self.held.subscribe();
        if held.borrow().is_some_and(|prefix| key.starts_with(prefix)) {
            self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = held.wait_for(|h| !h.is_some_and(|prefix| key.starts_with(prefix))).await;
            if self.lose_held.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::store::StoreError::Backend(format!("{key}: the controller died before writing it")));
            }
        }
        self.written.lock().unwrap().push((key.to_string(), value.clone()));
        self.inner.put(key, value, expect).await
    }
    async fn delete(&self, key: &str, expect: Expect) -> Result<(), crate::store::StoreError> {
        self.inner.delete(key, expect).await
    }
    async fn watch(&self, prefix: &str, from: u64) -> Result<crate::store::WatchStream, crate::store::StoreError> {
        self.inner.watch(prefix, from).await
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future).await.unwrap_or_else(|_| panic!("{what}: no answer in 10 s"))
}

/// A submit whose record is still on its way to the store is answered only
/// once it is stored; meanwhile heartbeats are acked and reads answered.
#[tokio::test]
async fn heartbeats_and_reads_are_answered_while_a_submits_write_waits_at_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = HeldStore::open(dir.path());
    let controller = Controller::load(store.clone(), dir.path(), ControllerConfig::default()).await.unwrap();
    let _n0 = connect(&controller, "n0", Vec::new()).await;
    store.held.send_replace(Some("jobs/"));
    let submitting = tokio::spawn({
        let controller = controller.clone();
        async move { submit(&controller, "name: t\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: ['true']\n").await }
    });
    store.until_waiting(1).await;

    // A GPU turning unhealthy queues the node's record behind the held job write; the heartbeat does not wait.
    let unhealthy = cohort_proto::GpuHealth {
        state: cohort_proto::GpuHealthState::Unhealthy as i32,
        reasons: vec!["xid 79".into()],
        ..Default::default()
    };
    let gpus = vec![cohort_proto::GpuTelemetry {
        index: 0,
        uuid: "GPU-42".into(),
        health: Some(unhealthy),
        ..Default::default()
    }];
    within("heartbeat", controller.heartbeat("n0", Heartbeat { seq: 7, gpus, ..Heartbeat::default() })).await;
    within("reconcile", controller.reconcile()).await.unwrap();
    let nodes = within("ListNodes", controller.nodes()).await;
    assert_eq!(nodes[0].telemetry[0].uuid, "GPU-42", "the heartbeat was not applied");
    assert!(nodes[0].telemetry[0].health.is_some(), "the GPU's health was not applied");
    assert_eq!(store.written("nodes/n0").len(), 1, "only the registration is stored: the new record waits");
    assert!(within("ListJobs", controller.list(false)).await.is_empty(), "a job not yet stored is listed");
    assert!(!submitting.is_finished(), "the submit was answered before its record was stored");

    store.held.send_replace(None);
    let id = within("submit", submitting).await.unwrap();
    assert_eq!(stored(&controller, &id).await.state, JobState::Pending as i32);
}

/// A node whose agent runs processes of a job the controller does not hold
/// (its record was quarantined) gets no new job until they are stopped: which
/// GPUs they hold is not known.
#[tokio::test]
async fn a_node_running_a_job_the_controller_does_not_hold_gets_nothing_until_it_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut session = connect(&controller, "n0", running_launch("ghost-7")).await;
    let id = submit(&controller, "name: t\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sleep, '100']\n").await;
    controller.reconcile().await.unwrap();
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Pending as i32, "{}", job.reason);
    assert!(job.reason.contains("stopping the processes of job ghost-7 (attempt 1)"), "{}", job.reason);
    let stopped = commands(&mut session);
    assert!(
        stopped.iter().any(|c| matches!(c, Command::Stop(s) if s.job_id == "ghost-7")),
        "the stray launch is stopped: {stopped:?}"
    );
    // Gone: the node is the job's.
    controller.heartbeat("n0", Heartbeat::default()).await;
    controller.reconcile().await.unwrap();
    let job = controller.get(&id).await.unwrap();
    assert_ne!(job.state, JobState::Pending as i32, "{}", job.reason);
}

/// Submits `yaml` with request id r-1 while the store holds every job write,
/// then again; checks that the repeat waits for the first one's writes.
/// Returns what each submit answered (`answer` of its first job) and how many
/// jobs there are in the end.
async fn submit_twice_during_the_first_write(yaml: &str, answer: fn(Job) -> String) -> (String, String, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = HeldStore::open(dir.path());
    let controller = Controller::load(store.clone(), dir.path(), ControllerConfig::default()).await.unwrap();
    store.held.send_replace(Some("jobs/"));
    let send = || {
        let controller = controller.clone();
        let file = JobFile { yaml: yaml.into(), source_name: "t.yaml".into(), ..JobFile::default() };
        let options = admission::SubmitOptions { request_id: "r-1".into(), ..Default::default() };
        tokio::spawn(async move { controller.submit(file, options).await.map(|(job, _)| answer(job)) })
    };
    let first = send();
    store.until_waiting(1).await;
    let again = send();
    let key = (String::new(), "r-1".to_owned());
    within("the repeat to wait for the first", async {
        let waiting = || {
            let key = key.clone();
            controller.state.call(move |state, _| state.pending_submits.get(&key).is_some_and(|p| p.repeats > 0))
        };
        while !waiting().await {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!again.is_finished(), "the repeat was answered before the first submit's writes ended");
    store.held.send_replace(None);
    let (first, again) = (within("submit", first).await.unwrap(), within("repeat", again).await.unwrap());
    let jobs = within("ListJobs", controller.list(false)).await.len();
    (first.unwrap(), again.unwrap(), jobs)
}

/// A submit retried with the same request id while the first one's record is
/// still on its way to the store (the CLI retries a lost answer) gets the
/// first job, not a second one.
#[tokio::test]
async fn a_repeated_submit_during_the_first_ones_write_gets_the_same_job() {
    let yaml = "name: t\nkind: command\nnodes: 1\ncommand: ['true']\n";
    let (first, again, jobs) = submit_twice_during_the_first_write(yaml, |job| job.id).await;
    assert_eq!(first, again);
    assert_eq!(jobs, 1, "a second job was made");
}

/// The same for a job array: the repeat gets the first array.
#[tokio::test]
async fn a_repeated_array_submit_during_the_first_ones_writes_gets_the_same_array() {
    let yaml = "name: t\nkind: command\nnodes: 1\narray: 0-2\ncommand: ['true']\n";
    let (first, again, jobs) = submit_twice_during_the_first_write(yaml, |job| job.array_id).await;
    assert_eq!(first, again);
    assert_eq!(jobs, 3, "a second array was made");
}

/// Changes of one key made while its first write waits at the store reach
/// it after that write, newest last (those in between may be skipped).
#[tokio::test]
async fn writes_of_one_key_reach_the_store_in_the_order_of_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = HeldStore::open(dir.path());
    let controller = Controller::load(store.clone(), dir.path(), ControllerConfig::default()).await.unwrap();
    let _n0 = connect(&controller, "n0", Vec::new()).await;
    store.held.send_replace(Some("nodes/"));
    let change = |cordoned: bool, draining: bool| {
        let controller = controller.clone();
        async move {
            controller
                .state
                .call(move |state, ctl| {
                    let node = state.nodes.get_mut("n0").unwrap();
                    (node.cordoned, node.draining) = (cordoned, draining);
                    ctl.persist_node(state, "n0")
                })
                .await
        }
    };
    let first = change(true, false).await;
    store.until_waiting(1).await;
    let second = change(false, false).await;
    let third = change(true, true).await;
    store.held.send_replace(None);
    let revisions = [first.wait().await.unwrap(), second.wait().await.unwrap(), third.wait().await.unwrap()];
    assert!(revisions[0] < revisions[2] && revisions[1] == revisions[2], "{revisions:?}");

    let written: Vec<(bool, bool)> = store
        .written("nodes/n0")
        .iter()
        .map(|v| NodeRecord::decode(v.as_slice()).unwrap())
        .map(|r| (r.cordoned, r.draining))
        .collect();
    // Registration, the held write, then the newest of the two queued behind it.
    assert_eq!(written, [(false, false), (true, false), (true, true)]);
    let now = NodeRecord::decode(store.get("nodes/n0").await.unwrap().unwrap().value.as_slice()).unwrap();
    assert_eq!((now.cordoned, now.draining), (true, true));
}

/// A heartbeat is acked without the state, through the session the state
/// holds: once the state drops it (lead lost), nothing is acked and the
/// agent's stream ends, so it looks for another controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_acked_only_through_a_session_the_state_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let request = RegisterRequest { node: Some(node_info("n0")), ..Default::default() };
    let registered = controller.register(request).await.unwrap();
    let (tx, mut session) = mpsc::unbounded_channel();
    let weak = tx.downgrade();
    controller.attach("n0", &registered.session_id, tx).await.unwrap();
    // Acked while the state task is busy with a command that does not end until released.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (entered, busy_now) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn({
        let controller = controller.clone();
        async move {
            controller
                .state
                .call(move |_, _| {
                    let _ = entered.send(());
                    let _ = released.recv();
                })
                .await
        }
    });
    within("the state task to take the blocking command", busy_now).await.unwrap();
    Controller::ack_heartbeat(&weak, 3);
    let acked = commands(&mut session);
    assert!(matches!(acked.as_slice(), [Command::HeartbeatAck(a)] if a.seq == 3), "{acked:?}");
    release.send(()).unwrap();
    within("the blocking command", busy).await.unwrap();

    controller.close_sessions().await;
    Controller::ack_heartbeat(&weak, 4);
    assert!(session.recv().await.is_none(), "a closed session was acked or kept open");
}

#[tokio::test]
async fn an_attempt_past_its_time_limit_is_stopped_and_fails_with_cause_time_limit_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let mut sessions = Vec::new();
    for node in ["n0", "n1"] {
        sessions.push(connect(&controller, node, Vec::new()).await);
    }
    let yaml = "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\nstop_grace: 3s\ntime_limit: 1m\n\
                command: [sleep, '1000']\nrestart: {max_restarts: 3, backoff: 1ms}\n";
    let id = submit(&controller, yaml).await;
    tokio::time::pause();
    controller.reconcile().await.unwrap();
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, started())).await;
    }
    for session in &mut sessions {
        commands(session);
    }
    let running = controller.get(&id).await.unwrap();
    assert_eq!(running.state, JobState::Running as i32, "{}", running.reason);
    assert_eq!(running.time_limit_ms, 60_000);

    pass(&controller, Duration::from_secs(58), &["n0", "n1"]).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Running as i32, "still inside its limit");
    for session in &mut sessions {
        assert_eq!(stops(&commands(session)), 0, "nothing stopped inside the limit");
    }

    pass(&controller, Duration::from_secs(3), &["n0", "n1"]).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Failed as i32, "{}", job.reason);
    let failure = job.failure.as_ref().unwrap();
    assert_eq!(failure.cause, "time_limit");
    assert!(
        failure.message.contains("time_limit 1m") && failure.message.contains("held its GPUs 1m"),
        "{}",
        failure.message
    );
    assert!(job.reason.contains("not restarted: time_limit failures are not retried"), "{}", job.reason);
    for session in &mut sessions {
        let sent = commands(session);
        let grace: Vec<u32> =
            sent.iter().filter_map(|c| if let Command::Stop(s) = c { Some(s.grace_ms) } else { None }).collect();
        assert!(!grace.is_empty() && grace.iter().all(|g| *g == 3000), "stopped with the job's grace: {grace:?}");
    }
    assert_eq!(stored(&controller, &id).await.failure.unwrap().cause, "time_limit", "the failure is persisted");

    // The ranks end; the job stays Failed and no new attempt is placed.
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, Event::Exited(exited(None, Some(15))))).await;
    }
    pass(&controller, Duration::from_secs(5), &["n0", "n1"]).await;
    let ended = controller.get(&id).await.unwrap();
    assert_eq!((ended.state, ended.attempt, ended.live_processes), (JobState::Failed as i32, 1, 0));
}

/// The "controller restart between exit reports and persist": the
/// last exit ends the job, but the controller dies while that record waits
/// at the store. The reloaded controller has what was stored (the job
/// running); the agents report the exits again when they reconnect, and the
/// job ends as it did, durably; a third load from the same store has the
/// same jobs as the controller that stored them.
#[tokio::test]
async fn a_controller_that_dies_before_the_last_exit_is_stored_ends_the_job_from_the_agents_reports() {
    let dir = tempfile::tempdir().unwrap();
    let store = HeldStore::open(dir.path());
    let controller = Controller::load(store.clone(), dir.path(), ControllerConfig::default()).await.unwrap();
    let _sessions = (connect(&controller, "n0", Vec::new()).await, connect(&controller, "n1", Vec::new()).await);
    let id = submit(&controller, "name: t\nkind: command\nnodes: 2\ngpus_per_node: 1\ncommand: [sleep, '100']\n").await;
    controller.reconcile().await.unwrap();
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, started())).await;
    }
    let running = stored(&controller, &id).await;
    assert_eq!((running.state, running.live_processes), (JobState::Running as i32, 2));

    store.held.send_replace(Some("jobs/"));
    for node in ["n0", "n1"] {
        controller.process_event(node, event(&id, Event::Exited(exited(Some(0), None)))).await;
    }
    store.until_waiting(1).await;
    assert_eq!(controller.get(&id).await.unwrap().state, JobState::Succeeded as i32, "succeeded in memory");
    // The controller dies with the record still on its way.
    controller.stop_writes();
    drop(controller);
    store.lose_held.store(true, std::sync::atomic::Ordering::SeqCst);
    store.held.send_replace(None);
    drop(store);

    let controller = open(dir.path()).await;
    tokio::time::pause();
    let reloaded = controller.get(&id).await.unwrap();
    assert_eq!((reloaded.state, reloaded.live_processes), (JobState::Running as i32, 2), "what was stored");
    let report = |code| {
        let process = cohort_proto::RunningProcess {
            index: 0,
            pid: 100,
            exited: Some(exited(Some(code), None)),
            ..Default::default()
        };
        vec![RunningLaunch { job_id: id.clone(), attempt: 1, processes: vec![process] }]
    };
    let _n0 = connect(&controller, "n0", report(0)).await;
    let _n1 = connect(&controller, "n1", report(0)).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!((job.state, job.live_processes), (JobState::Succeeded as i32, 0), "{}", job.reason);
    assert_eq!(stored(&controller, &id).await.state, JobState::Succeeded as i32, "and it is durable");

    let jobs = controller.list(false).await;
    drop(controller);
    let again = open(dir.path()).await;
    assert_eq!(again.list(false).await, jobs, "a load from the same store has the same jobs");
}

/// A command that panics on the state task fails its caller (whose task
/// panics with it) and leaves the task answering the next commands.
#[tokio::test]
async fn a_panicking_state_command_fails_its_caller_and_the_state_task_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let _n0 = connect(&controller, "n0", Vec::new()).await;
    let failing = tokio::spawn({
        let controller = controller.clone();
        async move { controller.state.call(|_, _| -> u32 { panic!("a bug in a command") }).await }
    });
    let error = failing.await.unwrap_err();
    assert!(error.is_panic(), "{error}");
    let message = error.into_panic();
    assert_eq!(message.downcast_ref::<&str>(), Some(&"a bug in a command"));

    within("heartbeat", controller.heartbeat("n0", Heartbeat::default())).await;
    let nodes = within("ListNodes", controller.nodes()).await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].state, cohort_proto::NodeState::Ready as i32);
}

/// The restart backoff doubles over a crash loop and starts again after an
/// attempt that ran [`cohort_shared::spec::BACKOFF_RESET_AFTER`]: earlier
/// attempts (how long each ran) are written into the record, then the
/// current one's rank exits 1.
async fn restart_reason_after(earlier_runs_min: &[i64], current_ran_min: i64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path()).await;
    let _session = connect(&controller, "n0", Vec::new()).await;
    let yaml = "name: t\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [sleep, '100']\n\
                restart: {max_restarts: 9, backoff: 1s, on: [rank_failed]}\n";
    let id = submit(&controller, yaml).await;
    controller.reconcile().await.unwrap();
    controller.process_event("n0", event(&id, started())).await;
    let (job, earlier, current) = (id.clone(), earlier_runs_min.to_vec(), current_ran_min);
    controller
        .state
        .call(move |state, _| {
            let entry = state.jobs.get_mut(&job).unwrap();
            let now = now_unix_ms();
            let minute = 60_000;
            let mut records: Vec<cohort_proto::AttemptRecord> = earlier
                .iter()
                .map(|ran| cohort_proto::AttemptRecord {
                    started_unix_ms: now - ran * minute - minute,
                    finished_unix_ms: now - minute,
                    state: JobState::Failed as i32,
                    ..Default::default()
                })
                .collect();
            let mut last = entry.job.attempts.pop().unwrap();
            last.started_unix_ms = now - current * minute;
            records.push(last);
            entry.job.attempts = records;
        })
        .await;
    controller.process_event("n0", event(&id, Event::Exited(exited(Some(1), None)))).await;
    let job = controller.get(&id).await.unwrap();
    assert_eq!(job.state, JobState::Restarting as i32, "{}", job.reason);
    job.reason
}

#[tokio::test]
async fn the_restart_backoff_doubles_in_a_crash_loop_and_resets_after_a_long_healthy_attempt() {
    // Three short attempts in a row: the third restart waits backoff × 4.
    let looping = restart_reason_after(&[1, 2], 1).await;
    assert!(looping.starts_with("restart 3 of 9 in 4s:"), "{looping}");
    // The same, but the failing attempt had trained for 11 minutes: the first step again.
    let healthy = restart_reason_after(&[1, 2], 11).await;
    assert!(healthy.starts_with("restart 3 of 9 in 1s:"), "{healthy}");
    // A long attempt, then two short ones: the loop counts from the long one.
    let after_healthy = restart_reason_after(&[30, 1], 1).await;
    assert!(after_healthy.starts_with("restart 3 of 9 in 2s:"), "{after_healthy}");
}
