//! Which user a launch's processes run as. The node's configuration names a
//! default (`rank-user`), the other users a job may ask for with `user:`
//! (`allowed-rank-users`, `*` for any), and whether root is allowed at all
//! (`allow-root-ranks`, off by default). The shim drops to the chosen user,
//! with its primary and supplementary groups, just before it starts the rank.
//! A secured controller asks for `submitter:<name>` instead of the default:
//! that submitter's own account ([`crate::submitter_account`]).

use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User};

use crate::submitter_account::{AccountError, SUBMITTER_PREFIX, SubmitterAccounts};

/// The node's rule for the users ranks may run as.
#[derive(Debug, Clone)]
pub struct RankUserPolicy {
    /// The user when a job names none; None: the agent's own user.
    pub default_user: Option<String>,
    /// Other users a job may name; `*` allows every user but root.
    pub allowed: Vec<String>,
    /// Whether ranks may run as uid 0.
    pub allow_root: bool,
    /// The accounts of `submitter:<name>` identities.
    pub submitters: SubmitterAccounts,
}

/// A resolved user, ready for the shim.
#[derive(Debug, Clone, PartialEq)]
pub struct RankIdentity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from /etc/group or NSS), primary included.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RankUserError {
    #[error(
        "the job asks to run as user {user:?}, which this node does not allow (rank-user {default:?}, allowed-rank-users [{allowed}]); add it to allowed-rank-users in the agent's config or drop `user:` from the job"
    )]
    NotAllowed { user: String, default: String, allowed: String },
    #[error(
        "ranks would run as root (uid 0), which this node does not allow; set rank-user to an unprivileged user in the agent's config, or allow-root-ranks = true"
    )]
    Root,
    #[error(
        "the job's `user: {user}` is root (uid 0), which this node does not allow (allow-root-ranks = false); drop `user:` from the job to run as the node's rank-user"
    )]
    RootRequested { user: String },
    #[error("user {0:?} does not exist on this node")]
    Unknown(String),
    #[error("cannot look up user {user:?}: {error}")]
    Lookup { user: String, error: String },
    #[error(
        "the agent runs as uid {agent_uid} and cannot start processes as user {user:?} (uid {uid}); run the agent as root or use its own user"
    )]
    CannotSwitch { user: String, uid: u32, agent_uid: u32 },
    #[error("{0}")]
    Submitter(#[from] AccountError),
}

impl RankUserPolicy {
    /// Ranks run as the agent's own user, root included: for tests and
    /// embedded supervisors; the daemon always builds its policy from flags.
    pub fn agent_user() -> Self {
        RankUserPolicy {
            default_user: None,
            allowed: Vec::new(),
            allow_root: true,
            submitters: SubmitterAccounts::default(),
        }
    }

    /// Checks that launches without `user:` can run at all (at start-up, so a
    /// misconfigured node says so at once rather than on the first job).
    pub fn check(&self) -> Result<RankIdentity, RankUserError> {
        self.resolve("")
    }

    /// [`Self::resolve`] on a blocking thread: the lookups may ask NSS
    /// (LDAP), and a submitter's first job makes its account with `useradd`.
    pub async fn resolve_blocking(&self, requested: &str) -> Result<RankIdentity, RankUserError> {
        let (policy, wanted) = (self.clone(), requested.to_owned());
        tokio::task::spawn_blocking(move || policy.resolve(&wanted)).await.unwrap_or_else(|e| {
            Err(RankUserError::Lookup { user: requested.to_owned(), error: format!("the lookup did not finish: {e}") })
        })
    }

    /// The identity for a launch that asks for `requested` (empty: the default).
    pub fn resolve(&self, requested: &str) -> Result<RankIdentity, RankUserError> {
        let requested = requested.trim();
        if let Some(submitter) = requested.strip_prefix(SUBMITTER_PREFIX) {
            let user = self.submitters.resolve(submitter)?;
            return self.identity(user, requested);
        }
        let default = self.default_user.as_deref().unwrap_or("");
        if !requested.is_empty() && requested != default && !self.allowed.iter().any(|a| a == requested || a == "*") {
            return Err(RankUserError::NotAllowed {
                user: requested.to_owned(),
                default: if default.is_empty() { "<the agent's user>".into() } else { default.to_owned() },
                allowed: self.allowed.join(", "),
            });
        }
        let name = if requested.is_empty() { default } else { requested };
        if name.is_empty() {
            return self.agent_identity();
        }
        self.identity(lookup(name)?, requested)
    }

