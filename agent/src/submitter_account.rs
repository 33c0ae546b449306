//! Each submitter's own Unix identity (issue 14, finding 9): a secured
//! controller sends `user` = `submitter:<token user>` for a job that names no
//! `user:`, and the agent runs everything of that job (ranks, preflight,
//! dataset check, staging reads, job-file helpers) as that submitter's
//! account, so that two submitters never share a uid: neither can read the
//! other's `/proc/<pid>/environ` nor signal the other's ranks.
//!
//! The account is an existing Unix user of the submitter's name where the
//! node allows it (`--map-submitters-to-users`, for LDAP/sssd sites), else a
//! locked system account `cohort-<name>` the agent makes once: no password,
//! no login shell, a uid from `--submitter-uids`, its home under the agent's
//! work directory. The account's comment names the submitter it was made
//! for, so an account of that name made by anyone else is never used.

use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User};

/// How the controller writes "the submitter's own identity" in a command's
/// `user` (`:` is in no Unix user name, so it never names an account).
pub const SUBMITTER_PREFIX: &str = "submitter:";

/// Longest Unix user name `useradd` accepts.
const MAX_NAME: usize = 32;

/// One account is made at a time in this agent: two jobs of one new
/// submitter starting together make it once.
static MAKING: Mutex<()> = Mutex::new(());

/// The node's rule for submitters' accounts.
#[derive(Debug, Clone)]
pub struct SubmitterAccounts {
    /// Prefix of the accounts the agent makes: `cohort-` + the submitter's name.
    pub prefix: String,
    /// uids (and gids) of the accounts the agent makes.
    pub uids: RangeInclusive<u32>,
    /// Run a submitter's jobs as the existing Unix user of the same name
    /// (uid at least `min_existing_uid`, outside `uids`).
    pub map_existing: bool,
    /// Lowest uid an existing user may have to be used: system accounts never are.
    pub min_existing_uid: u32,
    /// Where the homes of the accounts the agent makes are.
    pub home_root: PathBuf,
}

impl Default for SubmitterAccounts {
    fn default() -> Self {
        SubmitterAccounts {
            prefix: "cohort-".into(),
            uids: 62000..=62999,
            map_existing: false,
            min_existing_uid: 1000,
            home_root: PathBuf::from("/var/lib/cohort-agent/homes"),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AccountError {
    #[error(
        "submitter {submitter:?} cannot name a Unix account: use token user names of lowercase letters, digits, '.', '_' and '-', starting with a letter or '_', at most {max} characters (mint a token with such a --user), or name an allowed account with `user:`"
    )]
    BadName { submitter: String, max: usize },
    #[error(
        "Unix user {name:?} exists but was not made by cohort for submitter {submitter:?} (its comment is {comment:?}, its uid {uid}); remove or rename it, or change the agent's --submitter-account-prefix"
    )]
    NotOurs { name: String, submitter: String, comment: String, uid: u32 },
    #[error(
        "no free uid left in --submitter-uids {start}-{end} for submitter {submitter:?}; widen the range in the agent's config"
    )]
    NoFreeUid { submitter: String, start: u32, end: u32 },
    #[error(
        "cannot make the Unix account {name:?} for submitter {submitter:?}: {error}; the agent must run as root with useradd installed (package passwd), or set the controller's --default-job-user rank-user"
    )]
    Useradd { name: String, submitter: String, error: String },
    #[error("cannot make the home {path} of {name:?}: {error}")]
    Home { name: String, path: String, error: String },
    #[error("cannot look up Unix user {name:?}: {error}")]
    Lookup { name: String, error: String },
}

impl SubmitterAccounts {
    /// The account the agent makes for `submitter`; refuses names that are no
    /// valid Unix name as they are (never altered, so two submitters can never
    /// end up with one account).
    pub fn account_name(&self, submitter: &str) -> Result<String, AccountError> {
        self.check_name(submitter)?;
        if self.prefix.len() + submitter.len() > MAX_NAME {
            return Err(self.bad_name(submitter));
        }
        Ok(format!("{}{submitter}", self.prefix))
    }

    /// A submitter's name is used only if it is a portable Unix user name as it is.
    fn check_name(&self, submitter: &str) -> Result<(), AccountError> {
        let mut chars = submitter.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if !first_ok || !rest_ok || submitter.len() > MAX_NAME {
            return Err(self.bad_name(submitter));
        }
        Ok(())
    }

    fn bad_name(&self, submitter: &str) -> AccountError {
        AccountError::BadName { submitter: submitter.to_owned(), max: MAX_NAME.saturating_sub(self.prefix.len()) }
    }

    /// What the comment (GECOS) of an account made for `submitter` says.
    pub fn comment(submitter: &str) -> String {
        format!("cohort submitter {submitter}")
    }

    /// The Unix user `submitter`'s jobs run as on this node: the existing
    /// user of that name if the node maps them, else the account the agent
    /// made for it, made now if it is the submitter's first job here.
    pub fn resolve(&self, submitter: &str) -> Result<User, AccountError> {
        self.check_name(submitter)?;
        if self.map_existing
            && let Some(user) = lookup(submitter)?
            && user.uid.as_raw() >= self.min_existing_uid
            && !self.uids.contains(&user.uid.as_raw())
            && !submitter.starts_with(&self.prefix)
        {
            return Ok(user);
        }
        self.ensure(submitter, &self.account_name(submitter)?)
    }

