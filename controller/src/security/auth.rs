//! Who may call what. A tower layer in front of every gRPC service works out
//! the caller (a node or controller certificate, a bearer token, or nobody),
//! checks it against what the method needs, and hands the `Caller` to the
//! handlers as a request extension (they bind a node certificate to the node
//! name it speaks for, and a `submit` token to its own jobs).

use std::sync::Arc;
use std::task::{Context, Poll};

use cohort_runtime::tls::pki::identity_of;
use cohort_runtime::tls::token::{bearer_of, unix_now};
use cohort_runtime::tls::{PeerKind, Role, TokenKey};
use futures::future::BoxFuture;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Who made a call, as the auth layer established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure`: nothing is checked.
    Unchecked,
    /// An agent, by its certificate.
    Node(String),
    /// Another controller, by its certificate (no token).
    Controller(String),
    /// A person or script, by a bearer token.
    User { name: String, role: Role },
    /// TLS without a certificate or token: may only join.
    Anonymous,
}

impl Caller {
    /// A node certificate may speak for its own node only.
    pub fn check_node(&self, node: &str) -> Result<(), Status> {
        match self {
            Caller::Unchecked => Ok(()),
            Caller::Node(name) if name == node => Ok(()),
            Caller::Node(name) => Err(Status::permission_denied(format!(
                "this connection holds the certificate of node {name:?}; it cannot speak for node {node:?}"
            ))),
            other => Err(Status::unauthenticated(format!("{other}: agents must present their node certificate"))),
        }
    }

    /// The node an agent's certificate names (None: not an agent, or `--insecure`).
    pub fn node(&self) -> Option<&str> {
        match self {
            Caller::Node(name) => Some(name),
            _ => None,
        }
    }

    /// The user whose own jobs are the only ones this caller may change
    /// (None: any job).
    pub fn own_jobs_only(&self) -> Option<&str> {
        match self {
            Caller::User { name, role: Role::Submit } => Some(name),
            _ => None,
        }
    }

    /// Whether the controller's --max-submit-priority applies (submit tokens; admins set any priority).
    pub fn priority_capped(&self) -> bool {
        matches!(self, Caller::User { role: Role::Submit | Role::View | Role::Join, .. })
    }

    /// The identity whose `--allow-run-as` rules bound a job's `user:` (None:
    /// an admin token or `--insecure`, which may name any user the nodes allow).
    pub fn run_as_bound(&self) -> Option<&str> {
        match self {
            Caller::User { role: Role::Admin, .. } | Caller::Unchecked => None,
            Caller::User { name, .. } => Some(name),
            Caller::Node(name) | Caller::Controller(name) => Some(name),
            Caller::Anonymous => Some(""),
        }
    }

    /// The name recorded as a job's submitter.
    pub fn submitter(&self) -> String {
        match self {
            Caller::User { name, .. } => name.clone(),
            Caller::Unchecked => String::new(),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Unchecked => write!(f, "anyone (--insecure)"),
            Caller::Node(n) => write!(f, "node {n}"),
            Caller::Controller(c) => write!(f, "controller {c}"),
            Caller::User { name, role } => write!(f, "{name} ({} token)", role.name()),
            Caller::Anonymous => write!(f, "a caller without certificate or token"),
        }
    }
}

/// The SHA-256 of the client certificate a node called with (a request
/// extension next to its `Caller::Node`): the name is bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFingerprint(pub String);

fn peer_fingerprint<B>(request: &http::Request<B>) -> Option<PeerFingerprint> {
    let certs = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.peer_certs())?;
    certs.first().map(|cert| PeerFingerprint(cohort_runtime::tls::pki::fingerprint(cert)))
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// A node certificate (AgentService).
    Node,
    /// Any token, certificate... or nothing (Join checks its own token).
    Nothing,
    /// Anyone authenticated.
    Authenticated,
    /// A token of role view, submit or admin.
    Read,
    /// submit or admin.
    Submit,
    /// admin.
    Admin,
}

fn need(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("cohort.v1.AgentService", _) => Need::Node,
        ("cohort.v1.SecurityService", "Join") => Need::Nothing,
        ("cohort.v1.SecurityService", "CreateToken" | "RevokeToken") => Need::Admin,
        ("cohort.v1.JobService", "GetLeader") => Need::Authenticated,
        ("cohort.v1.JobService", "SubmitJob" | "UploadSync" | "CancelJob" | "ResumeJob" | "DeleteJob") => Need::Submit,
        (
            "cohort.v1.JobService",
            "CordonNode"
            | "DrainNode"
            | "UncordonNode"
            | "ClearGpu"
            | "RemoveConversionCache"
            | "SetQueue"
            | "DeleteQueue"
            | "EvictNodeCache",
        ) => Need::Admin,
        ("cohort.v1.JobService", _) => Need::Read,
        // Server reflection (grpcurl list/describe) reads the API's schema.
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => Need::Read,
        _ => return None,
    })
}

fn allowed(need: Need, caller: &Caller) -> bool {
    let role = match caller {
        Caller::User { role, .. } => Some(*role),
        _ => None,
    };
    match need {
        Need::Nothing => true,
        Need::Node => matches!(caller, Caller::Node(_)),
        Need::Authenticated => !matches!(caller, Caller::Anonymous) && role != Some(Role::Join),
        Need::Read => matches!(role, Some(Role::View | Role::Submit | Role::Admin)),
        Need::Submit => matches!(role, Some(Role::Submit | Role::Admin)),
        Need::Admin => role == Some(Role::Admin),
    }
}

/// The caller of one request, or why it is refused.
fn identify<B>(request: &http::Request<B>, key: &TokenKey) -> Result<Caller, Status> {
    if let Some(header) = request.headers().get("authorization") {
        let token = header
            .to_str()
            .ok()
            .and_then(bearer_of)
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
        let claims = key.verify(token, unix_now()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        return Ok(Caller::User { name: claims.user, role: claims.role });
    }
    let certs = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.peer_certs());
    match certs.as_ref().and_then(|c| c.first()) {
        // The TLS layer already checked that it chains to the cluster CA.
        Some(cert) => {
            let id = identity_of(cert).map_err(|e| Status::unauthenticated(e.to_string()))?;
            Ok(match id.kind {
                PeerKind::Node => Caller::Node(id.name),
                PeerKind::Controller => Caller::Controller(id.name),
            })
        }
        None => Ok(Caller::Anonymous),
    }
}

fn refusal(need: Need, caller: &Caller, path: &str) -> Status {
    let method = path.rsplit('/').next().unwrap_or(path);
    let wants = match need {
        Need::Node => "a node certificate (agents join with `cohort-agent --join-token`)",
        Need::Nothing => "nothing",
        Need::Authenticated => "a token or a certificate of this cluster",
        Need::Read => "a token (role view, submit or admin)",
        Need::Submit => "a token of role submit or admin",
        Need::Admin => "an admin token",
    };
    let message = match caller {
        Caller::Anonymous => format!(
            "{method} needs {wants}, and the call carried neither a token nor a client certificate: pass --token \
             (or COHORT_TOKEN / --token-file) with a token an admin made with `cohort token create --role submit`"
        ),
        _ => format!("{method} needs {wants}; the caller is {caller}"),
    };
    match caller {
        Caller::Anonymous => Status::unauthenticated(message),
        _ => Status::permission_denied(message),
    }
}

/// The layer; `None` (`--insecure`) lets everything through as `Caller::Unchecked`.
#[derive(Clone)]
pub struct AuthLayer {
    pub key: Option<Arc<TokenKey>>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, key: self.key.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    key: Option<Arc<TokenKey>>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = match &self.key {
            None => Ok(Caller::Unchecked),
            Some(key) => {
                let path = request.uri().path().to_string();
                match (need(&path), identify(&request, key)) {
                    (None, _) => Err(Status::permission_denied(format!("{path}: not a Cohort API method"))),
                    (Some(_), Err(status)) => Err(status),
                    (Some(need), Ok(caller)) if allowed(need, &caller) => Ok(caller),
                    (Some(need), Ok(caller)) => Err(refusal(need, &caller, &path)),
                }
            }
        };
        match caller {
            Ok(caller) => {
                if let Caller::Node(_) = caller
                    && let Some(fingerprint) = peer_fingerprint(&request)
                {
                    request.extensions_mut().insert(fingerprint);
                }
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                tracing::warn!(path = %request.uri().path(), code = ?status.code(), reason = %status.message(), "call refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The caller of a request that went through the layer.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or(Caller::Anonymous)
}

/// A call to pass on to the leader: the message and the caller's token (the
/// leader checks it again).
pub fn forward<T>(request: tonic::Request<T>) -> tonic::Request<T> {
    let token = request.metadata().get("authorization").cloned();
    let mut forwarded = tonic::Request::new(request.into_inner());
    if let Some(token) = token {
        forwarded.metadata_mut().insert("authorization", token);
    }
    forwarded
}

/// A `submit` token changes only jobs submitted with its user name.
pub fn check_owner(caller: &Caller, job: &cohort_proto::Job, verb: &str) -> Result<(), Status> {
    let Some(user) = caller.own_jobs_only() else { return Ok(()) };
    let owner = job.file.as_ref().map(|f| f.submitted_by.as_str()).unwrap_or_default();
    if owner == user {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{user} may {verb} only their own jobs; job {} was submitted by {}",
            job.id,
            if owner.is_empty() { "nobody known" } else { owner }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role) -> Caller {
        Caller::User { name: "u".into(), role }
    }

    #[test]
    fn roles_reach_what_they_should_and_no_further() {
        let submit = need("/cohort.v1.JobService/SubmitJob").unwrap_or(Need::Admin);
        let cancel = need("/cohort.v1.JobService/CancelJob").unwrap_or(Need::Admin);
        let list = need("/cohort.v1.JobService/ListJobs").unwrap_or(Need::Admin);
        let cordon = need("/cohort.v1.JobService/CordonNode").unwrap_or(Need::Nothing);
        let register = need("/cohort.v1.AgentService/Register").unwrap_or(Need::Nothing);
        for need in [submit, cancel] {
            assert!(!allowed(need, &user(Role::View)));
            assert!(allowed(need, &user(Role::Submit)));
            assert!(!allowed(need, &user(Role::Join)));
        }
        assert!(allowed(list, &user(Role::View)));
        assert!(!allowed(list, &Caller::Node("n".into())));
        assert!(!allowed(list, &Caller::Anonymous));
        assert!(!allowed(cordon, &user(Role::Submit)));
        assert!(allowed(cordon, &user(Role::Admin)));
        assert!(!allowed(register, &user(Role::Admin)));
        assert!(allowed(register, &Caller::Node("n".into())));
        assert_eq!(need("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Some(Need::Read));
        assert_eq!(need("/cohort.v1.JobService/RemoveConversionCache"), Some(Need::Admin));
        assert_eq!(need("/cohort.v1.JobService/SetQueue"), Some(Need::Admin));
        assert_eq!(need("/cohort.v1.JobService/DeleteQueue"), Some(Need::Admin));
        assert_eq!(need("/cohort.v1.JobService/ListQueues"), Some(Need::Read));
        assert_eq!(need("/cohort.v1.JobService/EvictNodeCache"), Some(Need::Admin));
        assert_eq!(need("/cohort.v1.JobService/ListNodeCaches"), Some(Need::Read));
        assert!(need("/grpc.health.v1.Health/Check").is_none());
    }

    #[test]
    fn a_node_certificate_speaks_for_its_node_only() {
        let node = Caller::Node("gpu-01".into());
        assert!(node.check_node("gpu-01").is_ok());
        assert_eq!(node.check_node("gpu-02").map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        assert_eq!(Caller::Anonymous.check_node("gpu-01").map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
    }
}
