//! Queues, quotas and backfill through the controller's own entry points
//! (register, submit, reconcile) on an embedded store.

#![allow(clippy::unwrap_used)]

use cohort_proto::{JobState, RegisterRequest};

use super::*;
use crate::queues::Queues;
use crate::store::EmbeddedStore;

async fn open(dir: &Path, queues: Queues) -> Arc<Controller> {
    // A controller dropped just before holds the file until its writer task ends.
    let mut tries = 0;
    let store = loop {
        match EmbeddedStore::open(&dir.join("store")) {
            Ok(store) => break Arc::new(store),
            Err(e) if tries < 1000 => {
                tries += 1;
                tracing::debug!(error = %e, "state file still held");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    // The sessions send no heartbeats: a node TTL far beyond any test keeps the
    // nodes (and the jobs that hold GPUs on them) alive on a loaded machine.
    let config = ControllerConfig { queues, node_ttl: Duration::from_secs(3600), ..ControllerConfig::default() };
    Controller::load(store, dir, config).await.unwrap()
}

/// Registers one-GPU nodes and opens their sessions (kept open by the returned receivers).
async fn connect(controller: &Controller, nodes: &[&str]) -> Vec<Session> {
    let labelled: Vec<(&str, &str)> = nodes.iter().map(|n| (*n, "")).collect();
    connect_labelled(controller, &labelled).await
}

type Session = mpsc::UnboundedReceiver<Result<ControllerMessage, Status>>;

/// [`connect`], each node with a `gpu` label (none when empty).
async fn connect_labelled(controller: &Controller, nodes: &[(&str, &str)]) -> Vec<Session> {
    let mut sessions = Vec::new();
    for (name, gpu) in nodes {
        let labels = if gpu.is_empty() { Default::default() } else { [("gpu".to_string(), gpu.to_string())].into() };
        let node = NodeInfo {
            name: (*name).into(),
            labels,
            advertise_addr: "127.0.0.1".into(),
            gpus: vec![cohort_proto::GpuInfo { index: 0, ..Default::default() }],
            ..NodeInfo::default()
        };
        let registered = controller.register(RegisterRequest { node: Some(node), ..Default::default() }).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        controller.attach(name, &registered.session_id, tx).await.unwrap();
        sessions.push(rx);
    }
    sessions
}

async fn submit_as(controller: &Controller, user: &str, yaml: &str) -> Result<String, ControllerError> {
    let file =
        JobFile { yaml: yaml.into(), source_name: "t.yaml".into(), submitted_by: user.into(), ..JobFile::default() };
    let options = admission::SubmitOptions { run_as_bound: Some(user.into()), ..Default::default() };
    controller.submit(file, options).await.map(|(job, _)| job.id)
}

fn job(name: &str, nodes: u32, extra: &str) -> String {
    format!("name: {name}\nkind: command\nnodes: {nodes}\ngpus_per_node: 1\ncommand: [sleep, '1000']\n{extra}")
}

async fn pending(controller: &Controller, id: &str) -> Option<String> {
    let job = controller.get(id).await.unwrap();
    (job.state == JobState::Pending as i32).then_some(job.reason)
}

#[tokio::test]
async fn a_short_job_backfills_past_a_blocked_head_and_one_that_would_delay_it_waits() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), Queues::default()).await;
    let _sessions = connect(&controller, &["n1", "n2", "n3"]).await;
    let busy = submit_as(&controller, "u", &job("busy", 1, "time_limit: 30m\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &busy).await, None, "the first job starts");

    let head = submit_as(&controller, "u", &job("head", 3, "time_limit: 1h\n")).await.unwrap();
    let long = submit_as(&controller, "u", &job("long", 1, "time_limit: 1h\n")).await.unwrap();
    let unbounded = submit_as(&controller, "u", &job("unbounded", 1, "")).await.unwrap();
    let short = submit_as(&controller, "u", &job("short", 1, "time_limit: 10m\n")).await.unwrap();
    controller.reconcile().await.unwrap();

    let head_reason = pending(&controller, &head).await.expect("the 3-node head waits for the busy node");
    assert!(head_reason.contains("reserved nodes n1,n2,n3 from"), "{head_reason}");
    let long_reason = pending(&controller, &long).await.expect("a 1h job would delay the head");
    assert!(long_reason.starts_with(&format!("behind job {head} (reserved nodes n1,n2,n3 from")), "{long_reason}");
    assert!(long_reason.contains("time_limit 1h would run past"), "{long_reason}");
    let unbounded_reason = pending(&controller, &unbounded).await.expect("a job without a limit cannot backfill");
    assert!(unbounded_reason.contains("no time limit"), "{unbounded_reason}");
    assert_eq!(pending(&controller, &short).await, None, "a 10m job ends before the reservation: it backfills");
}

#[tokio::test]
async fn a_queue_at_quota_keeps_its_next_job_pending_while_another_queues_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let queues = Queues::parse(
        "[[queue]]\nname = \"team-a\"\ngpus = 1\nborrow = false\nusers = [\"alice\"]\n\
         [[queue]]\nname = \"team-b\"\ngpus = 2\n",
    )
    .unwrap();
    let controller = open(dir.path(), queues).await;
    let _sessions = connect(&controller, &["n1", "n2", "n3"]).await;
    let a1 = submit_as(&controller, "alice", &job("a1", 1, "queue: team-a\n")).await.unwrap();
    let a2 = submit_as(&controller, "alice", &job("a2", 1, "queue: team-a\n")).await.unwrap();
    let b1 = submit_as(&controller, "bob", &job("b1", 1, "queue: team-b\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &a1).await, None);
    let reason = pending(&controller, &a2).await.expect("team-a is at its quota and may not borrow");
    assert_eq!(reason, "queue team-a at quota 1/1 GPUs (this job needs 1)");
    assert_eq!(pending(&controller, &b1).await, None, "team-b's job runs on a third node");

    let refused = submit_as(&controller, "bob", &job("b2", 1, "queue: team-a\n")).await.unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("queue: team-a does not admit jobs of bob") && text.contains("team-b"), "{text}");
    let unknown = submit_as(&controller, "bob", &job("b3", 1, "queue: team-c\n")).await.unwrap_err();
    assert!(unknown.to_string().contains("queue: \"team-c\" is not a queue"), "{unknown}");
}

#[tokio::test]
async fn a_queue_that_may_borrow_runs_beyond_its_quota_on_idle_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let queues = Queues::parse("[[queue]]\nname = \"team-a\"\ngpus = 1\nmax_run_time = \"2h\"\n").unwrap();
    let controller = open(dir.path(), queues).await;
    let _sessions = connect(&controller, &["n1", "n2"]).await;
    let a1 = submit_as(&controller, "alice", &job("a1", 1, "")).await.unwrap();
    let a2 = submit_as(&controller, "alice", &job("a2", 1, "")).await.unwrap();
    let a3 = submit_as(&controller, "alice", &job("a3", 1, "")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &a1).await, None);
    assert_eq!(controller.get(&a1).await.unwrap().time_limit_ms, 7_200_000, "the queue's max_run_time");
    assert_eq!(pending(&controller, &a2).await, None, "borrows the idle second node");
    let reason = pending(&controller, &a3).await.expect("no GPU left to borrow");
    assert!(
        reason.starts_with("queue team-a at quota 2/1 GPUs; waiting to borrow idle GPUs beyond it: needs 1 node(s)"),
        "{reason}"
    );
}