    /// `user` as a rank identity, if this node may run processes as it.
    fn identity(&self, user: User, requested: &str) -> Result<RankIdentity, RankUserError> {
        if user.uid.is_root() && !self.allow_root {
            return Err(if requested.is_empty() {
                RankUserError::Root
            } else {
                RankUserError::RootRequested { user: requested.to_owned() }
            });
        }
        let agent_uid = Uid::current();
        if !agent_uid.is_root() && user.uid != agent_uid {
            return Err(RankUserError::CannotSwitch {
                user: user.name.clone(),
                uid: user.uid.as_raw(),
                agent_uid: agent_uid.as_raw(),
            });
        }
        let groups = groups_of(&user);
        Ok(RankIdentity { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), groups, home: user.dir })
    }
}

impl RankUserPolicy {
    /// The agent's own user. A uid without a passwd entry (a container built
    /// FROM scratch) is still usable: nothing is switched.
    fn agent_identity(&self) -> Result<RankIdentity, RankUserError> {
        let (uid, gid) = (Uid::current(), Gid::current());
        if uid.is_root() && !self.allow_root {
            return Err(RankUserError::Root);
        }
        match User::from_uid(uid) {
            Ok(Some(user)) => {
                let groups = groups_of(&user);
                Ok(RankIdentity { name: user.name, uid: uid.as_raw(), gid: gid.as_raw(), groups, home: user.dir })
            }
            Ok(None) | Err(_) => Ok(RankIdentity {
                name: uid.to_string(),
                uid: uid.as_raw(),
                gid: gid.as_raw(),
                groups: Vec::new(),
                home: PathBuf::from("/"),
            }),
        }
    }
}

impl RankIdentity {
    /// Whether starting a process as this user changes the identity of the shim.
    pub fn needs_switch(&self) -> bool {
        Uid::current().as_raw() != self.uid || Gid::current().as_raw() != self.gid
    }

    /// HOME, USER and LOGNAME of this user.
    pub fn login_env(&self) -> [(&'static str, std::ffi::OsString); 3] {
        [
            ("HOME", self.home.clone().into_os_string()),
            ("USER", self.name.clone().into()),
            ("LOGNAME", self.name.clone().into()),
        ]
    }

    /// `uid:gid:g1,g2,...`, what the shim's `--run-as` takes.
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }
}

fn lookup(name: &str) -> Result<User, RankUserError> {
    // A numeric name is a uid, as for chown and sudo -u '#1000'.
    if let Ok(uid) = name.parse::<u32>() {
        return lookup_uid(Uid::from_raw(uid));
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(RankUserError::Unknown(name.to_owned())),
        Err(e) => Err(RankUserError::Lookup { user: name.to_owned(), error: e.to_string() }),
    }
}

fn lookup_uid(uid: Uid) -> Result<User, RankUserError> {
    match User::from_uid(uid) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(RankUserError::Unknown(uid.to_string())),
        Err(e) => Err(RankUserError::Lookup { user: uid.to_string(), error: e.to_string() }),
    }
}

fn groups_of(user: &User) -> Vec<u32> {
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else { return vec![user.gid.as_raw()] };
    match nix::unistd::getgrouplist(&name, user.gid) {
        Ok(groups) => groups.into_iter().map(Gid::as_raw).collect(),
        Err(_) => vec![user.gid.as_raw()],
    }
}

/// Parses the shim's `--run-as uid:gid:g1,g2`.
pub fn parse_run_as(text: &str) -> Result<(u32, u32, Vec<u32>), String> {
    let mut parts = text.splitn(3, ':');
    let number = |part: Option<&str>, what: &str| -> Result<u32, String> {
        part.ok_or_else(|| format!("--run-as {text:?}: missing {what}"))?
            .parse()
            .map_err(|_| format!("--run-as {text:?}: {what} is not a number"))
    };
    let uid = number(parts.next(), "uid")?;
    let gid = number(parts.next(), "gid")?;
    let groups = match parts.next() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| g.parse().map_err(|_| format!("--run-as {text:?}: group {g:?} is not a number")))
            .collect::<Result<_, _>>()?,
    };
    Ok((uid, gid, groups))
}

