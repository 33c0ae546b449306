//! `cohort-controller init` (the cluster CA, this controller's certificate,
//! the token key and a first admin token) and `cohort-controller token`
//! (a token minted offline from the token key, for bootstrapping and scripts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use cohort_runtime::tls::{self, ClusterCa, Role, TokenKey, files};

/// The CA outlives every certificate it signs.
const CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CONTROLLER_CERT_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(clap::Subcommand, Debug)]
pub enum Setup {
    /// Create the cluster CA (or reuse the one already in --tls-dir, copied from
    /// another controller), this controller's certificate, the token key and an
    /// admin token.
    Init(InitArgs),
    /// Mint a token offline from --tls-dir's token key (e.g. the first join
    /// tokens, before any CLI can reach the controller).
    Token(TokenArgs),
}

#[derive(clap::Args, Debug)]
pub struct TlsDirArgs {
    /// The controller's data directory; the TLS directory defaults to <data-dir>/tls.
    #[arg(long, env = "COHORT_DATA_DIR", default_value = "/var/lib/cohort")]
    pub data_dir: PathBuf,
    /// Where the CA, the controller's certificate and the token key live.
    #[arg(long, env = "COHORT_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

impl TlsDirArgs {
    pub fn dir(&self) -> PathBuf {
        self.tls_dir.clone().unwrap_or_else(|| self.data_dir.join("tls"))
    }
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: TlsDirArgs,
    /// This controller's id, written in its certificate (default: the host name).
    #[arg(long, env = "COHORT_CONTROLLER_ID")]
    pub id: Option<String>,
    /// Host names and addresses agents and users reach this controller at
    /// (comma-separated); localhost, 127.0.0.1 and the host name are always added.
    #[arg(long, value_delimiter = ',')]
    pub san: Vec<String>,
    /// The cluster's name, in the CA's subject.
    #[arg(long, default_value = "cohort")]
    pub cluster_name: String,
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    pub dir: TlsDirArgs,
    /// admin, submit, view or join.
    #[arg(long, default_value = "join")]
    pub role: Role,
    /// Who the token is for (default: "admin" for admin tokens, else the role).
    #[arg(long)]
    pub user: Option<String>,
    /// Validity (default: join 15m, others 30 days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// A join token for this node name only.
    #[arg(long)]
    pub node: Option<String>,
    /// A join token that may join several nodes until it expires (default: single-use).
    #[arg(long)]
    pub reusable: bool,
}

pub fn run(setup: Setup) -> anyhow::Result<()> {
    match setup {
        Setup::Init(args) => init(&args),
        Setup::Token(args) => {
            let dir = args.dir.dir();
            let key = TokenKey::from_text(&tls::read(&dir.join(files::TOKEN_KEY))?)?;
            let user = args.user.unwrap_or_else(|| args.role.name().to_string());
            let ttl = args.ttl.map(|t| t.as_secs().max(1)).unwrap_or(0);
            let mut claims = super::mint_claims(args.role, &user, ttl, args.node.as_deref().unwrap_or(""))
                .map_err(anyhow::Error::msg)?;
            if args.reusable && args.role != Role::Join {
                anyhow::bail!("--reusable: only a join token is single-use or reusable");
            }
            claims.reusable = args.reusable;
            eprintln!("{} token {}", args.role.name(), claims.id);
            println!("{}", key.mint(&claims));
            Ok(())
        }
    }
}

fn host_name() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "controller".into())
}

fn init(args: &InitArgs) -> anyhow::Result<()> {
    let dir = args.dir.dir();
    std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("creating --tls-dir {}: {e}", dir.display()))?;
    let ca_cert = dir.join(files::CA_CERT);
    let ca = if ca_cert.exists() {
        let ca = ClusterCa::from_pem(&tls::read(&ca_cert)?, &tls::read(&dir.join(files::CA_KEY))?)?;
        println!("cluster CA: {} (kept)", ca_cert.display());
        ca
    } else {
        let ca = ClusterCa::generate(&args.cluster_name, CA_TTL)?;
        tls::write(&dir.join(files::CA_KEY), &ca.key_pem(), true)?;
        tls::write(&ca_cert, ca.cert_pem(), false)?;
        println!(
            "cluster CA: {} (new; copy ca.crt to every node, ca.key and token.key only to other controllers)",
            ca_cert.display()
        );
        ca
    };
    let key_path = dir.join(files::TOKEN_KEY);
    if !key_path.exists() {
        tls::write(&key_path, &TokenKey::generate().to_text(), true)?;
    }
    let host = host_name();
    let id = args.id.clone().unwrap_or_else(|| host.clone());
    let mut names: Vec<String> = args.san.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for default in ["localhost".to_string(), "127.0.0.1".into(), "::1".into(), host] {
        if !names.contains(&default) {
            names.push(default);
        }
    }
    let (cert, key) = ca.issue_controller(&id, &names, CONTROLLER_CERT_TTL)?;
    tls::write(&dir.join(files::CONTROLLER_KEY), &key, true)?;
    tls::write(&dir.join(files::CONTROLLER_CERT), &cert, false)?;
    println!(
        "controller certificate: {} (id {id}; names {})",
        dir.join(files::CONTROLLER_CERT).display(),
        names.join(", ")
    );
    let admin = dir.join(files::ADMIN_TOKEN);
    if !admin.exists() {
        write_admin_token(&dir, &admin)?;
    }
    println!("admin token: {} (for the CLI: COHORT_TOKEN=\"$(cat {})\")", admin.display(), admin.display());
    println!(
        "next: cohort-controller --tls-dir {d} ...; join tokens for agents: cohort-controller token --tls-dir {d} --role join",
        d = dir.display()
    );
    Ok(())
}

fn write_admin_token(dir: &Path, path: &Path) -> anyhow::Result<()> {
    let key = TokenKey::from_text(&tls::read(&dir.join(files::TOKEN_KEY))?)?;
    let claims = super::mint_claims(Role::Admin, "admin", ADMIN_TOKEN_TTL.as_secs(), "").map_err(anyhow::Error::msg)?;
    tls::write(path, &format!("{}\n", key.mint(&claims)), true)?;
    Ok(())
}