#[tokio::test]
async fn within_a_priority_the_user_who_used_fewer_gpus_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), Queues::default()).await;
    let _sessions = connect(&controller, &["n1", "n2"]).await;
    let first = submit_as(&controller, "alice", &job("first", 1, "")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &first).await, None);
    // Alice's running job accrues GPU-seconds with every pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while controller.state.call(|state, _| state.fair_share.usage("alice")).await == 0.0 {
        assert!(std::time::Instant::now() < deadline, "no usage accrued for alice's running job");
        tokio::task::yield_now().await;
        controller.reconcile().await.unwrap();
    }
    // Two one-node jobs for the one free node: bob's, submitted later, goes first.
    let alice = submit_as(&controller, "alice", &job("alice", 1, "")).await.unwrap();
    let bob = submit_as(&controller, "bob", &job("bob", 1, "")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &bob).await, None, "bob has used nothing");
    assert!(pending(&controller, &alice).await.is_some(), "alice waits");
}

#[tokio::test]
async fn a_label_quota_keeps_a_queue_off_the_labelled_nodes_it_has_used_up() {
    let dir = tempfile::tempdir().unwrap();
    let queues = Queues::parse(
        "[[queue]]\nname = \"team-a\"\nborrow = false\ngpus_by_label = { \"gpu=h100\" = 1 }\n\
         [[queue]]\nname = \"team-b\"\n",
    )
    .unwrap();
    let controller = open(dir.path(), queues).await;
    let _sessions = connect_labelled(&controller, &[("h1", "h100"), ("h2", "h100"), ("a1", "a100")]).await;
    let on_h100 = "queue: team-a\nnode_selector: {gpu: h100}\n";
    let first = submit_as(&controller, "alice", &job("first", 1, on_h100)).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &first).await, None);
    let second = submit_as(&controller, "alice", &job("second", 1, on_h100)).await.unwrap();
    let anywhere = submit_as(&controller, "alice", &job("anywhere", 1, "queue: team-a\n")).await.unwrap();
    let other =
        submit_as(&controller, "bob", &job("other", 1, "queue: team-b\nnode_selector: {gpu: h100}\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let reason = pending(&controller, &second).await.expect("team-a has used its one H100 GPU");
    assert_eq!(reason, "queue team-a at its gpu=h100 quota 1/1 GPUs");
    assert_eq!(pending(&controller, &anywhere).await, None, "a job without a selector runs on the a100 node");
    let placed = controller.get(&anywhere).await.unwrap();
    let nodes: Vec<&str> = placed.plan.as_ref().unwrap().nodes.iter().map(|a| a.node_name.as_str()).collect();
    assert_eq!(nodes, ["a1"]);
    assert_eq!(pending(&controller, &other).await, None, "team-b takes the other H100 node");
}

/// Sets every queue's decayed usage as if it had run that many GPU-seconds.
async fn set_queue_usage(controller: &Controller, usage: &[(&str, f64)]) {
    let record = cohort_proto::FairShareRecord {
        queues: usage.iter().map(|(q, u)| (q.to_string(), *u)).collect(),
        at_unix_ms: now_unix_ms(),
        ..Default::default()
    };
    controller.state.call(move |state, _| state.fair_share = crate::queues::FairShare::from_record(record)).await;
}

#[tokio::test]
async fn across_queues_the_one_furthest_below_its_weighted_share_goes_first_whatever_the_priority() {
    let dir = tempfile::tempdir().unwrap();
    let file = "[[queue]]\nname = \"a\"\n[[queue]]\nname = \"b\"\nweight = 3\n";
    let controller = open(dir.path(), Queues::parse(file).unwrap()).await;
    let _sessions = connect(&controller, &["n1"]).await;
    // b used twice what a did, but its weight is three times a's: it is further below its share.
    set_queue_usage(&controller, &[("a", 1000.0), ("b", 2000.0)]).await;
    let a = submit_as(&controller, "u", &job("a", 1, "queue: a\npriority: 5\n")).await.unwrap();
    let b = submit_as(&controller, "u", &job("b", 1, "queue: b\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &b).await, None, "b's job takes the one node");
    assert!(pending(&controller, &a).await.is_some(), "a's waits, its priority notwithstanding");

    // With equal weights a is the one below its share.
    let dir = tempfile::tempdir().unwrap();
    let file = "[[queue]]\nname = \"a\"\n[[queue]]\nname = \"b\"\n";
    let controller = open(dir.path(), Queues::parse(file).unwrap()).await;
    let _sessions = connect(&controller, &["n1"]).await;
    set_queue_usage(&controller, &[("a", 1000.0), ("b", 2000.0)]).await;
    let b = submit_as(&controller, "u", &job("b", 1, "queue: b\n")).await.unwrap();
    let a = submit_as(&controller, "u", &job("a", 1, "queue: a\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &a).await, None);
    assert!(pending(&controller, &b).await.is_some());
}

#[tokio::test]
async fn fair_share_usage_and_queues_set_through_the_api_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let declared = Queues::parse("[[queue]]\nname = \"a\"\ngpus = 4\n").unwrap();
    let controller = open(dir.path(), declared.clone()).await;
    let _sessions = connect(&controller, &["n1"]).await;
    let id = submit_as(&controller, "alice", &job("j", 1, "")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &id).await, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while controller.state.call(|state, _| state.fair_share.queue_usage("a")).await == 0.0 {
        let job = controller.get(&id).await.unwrap();
        assert!(std::time::Instant::now() < deadline, "no usage accrued: job {} {}", job.state, job.reason);
        tokio::task::yield_now().await;
        controller.reconcile().await.unwrap();
    }
    // The next pass stores the usage.
    controller.state.call(|state, _| state.fair_share_stored = None).await;
    controller.reconcile().await.unwrap();
    let before = controller.state.call(|state, _| state.fair_share.clone()).await;
    let spec = cohort_proto::QueueSpec { name: "b".into(), gpus: Some(2), weight: 5.0, ..Default::default() };
    controller.set_queue(spec).await.unwrap();
    let mut a = declared.of(Some("a")).unwrap().to_spec();
    a.gpus = Some(1);
    controller.set_queue(a).await.unwrap();
    controller.writer.flush().await;
    controller.stop_writes();
    drop(controller);

    let controller = open(dir.path(), declared).await;
    let after = controller.state.call(|state, _| state.fair_share.clone()).await;
    assert_eq!(after, before, "the stored usage is loaded");
    assert!(after.usage("alice") > 0.0 && after.queue_usage("a") > 0.0);
    let queues = controller.list_queues().await;
    let names: Vec<&str> = queues.queues.iter().filter_map(|q| q.spec.as_ref()).map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "the queue made through the API is back");
    assert_eq!(queues.queues[0].spec.as_ref().unwrap().gpus, Some(1), "the store's version of a wins over the file's");
    assert_eq!(queues.queues[1].spec.as_ref().unwrap().weight, 5.0);
}

#[tokio::test]
async fn a_queue_set_through_the_api_takes_effect_and_one_with_jobs_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), Queues::default()).await;
    let _sessions = connect(&controller, &["n1", "n2"]).await;
    let refused = submit_as(&controller, "alice", &job("x", 1, "queue: team-a\n")).await.unwrap_err();
    assert!(refused.to_string().contains("is not a queue of this cluster"), "{refused}");
    let spec = cohort_proto::QueueSpec { name: "team-a".into(), gpus: Some(1), ..Default::default() };
    let status = controller.set_queue(spec).await.unwrap();
    assert_eq!(status.spec.unwrap().weight, 1.0, "a weight left out is 1");
    let a1 = submit_as(&controller, "alice", &job("a1", 1, "queue: team-a\n")).await.unwrap();
    let a2 = submit_as(&controller, "alice", &job("a2", 1, "queue: team-a\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &a1).await, None);
    assert_eq!(pending(&controller, &a2).await.unwrap(), "queue team-a at quota 1/1 GPUs (this job needs 1)");
    let listed = controller.list_queues().await;
    let team_a = listed.queues.iter().find(|q| q.spec.as_ref().unwrap().name == "team-a").unwrap();
    assert_eq!((team_a.used_gpus, team_a.running_jobs, team_a.pending_jobs), (1, 1, 1));
    assert_eq!(controller.get(&a1).await.unwrap().queue, "team-a");

    let e = controller.delete_queue("team-a").await.unwrap_err().to_string();
    assert!(e.starts_with("queue team-a has 2 active job(s)"), "{e}");
    let e = controller.delete_queue("default").await.unwrap_err().to_string();
    assert!(e.contains("is the default queue"), "{e}");
    let bad = cohort_proto::QueueSpec { name: "team a".into(), ..Default::default() };
    let e = controller.set_queue(bad).await.unwrap_err().to_string();
    assert!(e.starts_with("queue name: \"team a\" is not a queue name"), "{e}");
}

#[tokio::test]
async fn usage_counts_gpus_times_wall_time_per_user_and_queue() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), Queues::default()).await;
    let _sessions = connect(&controller, &["n1", "n2"]).await;
    let id = submit_as(&controller, "alice", &job("j", 2, "")).await.unwrap();
    controller.reconcile().await.unwrap();
    let started = controller.get(&id).await.unwrap().attempts[0].started_unix_ms;
    assert!(started > 0);
    let now = started + 1_800_000;
    let usage = controller.state.call(move |state, _| queue_admin::usage(state, 0, now)).await;
    assert_eq!(usage.rows.len(), 1);
    let row = &usage.rows[0];
    assert_eq!(
        (row.user.as_str(), row.queue.as_str(), row.jobs, row.attempts, row.running_gpus),
        ("alice", "default", 1, 1, 2)
    );
    assert!((row.gpu_hours - 1.0).abs() < 1e-9, "2 GPUs for half an hour: {}", row.gpu_hours);
    let since = started + 900_000;
    let usage = controller.state.call(move |state, _| queue_admin::usage(state, since, now)).await;
    assert!((usage.rows[0].gpu_hours - 0.5).abs() < 1e-9, "the window cuts it: {}", usage.rows[0].gpu_hours);
    let later = controller.state.call(move |state, _| queue_admin::usage(state, now + 1, now + 2)).await;
    assert!(later.rows.iter().all(|r| r.gpu_hours < 1e-6), "{later:?}");
}

