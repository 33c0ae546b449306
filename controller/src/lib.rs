//! The Cohort controller: job API, agent sessions, planner and state.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod error;
pub mod http;
pub mod leader;
pub mod leading;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod planner;
pub mod queues;
pub mod secrets;
pub mod security;
pub mod store;
pub mod sync_store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cohort_proto::agent_service_server::AgentServiceServer;
use cohort_proto::job_service_server::JobServiceServer;

pub use controller::{Controller, ControllerConfig};

/// How long open streams get to finish after SIGTERM (well under systemd's TimeoutStopSec).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// One redb file in the data dir: one controller, no etcd needed.
    Embedded,
    /// etcd: several controllers, one leader.
    Etcd { endpoints: Vec<String>, prefix: String },
}

/// Everything a controller process needs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub controller: ControllerConfig,
    pub store: StoreConfig,
    /// This controller's name in the election (default: host name and port).
    pub id: Option<String>,
    /// The URL agents and other controllers reach this one at (default: http://<listen>).
    pub advertise_url: Option<String>,
    /// The leader's lease: a leader that cannot renew it for this long is replaced.
    pub leader_ttl: std::time::Duration,
    /// Where to serve /healthz, /metrics, the JSON API and the web page (none: no HTTP).
    pub http: Option<SocketAddr>,
    /// TLS and tokens; None serves plaintext and checks nobody (`--insecure`).
    pub security: security::Security,
}

/// Runs a whole controller until `shutdown` fires: serves the gRPC API and,
/// while it leads (always, with the embedded store), loads the state and runs
/// the reconcile loop; then stops accepting and returns.
pub async fn serve(config: ServeConfig, mut shutdown: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr()?;
    let http_listener = match config.http {
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on --http {addr}: {e}"))?;
            tracing::info!(http = %http.local_addr()?, "HTTP: /healthz, /metrics, /api and the web page");
            Some(http)
        }
        None => None,
    };
    let host =
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "controller".into());
    let id = config.id.clone().unwrap_or_else(|| format!("{host}-{}", local.port()));
    let scheme = if config.security.is_some() { "https" } else { "http" };
    let url = config.advertise_url.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let (store, leader): (Arc<dyn store::Store>, _) = match &config.store {
        StoreConfig::Embedded => {
            (Arc::new(store::EmbeddedStore::open(&config.data_dir)?), leader::single(id.clone(), url.clone()))
        }
        StoreConfig::Etcd { endpoints, prefix } => {
            let store = store::EtcdStore::connect(endpoints, prefix).await?;
            let leader = leader::etcd(endpoints, prefix, &id, &url, config.leader_ttl, shutdown.clone()).await?;
            (Arc::new(store), leader)
        }
    };
    tracing::info!(listen = %local, id = %id, store = ?config.store, data_dir = %config.data_dir.display(), "controller serving");
    cohort_runtime::service::notify_ready(&format!("serving on {local} as {id}"));

    let limits = config.controller.limits;
    let leading = leading::Leading::new(id, url, leader, config.security.as_ref().map(|s| s.client.clone()));
    let shared_store = matches!(config.store, StoreConfig::Etcd { .. });
    let security_api = security::SecurityApi { state: config.security.clone(), store: store.clone() };
    let leadership = tokio::spawn(leading.clone().run(
        store,
        config.data_dir.clone(),
        config.controller,
        shared_store,
        shutdown.clone(),
    ));
    let http_tls = match &config.security {
        Some(state) => Some((state.server.https()?, state.token_key.clone())),
        None => None,
    };
    let http_server = http_listener.map(|listener| {
        tokio::spawn(http::serve(listener, http::HttpApi { leading: leading.clone() }, http_tls, shutdown.clone()))
    });
    let api = api::Api { leading: leading.clone() };
    let rate_limit = limits::RateLimit::new(&limits);
    rate_limit.spawn_cleanup();
    let job_api = tonic::service::interceptor::InterceptedService::new(
        JobServiceServer::new(api.clone()).max_decoding_message_size(limits.max_request_bytes),
        move |request| rate_limit.check(request),
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut drain = shutdown.clone();
    // Server reflection (v1 and v1alpha, as grpcurl and other tools ask either),
    // so any gRPC client can list and call the API without the .proto files.
    // Only the services a controller serves (the protos also hold the agents' PeerService).
    let served = ["cohort.v1.AgentService", "cohort.v1.JobService", "cohort.v1.SecurityService"];
    let reflection = served
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, name| b.with_service_name(*name))
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .register_encoded_file_descriptor_set(cohort_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = served
        .iter()
        .fold(tonic_reflection::server::Builder::configure(), |b, name| b.with_service_name(*name))
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .register_encoded_file_descriptor_set(cohort_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(state) = &config.security {
        builder = builder.tls_config(state.server.grpc())?;
    } else {
        tracing::warn!(
            "--insecure: plaintext gRPC and HTTP, no certificates, no tokens; anyone who reaches this port can run commands on every node"
        );
    }
    let auth = security::AuthLayer { key: config.security.as_ref().map(|s| s.token_key.clone()) };
    let server = builder
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .layer(auth)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(AgentServiceServer::new(api).max_decoding_message_size(limits.max_agent_message_bytes))
        .add_service(job_api)
        .add_service(cohort_proto::security_service_server::SecurityServiceServer::new(security_api))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
            tracing::info!("shutting down: no new connections");
            // Ending the session streams lets agents fail over or retry.
            if let Some(controller) = leading.controller().await {
                controller.close_sessions().await;
                // What was changed before the shutdown reaches the store.
                controller.flush_store().await;
            }
        });
    tokio::select! {
        result = server => result?,
        _ = async {
            let _ = drain.changed().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("open streams did not close within {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    if let Some(server) = http_server {
        server.abort();
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, leadership).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "leadership loop failed"),
        Err(_) => tracing::warn!("leadership loop did not stop in time"),
        _ => {}
    }
    Ok(())
}
