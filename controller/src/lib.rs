//! The Cohort controller: job API, agent sessions, planner and state.
#![forbid(unsafe_code)]

/// `println!` that ends the process quietly when stdout is closed (`cohort jobs | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

pub mod api;
pub mod cli;
pub mod cli_metrics;
pub mod controller;
pub mod error;
pub mod logs;
pub mod metrics;
pub mod planner;
pub mod plot;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cohort_proto::agent_service_server::AgentServiceServer;
use cohort_proto::job_service_server::JobServiceServer;

pub use controller::{Controller, ControllerConfig};

/// How long open streams get to finish after SIGTERM (well under systemd's TimeoutStopSec).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything a controller process needs.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub controller: ControllerConfig,
}

/// Runs a whole controller until `shutdown` fires: loads the store, serves the
/// gRPC API, runs the reconcile loop; then stops accepting and returns.
pub async fn serve(config: ServeConfig, mut shutdown: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let store = Arc::new(store::EmbeddedStore::open(&config.data_dir)?);
    let controller = Controller::load(store, &config.data_dir, config.controller).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, data_dir = %config.data_dir.display(), "controller serving");

    let reconcile = tokio::spawn(controller.clone().run(shutdown.clone()));
    let api = api::Api {
        controller: controller.clone(),
        controller_id: format!("controller-{}", local.port()),
        advertise_url: format!("http://{local}"),
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut drain = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(AgentServiceServer::new(api.clone()).max_decoding_message_size(16 << 20))
        .add_service(JobServiceServer::new(api).max_decoding_message_size(4 << 20))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
            tracing::info!("shutting down: no new connections");
            // Ending the session streams lets agents fail over or retry.
            controller.close_sessions().await;
        });
    tokio::select! {
        result = server => result?,
        _ = async {
            let _ = drain.changed().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => tracing::warn!("open streams did not close within {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    reconcile.abort();
    Ok(())
}
