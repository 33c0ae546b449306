//! How the `cohort` CLI reaches a controller: TLS against the cluster CA (the
//! server must hold a controller certificate) with a bearer token, or
//! plaintext only when asked for with `--insecure`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use cohort_proto::job_service_client::JobServiceClient;
use cohort_runtime::tls::{Bearer, ClientTls};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The channel of every CLI client: each call carries the token.
pub type ApiChannel = InterceptedService<Channel, Bearer>;

/// The CLI's connection flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientArgs {
    /// The cluster CA certificate (ca.crt from `cohort-controller init`).
    #[arg(long, global = true, env = "COHORT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// A bearer token (`cohort token create`, or the admin.token that init wrote).
    #[arg(long, global = true, env = "COHORT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the token.
    #[arg(long, global = true, env = "COHORT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Talk plaintext HTTP/2 to a controller started with --insecure (trusted networks only).
    #[arg(long, global = true, env = "COHORT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

/// `host:port` becomes `https://host:port` (`http://` with --insecure); a
/// plaintext URL without --insecure is refused.
pub fn normalize_url(url: &str, insecure: bool) -> anyhow::Result<String> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("http://") {
        if !insecure {
            anyhow::bail!(
                "{url}: plaintext http:// needs --insecure (and a controller started with --insecure); use https://{rest} with --ca-cert"
            );
        }
        return Ok(url.to_string());
    }
    if url.starts_with("https://") {
        return Ok(url.to_string());
    }
    Ok(format!("{}://{url}", if insecure { "http" } else { "https" }))
}

impl ClientArgs {
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.token_file else { return Ok(None) };
        let token = std::fs::read_to_string(path)
            .with_context(|| {
                format!(
                    "--token-file {}: cannot read it (a file holding a token of `cohort token create`, \
                     or the admin.token of `cohort-controller init`)",
                    path.display()
                )
            })?
            .trim()
            .to_string();
        if token.is_empty() {
            anyhow::bail!(
                "--token-file {}: the file is empty; write a token of `cohort token create` into it",
                path.display()
            );
        }
        Ok(Some(token))
    }

    /// The token of every call, read before any connection so that a bad one fails first.
    pub fn bearer(&self) -> anyhow::Result<Bearer> {
        let token = self.token()?;
        let from = match &self.token_file {
            Some(path) if self.token.is_none() => format!("--token-file {}", path.display()),
            _ => "--token (or COHORT_TOKEN)".to_string(),
        };
        Bearer::new(token.as_deref())
            .with_context(|| format!("{from}: not a token of `cohort token create` (paste it whole, on one line)"))
    }

    /// An endpoint for `url`, with TLS unless it is http://.
    pub fn endpoint(&self, given: &str) -> anyhow::Result<Endpoint> {
        let url = normalize_url(given, self.insecure)?;
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| {
                format!(
                    "--controller {given:?}: not an address; give host:port or https://host:port \
                     (comma-separated for several controllers)"
                )
            })?
            .connect_timeout(Duration::from_secs(5));
        if url.starts_with("http://") {
            return Ok(endpoint);
        }
        let ca = self.ca_cert.as_ref().with_context(|| {
            format!("{url}: TLS needs the cluster CA: pass --ca-cert (or COHORT_CA_CERT) with the ca.crt of `cohort-controller init`")
        })?;
        let ca_pem = std::fs::read_to_string(ca).with_context(|| {
            format!("--ca-cert {}: cannot read it (the ca.crt of `cohort-controller init`)", ca.display())
        })?;
        ClientTls { ca_pem, identity: None }.apply(endpoint).with_context(|| {
            format!("--ca-cert {}: not the cluster CA (the PEM ca.crt of `cohort-controller init`)", ca.display())
        })
    }

    /// Connects to the first reachable controller of a comma-separated list;
    /// a standby forwards every call to the leader.
    pub async fn connect(&self, urls: &str) -> anyhow::Result<JobServiceClient<ApiChannel>> {
        let bearer = self.bearer()?;
        Ok(JobServiceClient::with_interceptor(self.channel(urls).await?, bearer))
    }

    pub async fn channel(&self, urls: &str) -> anyhow::Result<Channel> {
        let mut errors = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            match self.endpoint(url)?.connect().await {
                Ok(channel) => return Ok(channel),
                Err(e) => errors.push(format!("{url}: {}", error_chain(&e))),
            }
        }
        anyhow::bail!(
            "cannot reach a controller ({}): is cohort-controller running? (set --controller or COHORT_CONTROLLER)",
            errors.join("; ")
        )
    }
}

pub use cohort_runtime::error_chain;
