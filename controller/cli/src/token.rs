//! `cohort token create`: a join token for a new node, or an API token with a
//! role for a person or a script; `cohort token revoke`: a join token. Needs
//! an admin token.

use std::process::ExitCode;
use std::time::Duration;

use cohort_proto::security_service_client::SecurityServiceClient;
use cohort_proto::{CreateTokenRequest, RevokeTokenRequest};
use cohort_runtime::tls::Role;

use crate::connection::ClientArgs;

#[derive(clap::Subcommand, Debug)]
pub enum TokenVerb {
    /// Print a new token. A node joins with `cohort-agent --join-token TOKEN --ca-cert ca.crt`.
    Create {
        /// join (a node gets its certificate), view (read only), submit (own jobs), admin (everything).
        #[arg(long, default_value = "join")]
        role: Role,
        /// Whose token it is: the jobs submitted with it are theirs (default: you).
        #[arg(long)]
        user: Option<String>,
        /// How long it is valid (default: join 15m, others 30 days).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// A join token valid for this node name only (also: re-issues the
        /// certificate of a node that joined before, e.g. reinstalled).
        #[arg(long)]
        node: Option<String>,
        /// A join token that may join several nodes until it expires or is
        /// revoked (default: single-use).
        #[arg(long)]
        reusable: bool,
    },
    /// Revoke a join token by its id (printed by `create`): no node joins with it any more.
    Revoke {
        /// The token's id.
        id: String,
    },
}

pub async fn run(connection: &ClientArgs, urls: &str, verb: &TokenVerb) -> anyhow::Result<ExitCode> {
    let bearer = connection.bearer()?;
    let mut client = SecurityServiceClient::with_interceptor(connection.channel(urls).await?, bearer);
    let (role, user, ttl, node, reusable) = match verb {
        TokenVerb::Create { role, user, ttl, node, reusable } => (role, user, ttl, node, *reusable),
        TokenVerb::Revoke { id } => {
            let revoked = client
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let before = if revoked.previous.is_empty() { "unused".to_string() } else { revoked.previous };
            say!("join token {} revoked (it was {before})", revoked.id);
            return Ok(ExitCode::SUCCESS);
        }
    };
    let request = CreateTokenRequest {
        role: role.name().into(),
        user: user.clone().unwrap_or_default(),
        ttl_seconds: ttl.map(|t| t.as_secs().max(1)).unwrap_or(0),
        node: node.clone().unwrap_or_default(),
        reusable,
    };
    let created = client.create_token(request).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let expires = std::time::UNIX_EPOCH + Duration::from_millis(created.expires_unix_ms.max(0) as u64);
    eprintln!(
        "{} token {} for {}, valid until {}",
        created.role,
        created.id,
        created.user,
        humantime::format_rfc3339_seconds(expires)
    );
    say!("{}", created.token);
    Ok(ExitCode::SUCCESS)
}
