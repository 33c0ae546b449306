//! The cluster CA and the certificates it issues, with rcgen. Subjects carry
//! the role: `O=cohort, OU=controller|node, CN=<name>`. Node certificates
//! dial controllers and other nodes (clientAuth) and serve other nodes their
//! staged content (serverAuth, under the one name [`NODE_SERVER_NAME`]; the
//! node is told apart by its CN); a node can never pose as a controller, as
//! every client of a controller checks the certificate's role
//! ([`super::verify::ClusterVerifier::controller`]). Controller certificates serve
//! (serverAuth) and dial other controllers (clientAuth).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::TlsError;

pub const ORGANIZATION: &str = "cohort";
const OU_CONTROLLER: &str = "controller";
const OU_NODE: &str = "node";
/// The DNS name every node certificate carries for its peer service: peers
/// dial it and check the certificate's CN against the node they meant
/// ([`super::verify::ClusterVerifier::node`]); node names need not be DNS names.
pub const NODE_SERVER_NAME: &str = "cohort-node";

/// What a certificate of this cluster says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    Controller,
    Node,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub kind: PeerKind,
    /// The controller's id or the node's name.
    pub name: String,
}

/// Whether a node certificate (PEM) may serve other nodes: issued with
/// serverAuth for [`NODE_SERVER_NAME`] (certificates from before peer-to-peer
/// staging were client-only: such a node fetches from peers but serves none
/// until it joins again).
pub fn serves_peers(cert_pem: &str) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()) else { return false };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&pem.contents) else { return false };
    let server_auth = cert.extended_key_usage().ok().flatten().is_some_and(|e| e.value.server_auth);
    let named = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == NODE_SERVER_NAME))
    });
    server_auth && named
}

/// Reads the role and name from a certificate (DER) that already verified
/// against the cluster CA.
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    let subject = cert.subject();
    let first = |attrs: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        attrs.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let org = first(&mut subject.iter_organization());
    let unit = first(&mut subject.iter_organizational_unit());
    let name = first(&mut subject.iter_common_name()).unwrap_or_default();
    let kind = match (org.as_deref(), unit.as_deref()) {
        (Some(ORGANIZATION), Some(OU_CONTROLLER)) => PeerKind::Controller,
        (Some(ORGANIZATION), Some(OU_NODE)) => PeerKind::Node,
        _ => {
            return Err(TlsError::Invalid(format!(
                "certificate {:?} is neither a Cohort controller's nor a node's (subject {subject})",
                name
            )));
        }
    };
    if name.is_empty() {
        return Err(TlsError::Invalid(format!("certificate without a common name (subject {subject})")));
    }
    Ok(PeerIdentity { kind, name })
}

/// When a PEM certificate stops being valid.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The identity in a PEM certificate (an agent checks that its saved
/// certificate is still for its node name).
pub fn identity_of_pem(cert_pem: &str) -> Result<PeerIdentity, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    identity_of(&pem.contents)
}

/// SHA-256 of a certificate's DER bytes, lowercase hex: what a node name is bound to.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// [`fingerprint`] of a PEM certificate.
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("unreadable certificate: {e}")))?;
    Ok(fingerprint(&pem.contents))
}

/// Node names end up in certificates, file names and log lines: keep them plain.
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!("node name {name:?} must be 1-253 characters of letters, digits, '-', '.', '_'"))
    }
}

fn subject(unit: &str, name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, name);
    dn
}

fn validity(params: &mut CertificateParams, ttl: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks a minute apart.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(ttl.as_secs().min(i64::MAX as u64) as i64);
}

fn cert_error(what: &str) -> impl FnOnce(rcgen::Error) -> TlsError + '_ {
    move |error| TlsError::Certificate { what: what.to_string(), error }
}

/// The cluster's certificate authority: its certificate and private key.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
}

impl ClusterCa {
    /// A new CA (ECDSA P-256), valid for `ttl`.
    pub fn generate(cluster: &str, ttl: Duration) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(cert_error("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject("ca", &format!("{cluster} cluster CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, ttl);
        let cert = params.self_signed(&key).map_err(cert_error("signing the CA certificate"))?;
        Ok(Self { cert_pem: cert.pem(), key })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error("reading the CA key"))?;
        // Checks that the certificate parses.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(cert_error("reading the CA certificate"))?;
        Ok(Self { cert_pem: cert_pem.to_string(), key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, TlsError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(cert_error("reading the CA certificate"))
    }

    /// A controller's certificate and key: server and client, valid for the
    /// given host names and addresses. Returns (certificate, key) in PEM.
    pub fn issue_controller(&self, id: &str, names: &[String], ttl: Duration) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(cert_error("generating a controller key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(OU_CONTROLLER, id);
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().map_err(|e| cert_error("controller host name")(e))?),
            };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, ttl);
        let cert = params.signed_by(&key, &self.issuer()?).map_err(cert_error("signing a controller certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a node's certificate signing request for `node`: whatever the
    /// request asks for, the certificate names `node` (CN) and serves only
    /// under [`NODE_SERVER_NAME`].
    pub fn sign_node_csr(&self, csr_pem: &str, node: &str, ttl: Duration) -> Result<String, TlsError> {
        check_node_name(node).map_err(TlsError::Invalid)?;
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert_error("the certificate signing request"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(OU_NODE, node);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names =
            vec![SanType::DnsName(NODE_SERVER_NAME.try_into().map_err(|e| cert_error("the node server name")(e))?)];
        validity(&mut params, ttl);
        csr.params = params;
        let cert = csr.signed_by(&self.issuer()?).map_err(cert_error("signing a node certificate"))?;
        Ok(cert.pem())
    }
}

/// A node's new key and a signing request for it (the key never leaves the node).
/// Returns (key, request) in PEM.
pub fn node_csr(node: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(cert_error("generating the node key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(OU_NODE, node);
    let csr = params.serialize_request(&key).map_err(cert_error("making the certificate signing request"))?;
    let pem = csr.pem().map_err(cert_error("encoding the certificate signing request"))?;
    Ok((key.serialize_pem(), pem))
}