    /// The account `name` of `submitter`, made if it does not exist yet. Safe
    /// against jobs of this agent at once (one lock) and other agents of the
    /// host (useradd's own lock, "name in use" and "uid in use" answers).
    pub fn ensure(&self, submitter: &str, name: &str) -> Result<User, AccountError> {
        let _making = MAKING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(user) = lookup(name)? {
            return self.ours(submitter, user);
        }
        let home = self.home_root.join(name);
        let mut uid = *self.uids.start();
        let mut busy_tries = 0;
        while uid <= *self.uids.end() {
            if uid_taken(uid) {
                uid += 1;
                continue;
            }
            let out = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home", "--shell", nologin()])
                .arg("--home-dir")
                .arg(&home)
                .args(["--uid", &uid.to_string(), "--comment", &Self::comment(submitter), name])
                .output()
                .map_err(|e| self.useradd_error(submitter, name, e.to_string()))?;
            match out.status.code() {
                Some(0) => {
                    let user = lookup(name)?.ok_or_else(|| {
                        self.useradd_error(submitter, name, "useradd succeeded but the user is not found".into())
                    })?;
                    self.make_home(&user, &home)?;
                    tracing::info!(submitter, user = name, uid, "made the submitter's Unix account");
                    return Ok(user);
                }
                // The name is in use: another agent of this host made it just now.
                Some(9) => {
                    return lookup(name)?.map_or_else(
                        || Err(self.useradd_error(submitter, name, stderr(&out))),
                        |u| self.ours(submitter, u),
                    );
                }
                // The uid is in use (made since we looked): the next one.
                Some(4) => uid += 1,
                // /etc/passwd is locked by another useradd: again shortly.
                Some(10) if busy_tries < 50 => {
                    busy_tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => return Err(self.useradd_error(submitter, name, stderr(&out))),
            }
        }
        Err(AccountError::NoFreeUid {
            submitter: submitter.to_owned(),
            start: *self.uids.start(),
            end: *self.uids.end(),
        })
    }

    /// An existing account is used only if cohort made it for this submitter.
    fn ours(&self, submitter: &str, user: User) -> Result<User, AccountError> {
        let comment = user.gecos.to_string_lossy().into_owned();
        if comment != Self::comment(submitter) || !self.uids.contains(&user.uid.as_raw()) {
            return Err(AccountError::NotOurs {
                name: user.name.clone(),
                submitter: submitter.to_owned(),
                comment,
                uid: user.uid.as_raw(),
            });
        }
        // A home lost since (a wiped work directory) is made again, if it is
        // one of this agent's; another agent's (of another work directory) is not ours to make.
        if !user.dir.is_dir() && user.dir.starts_with(&self.home_root) {
            self.make_home(&user, &user.dir.clone())?;
        }
        Ok(user)
    }

    /// The home: private to the account, below a directory others may only pass through.
    fn make_home(&self, user: &User, home: &Path) -> Result<(), AccountError> {
        let error =
            |e: String| AccountError::Home { name: user.name.clone(), path: home.display().to_string(), error: e };
        std::fs::create_dir_all(home).map_err(|e| error(e.to_string()))?;
        if let Some(parent) = home.parent() {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| error(e.to_string()))?;
        }
        nix::unistd::chown(home, Some(user.uid), Some(user.gid)).map_err(|e| error(e.to_string()))?;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(|e| error(e.to_string()))
    }

    fn useradd_error(&self, submitter: &str, name: &str, error: String) -> AccountError {
        AccountError::Useradd { name: name.to_owned(), submitter: submitter.to_owned(), error }
    }
}

fn lookup(name: &str) -> Result<Option<User>, AccountError> {
    User::from_name(name).map_err(|e| AccountError::Lookup { name: name.to_owned(), error: e.to_string() })
}

/// A uid is free only if no user has it and no group has it as gid (the
/// account's own group takes the same number).
fn uid_taken(uid: u32) -> bool {
    !matches!(User::from_uid(Uid::from_raw(uid)), Ok(None)) || !matches!(Group::from_gid(Gid::from_raw(uid)), Ok(None))
}

fn nologin() -> &'static str {
    ["/usr/sbin/nologin", "/sbin/nologin"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("/bin/false")
}

fn stderr(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    format!("useradd exited with {}: {text}", out.status)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_submitter_name_gets_the_prefix_and_nothing_else_changes() {
        let accounts = SubmitterAccounts::default();
        assert_eq!(accounts.account_name("alice").unwrap(), "cohort-alice");
        assert_eq!(accounts.account_name("_svc.eval-2").unwrap(), "cohort-_svc.eval-2");
    }

    #[test]
    fn names_that_would_need_changing_are_refused_so_two_submitters_never_share_an_account() {
        let accounts = SubmitterAccounts::default();
        // "Alice" and "alice" would both become cohort-alice if lowercased: refused instead.
        for bad in ["Alice", "", "alice smith", "a:b", "../root", "-x", "9lives", "al/ice", "al\nice", "é"] {
            let err = accounts.account_name(bad).unwrap_err();
            assert!(matches!(&err, AccountError::BadName { submitter, .. } if submitter == bad), "{bad:?}: {err}");
        }
        let long = "a".repeat(MAX_NAME - "cohort-".len() + 1);
        assert!(accounts.account_name(&long).unwrap_err().to_string().contains("at most 25 characters"));
        assert!(accounts.account_name(&long[1..]).is_ok());
    }
}
