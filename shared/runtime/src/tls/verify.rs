//! The server-certificate check of every client of a controller (agents, the
//! CLI, standbys): the certificate must chain to the cluster CA, match the
//! host name dialled, AND be a controller's. A node's certificate, though
//! signed by the same CA, is refused: agents take commands only from a
//! controller.

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

#[derive(Debug)]
pub struct ControllerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ControllerVerifier {
    pub fn new(ca_pem: &str) -> Result<Self, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
        Ok(Self { inner })
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        match identity_of(end_entity) {
            Ok(id) if id.kind == PeerKind::Controller => Ok(verified),
            Ok(id) => Err(rustls::Error::General(format!(
                "{server_name:?} presented the certificate of node {:?}, not of a Cohort controller",
                id.name
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
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