/// The stop commands sent for `job` so far, on every session.
fn stops_for(sessions: &mut [Session], job: &str) -> Vec<cohort_proto::StopCommand> {
    let mut stops = Vec::new();
    for session in sessions.iter_mut() {
        while let Ok(Ok(message)) = session.try_recv() {
            if let Some(Command::Stop(stop)) = message.command
                && stop.job_id == job
            {
                stops.push(stop);
            }
        }
    }
    stops
}

/// The jobs a stop command was sent for so far, on every session.
fn stopped_jobs(sessions: &mut [Session]) -> std::collections::BTreeSet<String> {
    let mut jobs = std::collections::BTreeSet::new();
    for session in sessions.iter_mut() {
        while let Ok(Ok(message)) = session.try_recv() {
            if let Some(Command::Stop(stop)) = message.command {
                jobs.insert(stop.job_id);
            }
        }
    }
    jobs
}

#[tokio::test]
async fn a_higher_priority_job_preempts_the_lowest_priority_gang_of_its_queue_when_the_queue_allows() {
    let dir = tempfile::tempdir().unwrap();
    let queues = Queues::parse("[[queue]]\nname = \"team-a\"\npreempt_lower_priority = true\n").unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let config = ControllerConfig { queues, stop_resend: Duration::from_millis(20), ..ControllerConfig::default() };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let mut sessions = connect(&controller, &["n1", "n2"]).await;
    let saving = "priority: 1\npreempt: {signal: SIGUSR1, grace: 30s}\n";
    let low = submit_as(&controller, "u", &job("low", 1, saving)).await.unwrap();
    let mid = submit_as(&controller, "u", &job("mid", 1, "priority: 5\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!((pending(&controller, &low).await, pending(&controller, &mid).await), (None, None));

    // Priority 5 may not stop the priority-5 job, nor the priority-1 one alone for 2 nodes.
    let equal = submit_as(&controller, "u", &job("equal", 2, "priority: 5\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let reason = pending(&controller, &equal).await.unwrap();
    assert!(reason.starts_with("waiting for free GPUs"), "{reason}");
    controller.cancel(&equal).await.unwrap();

    let high = submit_as(&controller, "u", &job("high", 1, "priority: 9\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let reason = pending(&controller, &high).await.unwrap();
    assert_eq!(reason, format!("preempting job(s) {low} (priority 9): waiting for them to save and stop"));
    let victim = controller.get(&low).await.unwrap();
    assert_eq!(victim.state, JobState::Restarting as i32, "{}", victim.reason);
    assert_eq!(victim.attempts[0].state, JobState::Preempted as i32);
    let stops = stops_for(&mut sessions, &low);
    assert!(!stops.is_empty(), "the victim's gang is stopped");
    assert!(stops.iter().all(|s| s.first_signal == "SIGUSR1" && s.first_signal_grace_ms == 30_000), "{stops:?}");
    assert_eq!(controller.get(&mid).await.unwrap().state, JobState::Starting as i32, "the priority-5 job stays");

    // No agent reports the stopped ranks: they are counted gone, the victim is queued
    // again (no restart policy: a preemption uses none) and the higher job starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(&controller, &high).await.is_some() || pending(&controller, &low).await.is_none() {
        assert!(Instant::now() < deadline, "{:?}", controller.get(&low).await.unwrap().reason);
        tokio::time::sleep(Duration::from_millis(25)).await;
        controller.reconcile().await.unwrap();
    }
    let reason = pending(&controller, &low).await.unwrap();
    assert!(reason.starts_with(&format!("preempted by job {high} (priority 9)")), "{reason}");
}

#[tokio::test]
async fn the_fifo_scheduler_holds_every_job_behind_a_blocked_head_and_ignores_quotas() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let queues =
        Queues::parse("[[queue]]\nname = \"team-a\"\ngpus = 1\nborrow = false\n[[queue]]\nname = \"shared\"\n")
            .unwrap();
    let config = ControllerConfig { queues, scheduler: crate::queues::Scheduler::Fifo, ..ControllerConfig::default() };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let _sessions = connect(&controller, &["n1", "n2", "n3"]).await;
    let first = submit_as(&controller, "u", &job("first", 1, "time_limit: 30m\n")).await.unwrap();
    let beyond_quota = submit_as(&controller, "u", &job("beyond", 1, "time_limit: 30m\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &first).await, None);
    assert_eq!(pending(&controller, &beyond_quota).await, None, "fifo has no quotas: the second GPU is taken");

    let head = submit_as(&controller, "u", &job("head", 3, "time_limit: 1h\nqueue: shared\n")).await.unwrap();
    let short = submit_as(&controller, "u", &job("short", 1, "time_limit: 10m\nqueue: shared\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let head_reason = pending(&controller, &head).await.expect("the 3-node head waits for the busy nodes");
    assert!(head_reason.ends_with("no job behind it starts (--scheduler fifo)"), "{head_reason}");
    assert!(!head_reason.contains("reserved"), "fifo reserves nothing: {head_reason}");
    // Under backfill this 10-minute job would start on the idle third node.
    assert!(pending(&controller, &short).await.is_some(), "nothing starts behind the blocked head");
}

#[tokio::test]
async fn a_gang_younger_than_the_preempt_exempt_time_is_no_victim() {
    let dir = tempfile::tempdir().unwrap();
    let queues = Queues::parse(
        "preempt_exempt_time = \"1500ms\"\n[[queue]]\nname = \"team-a\"\npreempt_lower_priority = true\n",
    )
    .unwrap();
    assert_eq!(queues.preempt_exempt_time, Duration::from_millis(1500));
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let config = ControllerConfig { queues, stop_resend: Duration::from_millis(20), ..ControllerConfig::default() };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let mut sessions = connect(&controller, &["n1"]).await;
    // Before the gang is placed: its exempt time counts from its placement, later.
    let started = Instant::now();
    let low = submit_as(&controller, "u", &job("low", 1, "priority: 1\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    assert_eq!(pending(&controller, &low).await, None);

    let high = submit_as(&controller, "u", &job("high", 1, "priority: 9\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let reason = pending(&controller, &high).await.unwrap();
    assert!(reason.starts_with("waiting for free GPUs"), "a young gang was chosen: {reason}");
    assert!(stops_for(&mut sessions, &low).is_empty());
    // Once it has run the exempt time, it is the victim.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        controller.reconcile().await.unwrap();
        let reason = pending(&controller, &high).await.unwrap_or_default();
        if reason.starts_with("preempting job(s)") {
            assert!(reason.contains(&low), "{reason}");
            break;
        }
        assert!(Instant::now() < deadline, "never preempted: {reason}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500), "preempted before the exempt time");
}

/// Reconciles until `id` is no longer pending (its victim `victim`, whose reason a timeout shows, gone).
async fn until_started(controller: &Controller, id: &str, victim: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pending(controller, id).await.is_some() {
        assert!(Instant::now() < deadline, "{:?}", controller.get(victim).await.unwrap().reason);
        tokio::time::sleep(Duration::from_millis(25)).await;
        controller.reconcile().await.unwrap();
    }
}

#[tokio::test]
async fn a_borrower_whose_queue_used_less_takes_gpus_lent_to_one_that_used_more_and_no_further() {
    let two_queues = "[[queue]]\nname = \"a\"\ngpus = 1\n[[queue]]\nname = \"b\"\ngpus = 1\n";
    for fair in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let file = if fair { format!("preempt_for_fair_share = true\n{two_queues}") } else { two_queues.to_string() };
        let queues = Queues::parse(&file).unwrap();
        assert_eq!(queues.preempt_for_fair_share, fair);
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
        let config = ControllerConfig { queues, stop_resend: Duration::from_millis(20), ..ControllerConfig::default() };
        let controller = Controller::load(store, dir.path(), config).await.unwrap();
        let mut sessions = connect(&controller, &["n1", "n2", "n3", "n4"]).await;
        // b holds 3 GPUs (2 borrowed), a its 1; b has used far more than a (equal weights).
        let mut b = Vec::new();
        for name in ["b1", "b2", "b3"] {
            b.push(submit_as(&controller, "u", &job(name, 1, "queue: b\n")).await.unwrap());
        }
        controller.reconcile().await.unwrap();
        let a1 = submit_as(&controller, "u", &job("a1", 1, "queue: a\n")).await.unwrap();
        controller.reconcile().await.unwrap();
        assert_eq!(pending(&controller, &a1).await, None);
        set_queue_usage(&controller, &[("a", 0.0), ("b", 1e6)]).await;

        // a's second job borrows and does not fit.
        let a2 = submit_as(&controller, "u", &job("a2", 1, "queue: a\n")).await.unwrap();
        controller.reconcile().await.unwrap();
        let reason = pending(&controller, &a2).await.unwrap();
        let stopped: Vec<String> = stopped_jobs(&mut sessions).into_iter().collect();
        if !fair {
            assert!(!reason.starts_with("preempting"), "{reason}");
            assert!(stopped.is_empty(), "off by default: {stopped:?}");
            continue;
        }
        let mut victims = Vec::new();
        assert_eq!(stopped.len(), 1, "one gang of b frees the GPU a2 needs: {stopped:?}");
        assert!(b.contains(&stopped[0]), "{stopped:?}");
        assert_eq!(
            reason,
            format!(
                "preempting job(s) {} (queue a below its fair share of the cluster): waiting for them to save and stop",
                stopped[0]
            )
        );
        victims.push(stopped[0].clone());
        until_started(&controller, &a2, &victims[0]).await;
        let reason = pending(&controller, &victims[0]).await.unwrap();
        assert!(reason.starts_with(&format!("preempted by job {a2} (queue a below its fair share")), "{reason}");

        // The victim, queued again, borrows in turn but b used more: it takes nothing back.
        // a3 takes b's last borrowed gang.
        let a3 = submit_as(&controller, "u", &job("a3", 1, "queue: a\n")).await.unwrap();
        controller.reconcile().await.unwrap();
        let reason = pending(&controller, &a3).await.unwrap();
        let stopped: Vec<String> = stopped_jobs(&mut sessions).into_iter().filter(|id| !victims.contains(id)).collect();
        assert_eq!(stopped.len(), 1, "{stopped:?} ({reason})");
        assert!(b.contains(&stopped[0]), "{stopped:?}");
        assert!(reason.starts_with(&format!("preempting job(s) {} (queue a below", stopped[0])), "{reason}");
        victims.push(stopped[0].clone());
        until_started(&controller, &a3, &victims[1]).await;

        // b holds its quota and no more: nothing of it may go, and b's waiting jobs take nothing from a.
        let a4 = submit_as(&controller, "u", &job("a4", 1, "queue: a\n")).await.unwrap();
        controller.reconcile().await.unwrap();
        controller.reconcile().await.unwrap();
        let reason = pending(&controller, &a4).await.unwrap();
        assert!(!reason.starts_with("preempting"), "{reason}");
        let stopped: Vec<String> = stopped_jobs(&mut sessions).into_iter().filter(|id| !victims.contains(id)).collect();
        assert!(stopped.is_empty(), "{stopped:?}");

        // Once a has used more than b, b's waiting borrowers may take back what a borrowed.
        set_queue_usage(&controller, &[("a", 1e6), ("b", 0.0)]).await;
        controller.reconcile().await.unwrap();
        let stopped: Vec<String> = stopped_jobs(&mut sessions).into_iter().filter(|id| !victims.contains(id)).collect();
        assert_eq!(stopped.len(), 1, "{stopped:?}");
        assert!([&a2, &a3].contains(&&stopped[0]), "{stopped:?}");
    }
}

#[tokio::test]
async fn preemption_reclaims_by_the_quotas_set_through_the_api_not_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = "[[queue]]\nname = \"a\"\ngpus = 1\n[[queue]]\nname = \"b\"\ngpus = 3\n";
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let config = ControllerConfig {
        queues: Queues::parse(file).unwrap(),
        stop_resend: Duration::from_millis(20),
        ..ControllerConfig::default()
    };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let mut sessions = connect(&controller, &["n1", "n2", "n3"]).await;
    let mut b = Vec::new();
    for name in ["b1", "b2", "b3"] {
        b.push(submit_as(&controller, "u", &job(name, 1, "queue: b\n")).await.unwrap());
    }
    controller.reconcile().await.unwrap();
    // Every node is b's, within the file's quota of 3; an admin moves two GPUs of quota from b to a.
    for (name, gpus) in [("a", 2), ("b", 1)] {
        let spec = cohort_proto::QueueSpec { name: name.into(), gpus: Some(gpus), ..Default::default() };
        controller.set_queue(spec).await.unwrap();
    }
    // Now b holds 2 beyond its quota of 1, and a reclaims within its quota of 2.
    let a1 = submit_as(&controller, "u", &job("a1", 1, "queue: a\n")).await.unwrap();
    let a2 = submit_as(&controller, "u", &job("a2", 1, "queue: a\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let reason = pending(&controller, &a1).await.unwrap();
    assert!(reason.starts_with("preempting job(s)") && reason.contains("(queue a reclaiming quota)"), "{reason}");
    let stopped = stopped_jobs(&mut sessions);
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert!(stopped.iter().all(|id| b.contains(id)), "{stopped:?}");
    assert!(pending(&controller, &a2).await.is_some());
}

#[tokio::test]
async fn a_time_limit_counts_from_the_placement_so_an_attempt_that_never_runs_is_stopped_at_it() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), Queues::default()).await;
    // The sessions never report the ranks started: the attempt stays placed, not Running.
    let mut sessions = connect(&controller, &["n1"]).await;
    let id = submit_as(&controller, "u", &job("slow-start", 1, "time_limit: 1s\n")).await.unwrap();
    controller.reconcile().await.unwrap();
    let placed = controller.get(&id).await.unwrap();
    assert_eq!(placed.state, JobState::Starting as i32, "{}", placed.reason);
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        controller.reconcile().await.unwrap();
        let job = controller.get(&id).await.unwrap();
        if job.state == JobState::Failed as i32 {
            break job;
        }
        assert!(Instant::now() < deadline, "never stopped at its limit: {}", job.reason);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failure = failed.failure.unwrap();
    assert_eq!(failure.cause, "time_limit", "{failure:?}");
    assert!(failure.message.contains("from its placement, time_limit 1s"), "{}", failure.message);
    assert!(failed.finished_unix_ms - failed.started_unix_ms >= 1000, "stopped before its limit");
    assert!(stopped_jobs(&mut sessions).contains(&id), "the gang is told to stop");
}