/// Why a helper could not become the job's user.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("{0}")]
    BadRunAs(String),
    #[error("setgroups {groups:?}: {errno}")]
    SetGroups { groups: Vec<u32>, errno: nix::errno::Errno },
    #[error("setgid {gid}: {errno}")]
    SetGid { gid: u32, errno: nix::errno::Errno },
    #[error("setuid {uid}: {errno}")]
    SetUid { uid: u32, errno: nix::errno::Errno },
}

/// Makes this process `run_as` (`uid:gid:g1,g2`, as [`RankIdentity::to_arg`]
/// writes it): supplementary groups, group, then user, in that order while
/// still allowed to. A process that already is that uid and gid switches
/// nothing (an unprivileged agent running a helper as itself). The one
/// privilege drop of `exec-as`, `preflight-as` and `files-as`.
pub fn become_user(run_as: &str) -> Result<(), SwitchError> {
    let (uid, gid, groups) = parse_run_as(run_as).map_err(SwitchError::BadRunAs)?;
    if Uid::current().as_raw() == uid && Gid::current().as_raw() == gid && !Uid::effective().is_root() {
        return Ok(());
    }
    let gids: Vec<Gid> = groups.iter().copied().map(Gid::from_raw).collect();
    nix::unistd::setgroups(&gids).map_err(|errno| SwitchError::SetGroups { groups, errno })?;
    nix::unistd::setgid(Gid::from_raw(gid)).map_err(|errno| SwitchError::SetGid { gid, errno })?;
    nix::unistd::setuid(Uid::from_raw(uid)).map_err(|errno| SwitchError::SetUid { uid, errno })?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn run_as_round_trips_and_rejects_garbage() {
        let id = RankIdentity { name: "a".into(), uid: 1000, gid: 100, groups: vec![100, 27], home: "/h".into() };
        assert_eq!(parse_run_as(&id.to_arg()), Ok((1000, 100, vec![100, 27])));
        assert_eq!(parse_run_as("5:6:"), Ok((5, 6, vec![])));
        assert!(parse_run_as("5").unwrap_err().contains("missing gid"));
        assert!(parse_run_as("x:1:").unwrap_err().contains("uid is not a number"));
        assert!(parse_run_as("1:1:a").unwrap_err().contains("group \"a\""));
    }

    #[test]
    fn a_user_outside_the_allowed_list_is_refused_and_named() {
        let policy = RankUserPolicy {
            default_user: Some("root".into()),
            allowed: vec!["daemon".into()],
            allow_root: true,
            submitters: SubmitterAccounts::default(),
        };
        let err = policy.resolve("nobody").unwrap_err();
        assert!(matches!(&err, RankUserError::NotAllowed { user, .. } if user == "nobody"), "{err}");
        assert!(err.to_string().contains("allowed-rank-users [daemon]"), "{err}");
    }

    #[test]
    fn root_needs_allow_root_even_when_named_or_wildcarded() {
        let policy = RankUserPolicy {
            default_user: Some("root".into()),
            allowed: vec!["*".into()],
            allow_root: false,
            submitters: SubmitterAccounts::default(),
        };
        assert_eq!(policy.check(), Err(RankUserError::Root));
        assert_eq!(policy.resolve("0"), Err(RankUserError::RootRequested { user: "0".into() }));
        assert!(policy.resolve("root").unwrap_err().to_string().contains("`user: root`"));
        let numeric = RankUserPolicy {
            default_user: Some("0".into()),
            allowed: vec![],
            allow_root: false,
            submitters: SubmitterAccounts::default(),
        };
        assert_eq!(numeric.check(), Err(RankUserError::Root));
    }

    #[test]
    fn an_unknown_user_is_named() {
        let policy = RankUserPolicy {
            default_user: None,
            allowed: vec!["*".into()],
            allow_root: true,
            submitters: SubmitterAccounts::default(),
        };
        assert_eq!(policy.resolve("no-such-user-cohort"), Err(RankUserError::Unknown("no-such-user-cohort".into())));
    }
}
