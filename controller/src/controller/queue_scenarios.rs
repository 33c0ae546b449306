//! Queues, quotas and backfill through the controller's own entry points
//! (register, submit, reconcile) on an embedded store.

#![allow(clippy::unwrap_used)]

use cohort_proto::{JobState, RegisterRequest};

use super::*;
use crate::queues::Queues;
use crate::store::EmbeddedStore;

async fn open(dir: &Path, queues: Queues) -> Arc<Controller> {
    let store = Arc::new(EmbeddedStore::open(&dir.join("store")).unwrap());
    Controller::load(store, dir, ControllerConfig { queues, ..ControllerConfig::default() }).await.unwrap()
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
    while controller.state.call(|state, _| state.fair_share.usage("alice")).await == 0.0 {
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
