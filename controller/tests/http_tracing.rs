//! `--otlp-endpoint`: spans of the HTTP handlers (and the `attempt` spans the
//! state machine opens) reach an OTLP/gRPC collector. The collector is a fake
//! one run here: opentelemetry-proto's TraceService on a tonic server.
//! (RUST_LOG, when set, must let `cohort_controller=debug` through: the HTTP
//! handlers' spans are at debug level.)
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cohort_controller::{ControllerConfig, ServeConfig, StoreConfig, serve};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::mpsc;

struct FakeCollector {
    received: mpsc::UnboundedSender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for FakeCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.received.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn start_collector() -> (SocketAddr, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(FakeCollector { received: tx }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match &kv.value {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) => Some(s.clone()),
        Some(AnyValue { value: Some(any_value::Value::IntValue(i)) }) => Some(i.to_string()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_to_the_otlp_endpoint() {
    let (collector, mut received) = start_collector().await;
    let guard = cohort_runtime::telemetry::init_with_otlp(
        "info,cohort_controller=debug",
        "cohort-controller-test",
        Some(&format!("http://{collector}")),
    )
    .unwrap();
    assert!(guard.is_exporting());

    let dir = tempfile::tempdir().unwrap();
    let (listen, http) = (free_addr(), free_addr());
    let config = ServeConfig {
        listen,
        data_dir: dir.path().join("data"),
        controller: ControllerConfig::default(),
        store: StoreConfig::Embedded,
        id: None,
        advertise_url: None,
        leader_ttl: Duration::from_secs(3),
        http: Some(http),
        security: None,
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(config, rx));
    let url = format!("http://{http}/api/jobs/no-such-job/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match reqwest::get(&url).await {
            Ok(r) if r.status() == 404 => break,
            _ => {
                assert!(tokio::time::Instant::now() < deadline, "the HTTP listener never answered 404 for {url}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // What the lead's state machine spans look like.
    tracing::info_span!("attempt", job = "sft-7", attempt = 2u32).in_scope(|| tracing::info!("launched"));
    let _ = stop.send(true);
    let _ = server.await;

    // Shutting the exporter down sends what is queued.
    tokio::task::spawn_blocking(move || guard.shutdown()).await.unwrap().unwrap();
    let mut spans = Vec::new();
    let mut service_names = Vec::new();
    while let Ok(request) = received.try_recv() {
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            service_names.extend(text(&resource.attributes, "service.name"));
            spans.extend(resource_spans.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let handler =
        spans.iter().find(|s| s.name == "job_metrics").unwrap_or_else(|| panic!("no job_metrics in {names:?}"));
    assert_eq!(text(&handler.attributes, "job").as_deref(), Some("no-such-job"), "{handler:?}");
    let attempt = spans.iter().find(|s| s.name == "attempt").unwrap_or_else(|| panic!("no attempt in {names:?}"));
    assert_eq!(text(&attempt.attributes, "job").as_deref(), Some("sft-7"));
    assert_eq!(text(&attempt.attributes, "attempt").as_deref(), Some("2"));
    assert!(attempt.events.iter().any(|e| e.name == "launched"), "{attempt:?}");
    assert!(service_names.iter().all(|n| n == "cohort-controller-test") && !service_names.is_empty());
}
