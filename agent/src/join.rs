//! The node's certificate: reused from the TLS directory while it is valid
//! and names this node; otherwise made by joining: the agent makes a key (it
//! never leaves the node), sends a signing request with a join token, and
//! keeps the certificate the controller returns.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use cohort_proto::JoinRequest;
use cohort_proto::security_service_client::SecurityServiceClient;
use cohort_runtime::tls::{self, ClientTls, PeerKind, TlsError, files};

/// A certificate this close to its end is replaced by joining again.
const RENEW_BEFORE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(
        "no cluster CA: pass --ca-cert with the ca.crt of `cohort-controller init` (or --insecure for a controller that runs --insecure)"
    )]
    NoCa,
    #[error(
        "node {node} has no certificate in {dir}: pass --join-token (make one with `cohort token create --role join`)"
    )]
    NoToken { node: String, dir: PathBuf },
    #[error("the controller refused to let node {node} join: {message}")]
    Refused { node: String, message: String },
}

pub struct JoinConfig<'a> {
    pub node: &'a str,
    pub tls_dir: &'a Path,
    pub ca_cert: Option<&'a Path>,
    pub join_token: Option<&'a str>,
    pub controller_urls: &'a [String],
    pub max_backoff: Duration,
}

/// The TLS settings of this agent's connections, joining first if needed.
pub async fn node_tls(config: JoinConfig<'_>) -> Result<ClientTls, JoinError> {
    let saved_ca = config.tls_dir.join(files::CA_CERT);
    let ca_pem = match config.ca_cert {
        Some(path) => tls::read(path)?,
        None if saved_ca.exists() => tls::read(&saved_ca)?,
        None => return Err(JoinError::NoCa),
    };
    let (cert_path, key_path) = (config.tls_dir.join(files::NODE_CERT), config.tls_dir.join(files::NODE_KEY));
    if let Some(identity) = saved_identity(&cert_path, &key_path, config.node) {
        tracing::info!(cert = %cert_path.display(), "using this node's certificate");
        return Ok(ClientTls { ca_pem, identity: Some(identity) });
    }
    let token = config
        .join_token
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| JoinError::NoToken { node: config.node.to_string(), dir: config.tls_dir.to_path_buf() })?;
    let (key_pem, csr_pem) = tls::pki::node_csr(config.node)?;
    let server_only = ClientTls { ca_pem: ca_pem.clone(), identity: None };
    let request = JoinRequest { token: token.to_string(), node_name: config.node.to_string(), csr_pem };
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(config.max_backoff)
        .with_jitter()
        .without_max_times()
        .build();
    let mut next = 0usize;
    let joined = loop {
        let url = &config.controller_urls[next % config.controller_urls.len()];
        next += 1;
        match join_once(url, &server_only, request.clone()).await {
            Ok(joined) => break joined,
            Err(Attempt::Refused(message)) => {
                return Err(JoinError::Refused { node: config.node.to_string(), message });
            }
            Err(Attempt::Unreachable(e)) => {
                let delay = delays.next().unwrap_or(config.max_backoff);
                tracing::warn!(controller = %url, error = %e, retry_in = ?delay, "cannot join yet");
                tokio::time::sleep(delay).await;
            }
        }
    };
    tls::write(&key_path, &key_pem, true)?;
    tls::write(&cert_path, &joined.cert_pem, false)?;
    if !saved_ca.exists() {
        tls::write(&saved_ca, &joined.ca_pem, false)?;
    }
    tracing::info!(node = %config.node, cert = %cert_path.display(), "joined the cluster: certificate issued");
    Ok(ClientTls { ca_pem, identity: Some((joined.cert_pem, key_pem)) })
}

enum Attempt {
    Refused(String),
    Unreachable(String),
}

async fn join_once(url: &str, tls: &ClientTls, request: JoinRequest) -> Result<cohort_proto::JoinResponse, Attempt> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Attempt::Refused(format!("invalid controller URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(3));
    let endpoint = tls.apply(endpoint).map_err(|e| Attempt::Refused(e.to_string()))?;
    let channel = endpoint.connect().await.map_err(|e| Attempt::Unreachable(cohort_runtime::error_chain(&e)))?;
    match SecurityServiceClient::new(channel).join(request).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded) => {
            Err(Attempt::Unreachable(status.message().to_string()))
        }
        Err(status) => Err(Attempt::Refused(status.message().to_string())),
    }
}

/// The saved certificate and key, if they are this node's and not about to expire.
fn saved_identity(cert_path: &Path, key_path: &Path, node: &str) -> Option<(String, String)> {
    let cert = std::fs::read_to_string(cert_path).ok()?;
    let key = std::fs::read_to_string(key_path).ok()?;
    let id = tls::pki::identity_of_pem(&cert).ok()?;
    if id.kind != PeerKind::Node || id.name != node {
        tracing::warn!(cert = %cert_path.display(), holder = %id.name, "the saved certificate is not this node's; joining again");
        return None;
    }
    let ends = tls::pki::not_after(&cert).ok()?;
    if ends < SystemTime::now() + RENEW_BEFORE {
        tracing::warn!(cert = %cert_path.display(), "the saved certificate expires within a day; joining again");
        return None;
    }
    Some((cert, key))
}
