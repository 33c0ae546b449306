//! A controller that accepts the connection and the call but never answers
//! Register (a stuck process whose HTTP/2 layer still answers pings, so no
//! keep-alive notices) must not hold the agent: after its answer timeout
//! (15 s) the agent tries the next controller.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cohort_proto::agent_service_server::{AgentService, AgentServiceServer};
use cohort_proto::{AgentMessage, ControllerMessage, FetchSyncRequest, RegisterRequest, RegisterResponse, SyncChunk};
use tonic::{Request, Response, Status, Streaming};

struct FakeController {
    registers: Arc<AtomicUsize>,
    /// Answer Register at once (with a refusal), or never.
    answers: bool,
}

#[tonic::async_trait]
impl AgentService for FakeController {
    async fn register(&self, _request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        self.registers.fetch_add(1, Ordering::SeqCst);
        if self.answers {
            return Err(Status::unavailable("a test controller that leads nothing"));
        }
        std::future::pending().await
    }

    type SessionStream = futures::stream::Pending<Result<ControllerMessage, Status>>;

    async fn session(
        &self,
        _request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("a test controller"))
    }

    type FetchSyncStream = futures::stream::Pending<Result<SyncChunk, Status>>;

    async fn fetch_sync(&self, _request: Request<FetchSyncRequest>) -> Result<Response<Self::FetchSyncStream>, Status> {
        Err(Status::unimplemented("a test controller"))
    }
}

/// Serves a fake controller on a free loopback port; returns its URL and its Register count.
async fn serve(answers: bool) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let registers = Arc::new(AtomicUsize::new(0));
    let service = AgentServiceServer::new(FakeController { registers: registers.clone(), answers });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (url, registers)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_controller_that_never_answers_register_is_left_for_the_next() {
    let (stuck, stuck_calls) = serve(false).await;
    let (next, next_calls) = serve(true).await;
    let work = tempfile::tempdir().unwrap();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_cohort-agent"))
        .args(["--controller", &format!("{stuck},{next}"), "--insecure", "--node-name", "stuck-test"])
        .args(["--advertise-addr", "127.0.0.1", "--fake-gpus", "1", "--max-backoff", "1s", "--allow-root-ranks"])
        .arg("--work-dir")
        .arg(work.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let deadline = began + Duration::from_secs(45);
    while next_calls.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        if let Some(status) = agent.try_wait().unwrap() {
            let log = std::fs::read_to_string(work.path().join("agent.log")).unwrap_or_default();
            panic!("the agent exited ({status}):\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = began.elapsed();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(stuck_calls.load(Ordering::SeqCst), 1, "the agent first called the stuck controller");
    assert!(next_calls.load(Ordering::SeqCst) > 0, "the agent stayed with the stuck controller for {waited:?}");
    eprintln!("figures: next controller tried {:.1} s after the stuck one got Register", waited.as_secs_f64());
}
