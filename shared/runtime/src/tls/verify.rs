//! The server-certificate check of every client of a controller (agents, the
//! CLI, standbys): the certificate must chain to the cluster CA, match the
//! host name dialled, AND be a controller's. A node's certificate, though
//! signed by the same CA, is refused: agents take commands only from a
//! controller. Agents fetching staged content from each other check the
//! other way round: the certificate must be a node's, and of the node they
//! meant to reach ([`ClusterVerifier::node`]).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::TlsError;
use super::pki::{PeerKind, identity_of};

/// The crypto provider of every Cohort TLS connection (ring, as tonic's `tls-ring`).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The cluster CA as a rustls root store.
pub fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid("the CA file holds no certificate".into()));
    }
    Ok(Arc::new(roots))
}

/// The check a client makes of a server's certificate: it chains to the
/// cluster CA, matches the name dialled, and belongs to what the client
/// meant to reach: a controller, or one node ([`super::pki::NODE_SERVER_NAME`]
/// is every node's name; its CN tells them apart).
#[derive(Debug)]
pub struct ClusterVerifier {
    inner: Arc<WebPkiServerVerifier>,
    want: Want,
}

#[derive(Debug)]
enum Want {
    Controller,
    Node(String),
}

impl ClusterVerifier {
    /// Agents, the CLI and standbys dialling a controller.
    pub fn controller(ca_pem: &str) -> Result<Self, TlsError> {
        Self::new(ca_pem, Want::Controller)
    }

    /// An agent dialling node `node`'s peer service.
    pub fn node(ca_pem: &str, node: &str) -> Result<Self, TlsError> {
        Self::new(ca_pem, Want::Node(node.to_owned()))
    }

    fn new(ca_pem: &str, want: Want) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        Ok(Self { inner, want })
    }
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let id = identity_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        match (&self.want, id.kind) {
            (Want::Controller, PeerKind::Controller) => Ok(verified),
            (Want::Controller, _) => Err(rustls::Error::General(format!(
                "{server_name:?} presented the certificate of node {:?}, not of a Cohort controller",
                id.name
            ))),
            (Want::Node(node), PeerKind::Node) if *node == id.name => Ok(verified),
            (Want::Node(node), kind) => Err(rustls::Error::General(format!(
                "the peer service dialled as node {node:?} presented the certificate of {kind:?} {:?}",
                id.name
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::pem::PemObject as _;

    use super::super::pki::{ClusterCa, NODE_SERVER_NAME, node_csr, serves_peers};
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_peer_is_accepted_only_with_the_certificate_of_the_node_that_was_dialled() {
        let ca = ClusterCa::generate("test", Duration::from_secs(3600)).unwrap();
        let node = |name: &str| {
            let (_, csr) = node_csr(name).unwrap();
            ca.sign_node_csr(&csr, name, Duration::from_secs(3600)).unwrap()
        };
        let (a, b) = (node("gpu-a"), node("gpu-b"));
        assert!(serves_peers(&a), "node certificates serve their peers");
        let (controller, _) = ca.issue_controller("ctl", &["127.0.0.1".into()], Duration::from_secs(3600)).unwrap();
        let name = ServerName::try_from(NODE_SERVER_NAME).unwrap();
        let now = UnixTime::now();
        let dialling_a = ClusterVerifier::node(ca.cert_pem(), "gpu-a").unwrap();
        assert!(dialling_a.verify_server_cert(&der(&a), &[], &name, &[], now).is_ok());
        let other = dialling_a.verify_server_cert(&der(&b), &[], &name, &[], now).unwrap_err();
        assert!(other.to_string().contains("\"gpu-b\""), "{other}");
        let ctl = dialling_a.verify_server_cert(&der(&controller), &[], &name, &[], now).unwrap_err();
        assert!(!ctl.to_string().is_empty());
        // And a node can still not pose as a controller.
        let to_controller = ClusterVerifier::controller(ca.cert_pem()).unwrap();
        let posing = to_controller.verify_server_cert(&der(&a), &[], &name, &[], now).unwrap_err();
        assert!(posing.to_string().contains("not of a Cohort controller"), "{posing}");
        // A certificate of another CA, even for the right name, is refused.
        let stranger = ClusterCa::generate("other", Duration::from_secs(3600)).unwrap();
        let (_, csr) = node_csr("gpu-a").unwrap();
        let forged = stranger.sign_node_csr(&csr, "gpu-a", Duration::from_secs(3600)).unwrap();
        assert!(dialling_a.verify_server_cert(&der(&forged), &[], &name, &[], now).is_err());
    }
}
