//! A whole cluster in one process: the controller's `serve` and three agents'
//! `serve`, each with its own work dir, fake GPUs and shutdown handle; only
//! the ranks (and their shims) are processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cohort_agent::gpu::{FakeGpuFlags, ReaderMode, open_backend};
use cohort_agent::rank_user::RankUserPolicy;
use cohort_agent::supervisor::OutputBudget;
use cohort_agent::{AgentConfig, AgentDeps};
use cohort_controller::{ControllerConfig, ServeConfig, StoreConfig};
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{GetJobRequest, JobFile, JobState, ListNodesRequest, NodeState, SubmitJobRequest};
use cohort_tests::{SparePort, bin, state};
use tokio::sync::watch;

fn agent_config(i: usize, url: &str, work: &std::path::Path) -> AgentConfig {
    AgentConfig {
        node_name: format!("node{i}"),
        advertise_addr: format!("127.0.0.{}", i + 2).parse().unwrap(),
        controller_urls: vec![url.to_string()],
        insecure: true,
        work_dir: work.join(format!("node{i}")),
        labels: Default::default(),
        node_env: Vec::new(),
        telemetry_interval: Duration::from_secs(1),
        gpu_indices: None,
        python: "python3".into(),
        cache_dir: None,
        cache_max: None,
        stage_parallel: 1,
        py_spy: None,
        max_backoff: Duration::from_secs(1),
        fence_after: Duration::from_secs(30),
        keep_ranks_on_exit: false,
        ca_cert: None,
        join_token: None,
        tls_dir: None,
        peer_port: Some(0),
        peer_piece_bytes: 64 << 20,
        peer_stall: cohort_agent::peer::STALL,
        // Tests run as root and start their ranks as themselves.
        rank_users: RankUserPolicy::agent_user(),
        cgroup_root: Default::default(),
        job_limits: Default::default(),
        output_budget: OutputBudget { per_second: 0, burst: 8 << 20 },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_and_three_agents_in_one_process_run_a_gang_and_stop() {
    let work = tempfile::tempdir().unwrap();
    // One locked block of ports: the controller's and the MASTER_PORT range.
    let ports = SparePort::take();
    let url = format!("http://{}", ports.addr());
    let (stop, shutdown) = watch::channel(false);
    let controller = tokio::spawn(cohort_controller::serve(
        ServeConfig {
            listen: ports.addr().parse().unwrap(),
            data_dir: work.path().join("controller"),
            controller: ControllerConfig { master_ports: ports.port + 1..=ports.port + 39, ..Default::default() },
            store: StoreConfig::Embedded,
            id: Some("controller".into()),
            advertise_url: None,
            leader_ttl: Duration::from_secs(10),
            http: None,
            security: None,
        },
        shutdown.clone(),
    ));
    let agents: Vec<_> = (0..3)
        .map(|i| {
            let gpus = open_backend(FakeGpuFlags { count: Some(1), ..Default::default() }, ReaderMode::Auto).unwrap();
            let deps = AgentDeps { gpus, agent_exe: bin("cohort-agent") };
            tokio::spawn(cohort_agent::serve(agent_config(i, &url, work.path()), deps, shutdown.clone()))
        })
        .collect();

    let mut client = loop {
        match JobServiceClient::connect(url.clone()).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let yaml = "name: sandbox\nkind: command\nnodes: 3\ngpus_per_node: 1\ncommand: [sh, -c, 'echo rank $RANK']\n";
    let file = JobFile { yaml: yaml.into(), source_name: "sandbox.yaml".into(), ..Default::default() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = client.list_nodes(ListNodesRequest {}).await.unwrap().into_inner().nodes;
        if nodes.iter().filter(|n| n.state == NodeState::Ready as i32).count() == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "three nodes not Ready: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let submitted = client.submit_job(SubmitJobRequest { file: Some(file), ..Default::default() }).await.unwrap();
    let id = submitted.into_inner().job.unwrap().id;
    let job = loop {
        let job = client.get_job(GetJobRequest { job: id.clone() }).await.unwrap().into_inner();
        if matches!(state(&job), JobState::Succeeded | JobState::Failed | JobState::Cancelled)
            && job.live_processes == 0
        {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} did not finish: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state(&job), JobState::Succeeded, "{job:?}");
    assert_eq!(job.processes.len(), 3, "{job:?}");
    assert!(job.processes.iter().all(|p| p.exit_code == Some(0)), "{job:?}");

    // One shutdown handle stops the whole sandbox.
    stop.send(true).unwrap();
    for agent in agents {
        tokio::time::timeout(Duration::from_secs(15), agent).await.unwrap().unwrap().unwrap();
    }
    tokio::time::timeout(Duration::from_secs(15), controller).await.unwrap().unwrap().unwrap();
}
