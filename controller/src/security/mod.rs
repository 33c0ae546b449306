//! Mutual TLS and tokens on the controller: its TLS material (`--tls-dir`,
//! made by `cohort-controller init`), the auth layer, the SecurityService
//! (nodes join, admins make tokens) and HTTPS for the web page.

pub mod auth;
pub mod client;
pub mod http;
pub mod init;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::security_service_server::SecurityService;
use cohort_proto::{CreateTokenRequest, CreateTokenResponse, JoinRequest, JoinResponse};
use cohort_shared::tls::token::unix_now;
use cohort_shared::tls::{self, Claims, ClientTls, ClusterCa, Role, ServerTls, TlsError, TokenKey, files};
use tonic::{Request, Response, Status};

pub use auth::{AuthLayer, Caller};

/// Default validity of a join token.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// Default validity of an API token.
pub const API_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Everything a controller needs to serve TLS and check callers.
pub struct TlsState {
    pub server: ServerTls,
    pub ca: ClusterCa,
    pub token_key: Arc<TokenKey>,
    /// How this controller dials another (a standby forwarding to the leader).
    pub client: ClientTls,
    /// Validity of the node certificates it issues.
    pub node_cert_ttl: Duration,
}

impl TlsState {
    /// Reads the TLS directory, naming what is missing and how to make it.
    pub fn load(dir: &Path, node_cert_ttl: Duration) -> Result<Self, TlsError> {
        if !dir.join(files::CA_CERT).exists() {
            return Err(TlsError::Invalid(format!(
                "no cluster CA in {}: run `cohort-controller init --tls-dir {}` first (or pass --insecure to serve plaintext on a trusted network)",
                dir.display(),
                dir.display()
            )));
        }
        let server = ServerTls::load(dir)?;
        let ca = ClusterCa::from_pem(&server.ca_pem, &tls::read(&dir.join(files::CA_KEY))?)?;
        let token_key = TokenKey::from_text(&tls::read(&dir.join(files::TOKEN_KEY))?)?;
        let client = ClientTls {
            ca_pem: server.ca_pem.clone(),
            identity: Some((server.cert_pem.clone(), server.key_pem.clone())),
        };
        Ok(Self { server, ca, token_key: Arc::new(token_key), client, node_cert_ttl })
    }
}

/// `--insecure` (None) or TLS.
pub type Security = Option<Arc<TlsState>>;

/// Nodes join; admins make tokens.
pub struct SecurityApi {
    pub state: Security,
}

fn unix_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl SecurityService for SecurityApi {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let Some(state) = &self.state else {
            return Err(Status::failed_precondition(
                "this controller runs --insecure: it has no CA and issues no certificates; run the agent with --insecure too",
            ));
        };
        let req = request.into_inner();
        let claims = state.token_key.verify(&req.token, unix_now()).map_err(|e| {
            tracing::warn!(node = %req.node_name, error = %e, "join refused");
            Status::unauthenticated(format!("join as {:?}: {e}", req.node_name))
        })?;
        if claims.role != Role::Join {
            return Err(Status::permission_denied(format!(
                "join as {:?}: a {} token cannot join a node; make a join token with `cohort token create --role join`",
                req.node_name,
                claims.role.name()
            )));
        }
        if let Some(bound) = claims.node.as_deref().filter(|b| *b != req.node_name) {
            return Err(Status::permission_denied(format!(
                "join as {:?}: this join token is for node {bound:?} only",
                req.node_name
            )));
        }
        tls::pki::check_node_name(&req.node_name).map_err(Status::invalid_argument)?;
        let cert_pem = state
            .ca
            .sign_node_csr(&req.csr_pem, &req.node_name, state.node_cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("JoinRequest.csr_pem: {e}")))?;
        let expires = unix_now().saturating_add(state.node_cert_ttl.as_secs());
        tracing::info!(node = %req.node_name, token = %claims.id, "node joined: certificate issued");
        Ok(Response::new(JoinResponse {
            cert_pem,
            ca_pem: state.server.ca_pem.clone(),
            expires_unix_ms: unix_ms(expires),
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let Some(state) = &self.state else {
            return Err(Status::failed_precondition("this controller runs --insecure: it has no token key"));
        };
        let caller = auth::caller(&request);
        let req = request.into_inner();
        let role: Role = req.role.parse().map_err(|e: String| Status::invalid_argument(format!("role: {e}")))?;
        let user = if req.user.is_empty() { caller.submitter() } else { req.user.clone() };
        let claims = mint_claims(role, &user, req.ttl_seconds, &req.node).map_err(Status::invalid_argument)?;
        let token = state.token_key.mint(&claims);
        tracing::info!(by = %caller, role = role.name(), user = %claims.user, id = %claims.id, "token created");
        Ok(Response::new(CreateTokenResponse {
            token,
            role: role.name().into(),
            user: claims.user,
            expires_unix_ms: unix_ms(claims.exp),
            id: claims.id,
        }))
    }
}

/// The claims of a new token; `ttl_seconds` 0 for the role's default.
pub fn mint_claims(role: Role, user: &str, ttl_seconds: u64, node: &str) -> Result<Claims, String> {
    if !node.is_empty() && role != Role::Join {
        return Err("node: only a join token is bound to a node".into());
    }
    if !node.is_empty() {
        tls::pki::check_node_name(node)?;
    }
    if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
        return Err(format!("user {user:?}: give a name of 1-128 printable characters"));
    }
    let ttl = match ttl_seconds {
        0 if role == Role::Join => JOIN_TOKEN_TTL,
        0 => API_TOKEN_TTL,
        s => Duration::from_secs(s),
    };
    let mut claims = Claims::new(role, user, ttl);
    claims.node = (!node.is_empty()).then(|| node.to_string());
    Ok(claims)
}
