//! Security of every Cohort connection: the cluster CA and the certificates
//! it issues (`pki`), bearer tokens with a role (`token`), and the TLS
//! settings of servers and clients (`verify` holds the check that makes an
//! agent or the CLI talk only to a controller).
//!
//! Who is who: a certificate's subject says `O=cohort, OU=controller|node,
//! CN=<controller id | node name>`. Controllers hold server+client certs made
//! by `cohort-controller init`; nodes hold certs issued when they join with a
//! join token, which dial controllers and serve other nodes their staged
//! content (`ClientTls::peer_server`, `ClientTls::peer`). People (the CLI,
//! the web page) use bearer tokens.

pub mod pki;
pub mod token;
pub mod verify;

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

pub use pki::{ClusterCa, PeerIdentity, PeerKind};
pub use token::{Bearer, Claims, Role, TokenError, TokenKey};

/// File names inside a controller's TLS directory (`--tls-dir`).
pub mod files {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const TOKEN_KEY: &str = "token.key";
    pub const CONTROLLER_CERT: &str = "controller.crt";
    pub const CONTROLLER_KEY: &str = "controller.key";
    pub const ADMIN_TOKEN: &str = "admin.token";
    /// A node's own key and certificate, in the agent's TLS directory.
    pub const NODE_CERT: &str = "node.crt";
    pub const NODE_KEY: &str = "node.key";
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is said in the message and not chained as a source as well,
    // or `{:#}` (anyhow's chain) says it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{what}: {error}")]
    Certificate { what: String, error: rcgen::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS settings: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|error| TlsError::Io { path: path.to_path_buf(), error })
}

/// Writes a file readable by its owner only (keys, tokens) or by all (certificates).
pub fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let io = |error| TlsError::Io { path: path.to_path_buf(), error };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Write beside and rename, so a reader never sees half a key.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// What a TLS server of the controller presents and whom it trusts.
#[derive(Clone)]
pub struct ServerTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ServerTls {
    /// The controller's material from its TLS directory (`cohort-controller init`).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: read(&dir.join(files::CA_CERT))?,
            cert_pem: read(&dir.join(files::CONTROLLER_CERT))?,
            key_pem: read(&dir.join(files::CONTROLLER_KEY))?,
        })
    }

    /// gRPC: the controller's certificate; client certificates optional (the
    /// CLI has none, it sends a token) but, when sent, they must chain to the CA.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
            .timeout(std::time::Duration::from_secs(10))
    }

    /// HTTPS for the web page and /metrics (no client certificates: tokens).
    pub fn https(&self) -> Result<rustls::ServerConfig, TlsError> {
        use rustls::pki_types::pem::PemObject as _;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Invalid(format!("controller certificate: {e}")))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("controller key: {e}")))?;
        let mut config = rustls::ServerConfig::builder_with_provider(verify::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// How a client (agent, CLI, a standby forwarding to the leader) reaches a
/// controller: the cluster CA, and its own certificate if it has one.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: String,
    /// (certificate, key) in PEM.
    pub identity: Option<(String, String)>,
}

impl ClientTls {
    /// `endpoint` over TLS that accepts only a controller certificate of this cluster.
    pub fn apply(&self, endpoint: tonic::transport::Endpoint) -> Result<tonic::transport::Endpoint, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        let verifier = verify::ClusterVerifier::controller(&self.ca_pem)?;
        Ok(endpoint.tls_config_with_verifier(config, std::sync::Arc::new(verifier))?)
    }
}

impl ClientTls {
    /// Whether this is a node's identity that may serve other nodes
    /// ([`pki::serves_peers`]).
    pub fn serves_peers(&self) -> bool {
        self.identity.as_ref().is_some_and(|(cert, _)| pki::serves_peers(cert))
    }

    /// The peer service of this node: its own certificate; callers must
    /// present a certificate of this cluster (checked to be a node's by the
    /// service itself).
    pub fn peer_server(&self) -> Option<tonic::transport::ServerTlsConfig> {
        let (cert, key) = self.identity.as_ref()?;
        Some(
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key))
                .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
                .client_auth_optional(false)
                .timeout(std::time::Duration::from_secs(10)),
        )
    }

    /// `endpoint` to node `node`'s peer service: this node's certificate, and
    /// only `node`'s accepted ([`verify::ClusterVerifier::node`]).
    pub fn peer(
        &self,
        endpoint: tonic::transport::Endpoint,
        node: &str,
    ) -> Result<tonic::transport::Endpoint, TlsError> {
        let mut config = tonic::transport::ClientTlsConfig::new().domain_name(pki::NODE_SERVER_NAME);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        let verifier = verify::ClusterVerifier::node(&self.ca_pem, node)?;
        Ok(endpoint.tls_config_with_verifier(config, std::sync::Arc::new(verifier))?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod error_tests {
    use std::error::Error;

    use super::*;

    #[test]
    fn a_missing_file_says_its_path_and_cause_once_through_the_whole_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let err = read(&path).unwrap_err();
        // What anyhow's `{:#}` prints: each error of the chain, joined.
        let mut chain = vec![err.to_string()];
        let mut source = err.source();
        while let Some(cause) = source {
            chain.push(cause.to_string());
            source = cause.source();
        }
        let said = chain.join(": ");
        assert!(said.starts_with(&path.display().to_string()), "{said}");
        assert_eq!(said.matches("No such file or directory").count(), 1, "{said}");
    }
}
