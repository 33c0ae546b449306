//! Hostile job files against a real controller (issue 14, finding 3): parsing
//! and validation run on blocking threads, a few at a time, within
//! `--job-file-check-timeout`, so heartbeats are answered whatever the job API
//! receives, and a file that takes too long is refused saying so.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cohort_proto::agent_message::Msg;
use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::controller_message::Command;
use cohort_proto::{
    AgentMessage, Heartbeat, Hello, JobFile, ListNodesRequest, NodeInfo, NodeState, PlanJobRequest, RegisterRequest,
    SubmitJobRequest, now_unix_ms,
};
use cohort_tests::{Cluster, NodeSpec};
use tokio_stream::wrappers::ReceiverStream;

/// The slowest shape of `shared/examples/job_file_worst_case.rs` that passes
/// the pre-scan: a 1 MiB job file of many env keys (about 1 s to check in a
/// debug build).
fn worst_case_file() -> JobFile {
    let head = "name: worst\nkind: command\nnodes: 1\ncommand: [x]\nenv:\n";
    let keys: String = (0..(1 << 20) / 16 - 8).map(|i| format!("  K{i:07}: v\n")).collect();
    JobFile { yaml: format!("{head}{keys}"), source_name: "worst.yaml".into(), ..JobFile::default() }
}

/// A node of the test's own that heartbeats every `every` and times each
/// acknowledgement; returns the latencies when `stop` fires.
async fn probe_node(url: String, every: Duration, stop: tokio::sync::oneshot::Receiver<()>) -> Vec<Duration> {
    let mut client = AgentServiceClient::connect(url).await.unwrap();
    let info = NodeInfo {
        name: "probe".into(),
        advertise_addr: "127.0.0.99".into(),
        agent_version: "job_file_checks probe".into(),
        ..NodeInfo::default()
    };
    let registered =
        client.register(RegisterRequest { node: Some(info), ..Default::default() }).await.unwrap().into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let hello = Hello { node_name: "probe".into(), session_id: registered.session_id };
    tx.send(AgentMessage { msg: Some(Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut tick = tokio::time::interval(every);
    let mut sent: Vec<(u64, Instant)> = Vec::new();
    let mut latencies = Vec::new();
    let mut seq = 0;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return latencies,
            _ = tick.tick() => {
                seq += 1;
                sent.push((seq, Instant::now()));
                let hb = Heartbeat { seq, sent_unix_ms: now_unix_ms(), ..Heartbeat::default() };
                tx.send(AgentMessage { msg: Some(Msg::Heartbeat(hb)) }).await.unwrap();
            }
            message = inbound.message() => {
                let message = message.unwrap().expect("the controller closed the probe's session");
                if let Some(Command::HeartbeatAck(ack)) = message.command
                    && let Some(at) = sent.iter().find(|(s, _)| *s == ack.seq).map(|(_, at)| *at)
                {
                    latencies.push(at.elapsed());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_are_answered_while_eight_clients_send_worst_case_files() {
    // A short TTL: a controller whose runtime threads were busy parsing for
    // 2 s would mark the nodes Lost.
    let cluster = Cluster::start_with(
        vec![NodeSpec::loopback(0, 1)],
        &["--insecure", "--node-ttl", "2s", "--heartbeat-interval", "200ms", "--api-rate-limit", "0"],
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let probe = tokio::spawn(probe_node(cluster.url.clone(), Duration::from_millis(100), stopped));

    let file = worst_case_file();
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = cluster.client().await.unwrap();
        let file = file.clone();
        clients.spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..3 {
                let plan = client.plan_job(PlanJobRequest { file: Some(file.clone()), check: false }).await.unwrap();
                answers.push(plan.into_inner().problems);
            }
            answers
        });
    }
    let (mut checked, mut too_slow) = (0, 0);
    while let Some(answers) = clients.join_next().await {
        for problems in answers.unwrap() {
            match problems.first() {
                None => checked += 1,
                Some(p) if p.message.contains("took too long to check") => {
                    assert!(p.message.contains("--job-file-check-timeout"), "{}", p.message);
                    too_slow += 1;
                }
                Some(p) => panic!("unexpected problem with the worst-case file: {}", p.message),
            }
        }
    }
    let busy = started.elapsed();
    // Every node, the probe too, is read while its session is still open: a
    // closed stream makes a node Suspect at once (the liveness rule).
    let mut client = cluster.client().await.unwrap();
    let nodes = client.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
    stop.send(()).unwrap();
    let mut latencies = probe.await.unwrap();
    for node in &nodes {
        let name = node.info.as_ref().map(|i| i.name.as_str()).unwrap_or_default();
        assert_eq!(node.state, NodeState::Ready as i32, "node {name} is not Ready after the flood: {node:?}");
    }
    assert!(!cluster.controller_log().contains("node lost"), "{}", cluster.controller_log());
    assert!(checked > 0, "no worst-case file was checked at all");
    latencies.sort();
    assert!(latencies.len() >= 10, "too few heartbeats acknowledged: {}", latencies.len());
    // Not a speed target: a heartbeat answered later than the node TTL is a
    // node the controller could not tell from a lost one (the old handlers,
    // parsing on the runtime, answered 11 s late here with 2 cores).
    let slowest = latencies[latencies.len() - 1];
    assert!(slowest < Duration::from_secs(2), "a heartbeat waited {slowest:?}, over the node TTL of 2 s");
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "controller heartbeat p99 while 8 clients send worst-case files: p50 {:?}, p99 {:?}, max {:?} over {} heartbeats \
         in {busy:?}; {checked} files checked, {too_slow} refused as too slow to check",
        p(0.5),
        p(0.99),
        latencies[latencies.len() - 1],
        latencies.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_takes_too_long_to_check_is_refused_and_named() {
    let cluster =
        Cluster::start_with(vec![NodeSpec::loopback(0, 1)], &["--insecure", "--job-file-check-timeout", "20ms"])
            .await
            .unwrap();
    let mut client = cluster.client().await.unwrap();
    let refused =
        client.submit_job(SubmitJobRequest { file: Some(worst_case_file()), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    for part in ["worst.yaml", "took too long to check", "--job-file-check-timeout"] {
        assert!(refused.message().contains(part), "{part:?} missing from: {}", refused.message());
    }
    let plan =
        client.plan_job(PlanJobRequest { file: Some(worst_case_file()), check: false }).await.unwrap().into_inner();
    assert!(plan.problems.iter().any(|p| p.message.contains("took too long to check")), "{:?}", plan.problems);
    // A small file is checked in time once the refused ones have let go of
    // the checker (each runs to its end on its blocking thread).
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        match cluster.submit("name: small\nkind: command\nnodes: 1\ncommand: ['true']\n").await {
            Ok(job) => break job,
            Err(e) if Instant::now() < deadline && e.to_string().contains("took too long") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("a small job file was refused: {e:#}"),
        }
    };
    assert_eq!(job.name, "small");
}
