//! Mutual TLS and tokens on the controller: its TLS material (`--tls-dir`,
//! made by `cohort-controller init`), the auth layer, the SecurityService
//! (nodes join, admins make tokens) and HTTPS for the web page.

pub mod auth;
pub mod http;
pub mod init;
pub mod run_as;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cohort_proto::security_service_server::SecurityService;
use cohort_proto::{
    CreateTokenRequest, CreateTokenResponse, JoinRequest, JoinResponse, RevokeTokenRequest, RevokeTokenResponse,
};
use cohort_runtime::tls::token::unix_now;
use cohort_runtime::tls::{self, Claims, ClientTls, ClusterCa, Role, ServerTls, TlsError, TokenKey, files};
use tonic::{Request, Response, Status};

pub use auth::{AuthLayer, Caller};

use crate::store::{Expect, Store, StoreError};

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

/// Nodes join; admins make and revoke tokens.
pub struct SecurityApi {
    pub state: Security,
    /// Where used and revoked join tokens and node-name bindings are kept
    /// (shared by every controller on etcd).
    pub store: Arc<dyn Store>,
}

/// Store key of a join token's use or revocation (a reason text).
fn join_token_key(id: &str) -> String {
    format!("join-tokens/{id}")
}

/// Store key of the certificate fingerprint a node name is bound to.
pub fn node_cert_key(node: &str) -> String {
    format!("node-certs/{node}")
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(format!("the controller's store: {e}"))
}

impl SecurityApi {
    /// What is on record against a join token ("used by node ...", "revoked by ..."), if anything.
    async fn token_record(&self, id: &str) -> Result<Option<String>, Status> {
        let found = self.store.get(&join_token_key(id)).await.map_err(store_status)?;
        Ok(found.map(|v| String::from_utf8_lossy(&v.value).into_owned()))
    }

    /// Marks a single-use token used by `node`; refuses one used or revoked before.
    async fn spend(&self, claims: &Claims, node: &str) -> Result<(), Status> {
        let refused = |record: String| {
            Status::permission_denied(format!(
                "join as {node:?}: join token {} was {record}; join tokens are single-use: make a new one \
                 (`cohort token create --role join`)",
                claims.id
            ))
        };
        if claims.reusable {
            return match self.token_record(&claims.id).await? {
                Some(record) => Err(refused(record)),
                None => Ok(()),
            };
        }
        let record = format!("used by node {node} at unix time {}", unix_now());
        match self.store.put(&join_token_key(&claims.id), record.into_bytes(), Expect::Absent).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => {
                Err(refused(self.token_record(&claims.id).await?.unwrap_or_else(|| "already used".into())))
            }
            Err(e) => Err(store_status(e)),
        }
    }
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
        // A name that joined is its first certificate's: only a token made for
        // that name (an admin re-issuing a reinstalled node) issues another.
        let rebind = claims.node.as_deref() == Some(req.node_name.as_str());
        let binding = node_cert_key(&req.node_name);
        let taken = || {
            Status::permission_denied(format!(
                "join as {name:?}: node {name} has already joined and its name is bound to its certificate; a \
                 second node cannot take it. To re-issue {name}'s certificate (a reinstalled node), join with a \
                 token bound to it: `cohort token create --role join --node {name}`",
                name = req.node_name
            ))
        };
        if !rebind && self.store.get(&binding).await.map_err(store_status)?.is_some() {
            tracing::warn!(node = %req.node_name, token = %claims.id, "join refused: the node name is taken");
            return Err(taken());
        }
        let cert_pem = state
            .ca
            .sign_node_csr(&req.csr_pem, &req.node_name, state.node_cert_ttl)
            .map_err(|e| Status::invalid_argument(format!("JoinRequest.csr_pem: {e}")))?;
        let fingerprint = tls::pki::fingerprint_pem(&cert_pem).map_err(|e| Status::internal(e.to_string()))?;
        self.spend(&claims, &req.node_name).await.inspect_err(|status| {
            tracing::warn!(node = %req.node_name, token = %claims.id, reason = %status.message(), "join refused");
        })?;
        let expect = if rebind { Expect::Any } else { Expect::Absent };
        match self.store.put(&binding, fingerprint.into_bytes(), expect).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => return Err(taken()),
            Err(e) => return Err(store_status(e)),
        }
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
        let mut claims = mint_claims(role, &user, req.ttl_seconds, &req.node).map_err(Status::invalid_argument)?;
        if req.reusable {
            if role != Role::Join {
                return Err(Status::invalid_argument("reusable: only a join token is single-use or reusable"));
            }
            claims.reusable = true;
        }
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

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        if self.state.is_none() {
            return Err(Status::failed_precondition("this controller runs --insecure: it has no tokens"));
        }
        let caller = auth::caller(&request);
        let id = request.into_inner().id;
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Status::invalid_argument(format!(
                "id {id:?}: give the token id `cohort token create` printed"
            )));
        }
        let previous = self.token_record(&id).await?.unwrap_or_default();
        let record = format!("revoked by {caller} at unix time {}", unix_now());
        self.store.put(&join_token_key(&id), record.into_bytes(), Expect::Any).await.map_err(store_status)?;
        tracing::info!(by = %caller, token = %id, "join token revoked");
        Ok(Response::new(RevokeTokenResponse { id, previous }))
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
