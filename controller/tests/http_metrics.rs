//! `--http`: a controller run in-process, a fake agent over gRPC (two GPUs with
//! telemetry, one job that it "runs"), then `/metrics` parsed as Prometheus
//! text, and the JSON API the web page reads.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cohort_controller::{ControllerConfig, ServeConfig, StoreConfig, serve};
use cohort_proto::agent_service_client::AgentServiceClient;
use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{
    AgentMessage, GetJobRequest, GpuHealth, GpuHealthState, GpuInfo, GpuTelemetry, Heartbeat, Hello, JobFile, JobState,
    MetricsBatch, NodeInfo, PrepareResult, ProcessEvent, ProcessStarted, RegisterRequest, RunningLaunch,
    RunningProcess, SubmitJobRequest, TrainingPoint, agent_message::Msg, controller_message::Command, now_unix_ms,
    process_event::Event,
};
use prometheus_parse::{Sample, Scrape, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const GIB: u64 = 1 << 30;

/// A port free now (bound, then released): serve() takes addresses, not listeners.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

struct Controller {
    grpc: String,
    http: String,
    stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn start_controller() -> Controller {
    let dir = tempfile::tempdir().unwrap();
    let (listen, http) = (free_addr(), free_addr());
    let config = ServeConfig {
        listen,
        data_dir: dir.path().join("data"),
        controller: ControllerConfig::default(),
        store: StoreConfig::Embedded,
        id: Some("test-controller".into()),
        advertise_url: None,
        leader_ttl: Duration::from_secs(3),
        http: Some(http),
        security: None,
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = serve(config, rx).await {
            panic!("controller failed: {e:#}");
        }
    });
    let c = Controller { grpc: format!("http://{listen}"), http: format!("http://{http}"), stop, _dir: dir };
    // Up once /healthz answers "ok leader".
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/healthz", c.http)).await
            && r.status() == 200
            && r.text().await.unwrap().starts_with("ok leader")
        {
            return c;
        }
        assert!(tokio::time::Instant::now() < deadline, "the controller's /healthz never said ok leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn telemetry() -> Vec<GpuTelemetry> {
    vec![
        GpuTelemetry {
            index: 0,
            uuid: "GPU-0000aaaa".into(),
            utilization_gpu_pct: Some(87),
            utilization_memory_pct: Some(41),
            memory_used_bytes: Some(61 * GIB),
            memory_total_bytes: Some(80 * GIB),
            temperature_c: Some(71),
            power_w: Some(612.5),
            power_limit_w: Some(700.0),
            sm_clock_mhz: Some(1980),
            ecc_volatile_corrected: Some(0),
            ecc_volatile_uncorrected: Some(0),
            ecc_aggregate_corrected: Some(3),
            ecc_aggregate_uncorrected: Some(0),
            health: Some(GpuHealth { state: GpuHealthState::Healthy as i32, ..Default::default() }),
            ..Default::default()
        },
        GpuTelemetry {
            index: 1,
            uuid: "GPU-1111bbbb".into(),
            utilization_gpu_pct: Some(0),
            memory_used_bytes: Some(0),
            memory_total_bytes: Some(80 * GIB),
            temperature_c: Some(88),
            // No power reading: the series is absent, not 0.
            throttle_reasons: vec!["HW_THERMAL_SLOWDOWN".into()],
            health: Some(GpuHealth {
                state: GpuHealthState::Warning as i32,
                reasons: vec!["thermal slowdown".into()],
                since_unix_ms: now_unix_ms(),
            }),
            ..Default::default()
        },
    ]
}

/// Registers node `gpu-node-1` with two GPUs and plays its agent: heartbeats with
/// telemetry, answers preparation, "starts" what it is told to launch.
async fn fake_agent(grpc: &str) {
    let mut client = AgentServiceClient::connect(grpc.to_string()).await.unwrap();
    let gpu = |index: u32, uuid: &str| GpuInfo {
        index,
        uuid: uuid.into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_total_bytes: 80 * GIB,
        ..Default::default()
    };
    let node = NodeInfo {
        name: "gpu-node-1".into(),
        advertise_addr: "127.0.0.9".into(),
        gpus: vec![gpu(0, "GPU-0000aaaa"), gpu(1, "GPU-1111bbbb")],
        agent_version: "test".into(),
        ..Default::default()
    };
    let session_id = client
        .register(RegisterRequest { node: Some(node), running: vec![], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let (tx, rx) = mpsc::unbounded_channel();
    let send = move |msg: Msg| tx.send(AgentMessage { msg: Some(msg) }).is_ok();
    send(Msg::Hello(Hello { node_name: "gpu-node-1".into(), session_id }));
    let mut down = client.session(UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let running = std::sync::Arc::new(std::sync::Mutex::new(Vec::<RunningLaunch>::new()));
    let beat = send.clone();
    let launches = running.clone();
    tokio::spawn(async move {
        for seq in 1.. {
            let running = launches.lock().unwrap().clone();
            let hb = Heartbeat { seq, sent_unix_ms: now_unix_ms(), running, gpus: telemetry() };
            if !beat(Msg::Heartbeat(hb)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(message)) = down.message().await {
            match message.command {
                Some(Command::Prepare(p)) => {
                    send(Msg::PrepareResult(PrepareResult {
                        job_id: p.job_id,
                        attempt: p.attempt,
                        ..Default::default()
                    }));
                }
                Some(Command::Launch(l)) => {
                    let started = now_unix_ms();
                    running.lock().unwrap().push(RunningLaunch {
                        job_id: l.job_id.clone(),
                        attempt: l.attempt,
                        processes: vec![RunningProcess { index: 0, pid: 4242, started_unix_ms: started, exited: None }],
                    });
                    send(Msg::ProcessEvent(ProcessEvent {
                        job_id: l.job_id.clone(),
                        attempt: l.attempt,
                        index: 0,
                        event: Some(Event::Started(ProcessStarted {
                            pid: 4242,
                            started_unix_ms: started,
                            ..Default::default()
                        })),
                    }));
                    let point = |iteration: u64, loss: f64| TrainingPoint {
                        iteration,
                        total_iterations: Some(100),
                        loss: Some(loss),
                        learning_rate: Some(2e-5),
                        iteration_time_s: Some(1.25),
                        throughput_tflops: Some(312.5),
                        format: "megatron-lm".into(),
                        node_name: "gpu-node-1".into(),
                        ..Default::default()
                    };
                    send(Msg::Metrics(MetricsBatch {
                        job_id: l.job_id,
                        attempt: l.attempt,
                        points: vec![point(10, 2.5), point(20, 1.75)],
                    }));
                }
                _ => {}
            }
        }
    });
}

fn gpu_labels<'a>(gpu: &'a str, uuid: &'a str, job: &'a str) -> [(&'static str, &'a str); 4] {
    [("node", "gpu-node-1"), ("gpu", gpu), ("uuid", uuid), ("job", job)]
}

/// The one sample of `name` whose labels include all of `labels`.
fn sample<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

fn gauge(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).value {
        Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{name} is not a gauge: {other:?}"),
    }
}

async fn scrape(http: &str) -> (String, Scrape) {
    let text = reqwest::get(format!("{http}/metrics")).await.unwrap().text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    (text, scrape)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_nodes_gpus_and_the_job_with_its_training_progress() {
    let controller = start_controller().await;
    fake_agent(&controller.grpc).await;

    let mut jobs = JobServiceClient::connect(controller.grpc.clone()).await.unwrap();
    let yaml = "name: sft\nkind: command\nnodes: 1\ngpus_per_node: 1\ncommand: [python3, train.py]\n";
    let file =
        JobFile { yaml: yaml.into(), source_name: "sft.yaml".into(), base_dir: "/tmp".into(), ..JobFile::default() };
    let job = jobs
        .submit_job(SubmitJobRequest { file: Some(file), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let job = loop {
        let now = jobs.get_job(GetJobRequest { job: job.id.clone() }).await.unwrap().into_inner();
        if now.state == JobState::Running as i32 && now.progress.as_ref().is_some_and(|p| p.iteration == 20) {
            break now;
        }
        assert!(tokio::time::Instant::now() < deadline, "job never ran with progress: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let plan = job.plan.clone().unwrap();
    let busy = plan.nodes[0].gpu_indices[0];
    let (busy, idle) = if busy == 0 { ("0", "1") } else { ("1", "0") };
    let uuid: HashMap<&str, &str> = [("0", "GPU-0000aaaa"), ("1", "GPU-1111bbbb")].into();

    let (text, s) = scrape(&controller.http).await;
    let ctx = || text.clone();
    // Counts by state, every state present.
    assert_eq!(gauge(&s, "cohort_nodes", &[("state", "ready")]), 1.0, "{}", ctx());
    assert_eq!(gauge(&s, "cohort_nodes", &[("state", "lost")]), 0.0);
    assert_eq!(gauge(&s, "cohort_gpus", &[("health", "healthy")]), 1.0);
    assert_eq!(gauge(&s, "cohort_gpus", &[("health", "warning")]), 1.0);
    assert_eq!(gauge(&s, "cohort_gpus", &[("health", "unhealthy")]), 0.0);
    assert_eq!(gauge(&s, "cohort_jobs", &[("state", "running")]), 1.0);
    assert_eq!(gauge(&s, "cohort_jobs", &[("state", "pending")]), 0.0);
    assert_eq!(gauge(&s, "cohort_controller_leader", &[("controller", "test-controller")]), 1.0);

    // Per GPU: labelled node, gpu, uuid and the job holding it (empty when idle).
    let holder = |gpu: &str| if gpu == busy { job.id.as_str() } else { "" };
    let g0 = gpu_labels("0", uuid["0"], holder("0"));
    let g1 = gpu_labels("1", uuid["1"], holder("1"));
    assert_eq!(gauge(&s, "cohort_gpu_utilization_percent", &g0), 87.0, "{}", ctx());
    assert_eq!(gauge(&s, "cohort_gpu_utilization_percent", &g1), 0.0);
    assert_eq!(gauge(&s, "cohort_gpu_memory_utilization_percent", &g0), 41.0);
    assert_eq!(gauge(&s, "cohort_gpu_memory_used_bytes", &g0), (61 * GIB) as f64);
    assert_eq!(gauge(&s, "cohort_gpu_memory_total_bytes", &g1), (80 * GIB) as f64);
    assert_eq!(gauge(&s, "cohort_gpu_temperature_celsius", &g1), 88.0);
    assert_eq!(gauge(&s, "cohort_gpu_power_watts", &g0), 612.5);
    assert_eq!(gauge(&s, "cohort_gpu_power_limit_watts", &g0), 700.0);
    assert_eq!(gauge(&s, "cohort_gpu_sm_clock_hertz", &g0), 1.98e9);
    let ecc: Vec<(&str, &str)> = g0.iter().copied().chain([("scope", "aggregate"), ("kind", "corrected")]).collect();
    assert_eq!(gauge(&s, "cohort_gpu_ecc_errors", &ecc), 3.0);
    assert!(!s.samples.iter().any(|x| x.metric == "cohort_gpu_power_watts" && x.labels.get("gpu") == Some("1")));
    let warn: Vec<(&str, &str)> = g1.iter().copied().chain([("health", "warning")]).collect();
    assert_eq!(gauge(&s, "cohort_gpu_health", &warn), 1.0);
    // The job label follows the plan: the granted GPU carries the job, the other is idle.
    let jobs_of = |gpu: &str| {
        s.samples
            .iter()
            .filter(|x| x.metric == "cohort_gpu_utilization_percent" && x.labels.get("gpu") == Some(gpu))
            .map(|x| x.labels.get("job").unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(jobs_of(busy), [job.id.as_str()]);
    assert_eq!(jobs_of(idle), [""]);

    // Per job, from its newest training point.
    let j = [("job", job.id.as_str()), ("name", "sft")];
    assert_eq!(gauge(&s, "cohort_job_iteration", &j), 20.0);
    assert_eq!(gauge(&s, "cohort_job_total_iterations", &j), 100.0);
    assert_eq!(gauge(&s, "cohort_job_loss", &j), 1.75);
    assert_eq!(gauge(&s, "cohort_job_learning_rate", &j), 2e-5);
    assert_eq!(gauge(&s, "cohort_job_throughput_tflops", &j), 312.5);
    assert_eq!(gauge(&s, "cohort_job_iteration_seconds", &j), 1.25);
    assert_eq!(gauge(&s, "cohort_job_attempt", &j), 1.0);

    // OpenMetrics on request.
    let r = reqwest::Client::new()
        .get(format!("{}/metrics", controller.http))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(r.text().await.unwrap().trim_end().ends_with("# EOF"));

    // The JSON the web page reads.
    let cluster: serde_json::Value =
        reqwest::get(format!("{}/api/cluster", controller.http)).await.unwrap().json().await.unwrap();
    let node = &cluster["nodes"][0];
    assert_eq!(node["info"]["name"], "gpu-node-1");
    assert_eq!(node["telemetry"][1]["health"]["state"], "GPU_HEALTH_STATE_WARNING");
    assert_eq!(node["telemetry"][1]["health"]["reasons"][0], "thermal slowdown");
    assert_eq!(cluster["jobs"][0]["state"], "JOB_STATE_RUNNING");
    assert_eq!(cluster["jobs"][0]["progress"]["iteration"], "20");
    assert!(cluster["jobs"][0].get("file").is_none(), "the job file is left out");
    let points: Vec<serde_json::Value> =
        reqwest::get(format!("{}/api/jobs/{}/metrics", controller.http, job.id)).await.unwrap().json().await.unwrap();
    assert_eq!(points.iter().map(|p| p["iteration"].as_str().unwrap()).collect::<Vec<_>>(), ["10", "20"]);
    let later: Vec<serde_json::Value> = reqwest::get(format!("{}/api/jobs/{}/metrics?from=1", controller.http, job.id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    let missing = reqwest::get(format!("{}/api/jobs/nosuch/metrics", controller.http)).await.unwrap();
    assert_eq!(missing.status(), 404);

    // The page is one self-contained file.
    let page = reqwest::get(format!("{}/", controller.http)).await.unwrap().text().await.unwrap();
    assert!(page.contains("<svg") || page.contains("createElementNS"), "the page draws its chart itself");
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"), "no external assets");

    let _ = controller.stop.send(true);
}
