//! Bearer tokens: `cohort1.<claims>.<mac>`, the claims JSON and an HMAC-SHA256
//! over them, both base64url. Any controller holding the cluster's token key
//! (`token.key`, made by `cohort-controller init`) checks them without a
//! lookup, so tokens work the same on every controller of an HA cluster.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::TlsError;

const PREFIX: &str = "cohort1";

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: every job, nodes, tokens.
    Admin,
    /// Submit jobs; cancel and resume one's own; read everything.
    Submit,
    /// Read only.
    View,
    /// Only: get a node certificate (`cohort-agent --join-token`).
    Join,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::View => "view",
            Role::Join => "join",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "submit" => Ok(Role::Submit),
            "view" => Ok(Role::View),
            "join" => Ok(Role::Join),
            other => Err(format!("role {other:?}: expected admin, submit, view or join")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub role: Role,
    /// Who holds it: a user name (jobs submitted with it are theirs), or for a
    /// join token who made it.
    pub user: String,
    /// A join token bound to one node name can only get that node's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A join token that may join several nodes (until it expires or is
    /// revoked); without it a join token is single-use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reusable: bool,
    /// Unix seconds.
    pub iat: u64,
    pub exp: u64,
    /// Random, to tell tokens apart in logs.
    pub id: String,
}

impl Claims {
    pub fn new(role: Role, user: &str, ttl: Duration) -> Self {
        let iat = unix_now();
        let id: u64 = rand::random();
        Claims {
            role,
            user: user.to_string(),
            node: None,
            reusable: false,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            id: format!("{id:016x}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a Cohort token (expected cohort1.<claims>.<signature>)")]
    Malformed,
    #[error("the token's signature does not match this cluster's token key (made for another cluster, or altered)")]
    BadSignature,
    #[error("the {role} token {id} expired {ago}s ago; ask an admin for a new one (`cohort token create`)")]
    Expired { role: &'static str, id: String, ago: u64 },
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The cluster's secret for signing tokens.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl TokenKey {
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_text(text: &str) -> Result<Self, TlsError> {
        let bytes = B64.decode(text.trim()).map_err(|e| TlsError::Invalid(format!("token key: not base64url: {e}")))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| TlsError::Invalid("token key: expected 32 bytes".into()))?;
        Ok(Self(key))
    }

    pub fn to_text(&self) -> String {
        format!("{}\n", B64.encode(self.0))
    }

    fn mac(&self, payload: &str) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(payload.as_bytes());
        mac
    }

    pub fn mint(&self, claims: &Claims) -> String {
        // Serialising this plain struct cannot fail.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = format!("{PREFIX}.{}", B64.encode(json));
        let tag = self.mac(&payload).finalize().into_bytes();
        format!("{payload}.{}", B64.encode(tag))
    }

    /// The claims of a token this key signed and that has not expired at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let token = token.trim();
        let (payload, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let claims_b64 = payload.strip_prefix(PREFIX).and_then(|p| p.strip_prefix('.')).ok_or(TokenError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        self.mac(payload).verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let json = B64.decode(claims_b64).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired { role: claims.role.name(), id: claims.id, ago: now - claims.exp });
        }
        Ok(claims)
    }
}

/// A tonic interceptor that sends `authorization: Bearer <token>` with every call.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, TlsError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| TlsError::Invalid("the token holds characters a header cannot carry".into())),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer_of(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_with_its_key_only_and_until_it_expires() {
        let key = TokenKey::generate();
        let claims = Claims::new(Role::Submit, "alice", Duration::from_secs(60));
        let token = key.mint(&claims);
        assert_eq!(key.verify(&token, claims.iat), Ok(claims.clone()));
        assert!(matches!(key.verify(&token, claims.exp), Err(TokenError::Expired { .. })));
        assert_eq!(TokenKey::generate().verify(&token, claims.iat), Err(TokenError::BadSignature));
        // Raising one's own role breaks the signature.
        let forged = token.replace(&B64.encode(serde_json::to_vec(&claims).unwrap_or_default()), &{
            let mut admin = claims.clone();
            admin.role = Role::Admin;
            B64.encode(serde_json::to_vec(&admin).unwrap_or_default())
        });
        assert_ne!(forged, token);
        assert_eq!(key.verify(&forged, claims.iat), Err(TokenError::BadSignature));
        assert_eq!(key.verify("Bearer nonsense", claims.iat), Err(TokenError::Malformed));
        let reloaded = TokenKey::from_text(&key.to_text()).map(|k| k.verify(&token, claims.iat));
        assert!(matches!(reloaded, Ok(Ok(_))));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_of("Bearer abc"), Some("abc"));
        assert_eq!(bearer_of("bearer  abc "), Some("abc"));
        assert_eq!(bearer_of("Basic abc"), None);
    }
}
