//! Which users a caller may ask jobs to run as (`user:`), bound at submit
//! (issue 14, finding 9): a node runs ranks as any user its own
//! `allowed-rank-users` lists, so without this any submit token could run
//! code as any of them. By default a token of user `alice` may run jobs only
//! without `user:` (her own account, below) or as `alice`; the controller's
//! `--allow-run-as alice=svc-train,svc-eval` adds users, `*=svc-shared` adds
//! one for every caller, `alice=*` lets alice name any user. Admin tokens
//! and `--insecure` controllers are not bound.
//!
//! A job of a submit token without `user:` runs as its submitter's own Unix
//! account on each node (`submitter:<name>`, the agent maps or makes it), so
//! that two submitters never share a uid; `--default-job-user rank-user`
//! keeps the old shared rank-user.

use std::collections::BTreeMap;

use cohort_proto::JobFile;
use cohort_runtime::tls::Role;
use cohort_shared::spec::JobSpec;

use super::auth::Caller;
use crate::error::ControllerError;

/// How a command's `user` names the submitter's own account (the agent's
/// `submitter_account::SUBMITTER_PREFIX`).
pub const SUBMITTER_PREFIX: &str = "submitter:";

/// Who a job without `user:` runs as (`--default-job-user`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DefaultJobUser {
    /// The submitter's own Unix account on each node.
    #[default]
    Submitter,
    /// The node's one rank-user, shared by every submitter: a job can read
    /// another's environment (secrets) and signal its processes.
    RankUser,
}

/// `--allow-run-as` rules: per caller identity (a token's user; `*`: every
/// caller), the users its jobs may name besides its own name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAsRules {
    allowed: BTreeMap<String, Vec<String>>,
    /// Who a job without `user:` runs as.
    pub default_job_user: DefaultJobUser,
}

impl RunAsRules {
    /// Parses rules `identity=user[,user...]`.
    pub fn parse(rules: &[String]) -> Result<RunAsRules, String> {
        let mut allowed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rule in rules.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            let (identity, users) = rule.split_once('=').ok_or_else(|| {
                format!("--allow-run-as {rule:?}: write identity=user[,user...], e.g. alice=svc-train or *=svc-shared")
            })?;
            let identity = identity.trim();
            let users: Vec<String> = users.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
            if identity.is_empty() || users.is_empty() {
                return Err(format!("--allow-run-as {rule:?}: both the identity and at least one user are needed"));
            }
            allowed.entry(identity.to_owned()).or_default().extend(users);
        }
        Ok(RunAsRules { allowed, default_job_user: DefaultJobUser::default() })
    }

    /// The rules with `--default-job-user`.
    pub fn with_default_job_user(self, default_job_user: DefaultJobUser) -> Self {
        RunAsRules { default_job_user, ..self }
    }

    /// `JobFile.default_user` for a job `caller` submits: its own account for a
    /// submit token; the rank-user for admins (trusted, they may name any
    /// user), `--insecure` (one user, nothing to separate) and
    /// `--default-job-user rank-user`.
    pub fn default_user_for(&self, caller: &Caller) -> String {
        match (self.default_job_user, caller) {
            (DefaultJobUser::Submitter, Caller::User { name, role: Role::Submit }) => {
                format!("{SUBMITTER_PREFIX}{name}")
            }
            _ => String::new(),
        }
    }

    /// Whether `identity`'s jobs may ask for `user:` `user` (empty: the default user).
    pub fn allows(&self, identity: &str, user: &str) -> bool {
        let user = user.trim();
        if user.is_empty() || user == identity {
            return true;
        }
        if let Some(submitter) = user.strip_prefix(SUBMITTER_PREFIX) {
            return submitter == identity;
        }
        [identity, "*"]
            .iter()
            .filter_map(|who| self.allowed.get(*who))
            .flatten()
            .any(|allowed| allowed == user || allowed == "*")
    }

    /// Refuses a job whose `user:` its submitter may not run as, or whose
    /// submitter's name could name no Unix account of its own.
    pub fn check(&self, job: &str, identity: &str, user: &str) -> Result<(), ControllerError> {
        if let Some(submitter) = user.strip_prefix(SUBMITTER_PREFIX)
            && !is_portable_user_name(submitter)
        {
            return Err(ControllerError::PermissionDenied(format!(
                "job {job}: it would run as the Unix account of its submitter {submitter:?}, which is no Unix user \
                 name (lowercase letters, digits, '.', '_', '-', starting with a letter or '_'); ask an admin for a \
                 token whose user is such a name, or name a user you may run as with `user:`"
            )));
        }
        if self.allows(identity, user) {
            return Ok(());
        }
        let default = match self.default_job_user {
            DefaultJobUser::Submitter => "its own Unix account (no `user:`)",
            DefaultJobUser::RankUser => "the node's rank-user (no `user:`)",
        };
        let mut may: Vec<String> = vec![default.into(), identity.to_owned()];
        may.extend([identity, "*"].iter().filter_map(|who| self.allowed.get(*who)).flatten().cloned());
        Err(ControllerError::PermissionDenied(format!(
            "job {job}: `user: {user}` is not a user {identity:?} may run jobs as (allowed: {}); drop `user:` or \
             name one of those, or ask an admin to add `--allow-run-as {identity}={user}` to the controller",
            may.join(", ")
        )))
    }
}

/// A user name every Unix accepts as it is (the agents make or map accounts
/// of submitters only with such names, never altered: two submitters never share one).
fn is_portable_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        && name.len() <= 32
}

/// Fills a parsed job's `user` from the file's `default_user` when the job
/// names none: every command to the nodes then carries the same identity.
pub fn apply_default_user(spec: &mut JobSpec, file: &JobFile) {
    if spec.user.is_none() && !file.default_user.is_empty() {
        spec.user = Some(file.default_user.clone());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn by_default_a_caller_runs_as_the_rank_user_or_its_own_name() {
        let rules = RunAsRules::default();
        assert!(rules.allows("alice", ""));
        assert!(rules.allows("alice", "alice"));
        assert!(!rules.allows("alice", "root"));
        assert!(!rules.allows("alice", "bob"));
    }

    #[test]
    fn rules_add_users_per_identity_and_for_everyone() {
        let rules =
            RunAsRules::parse(&["alice=svc-train, svc-eval".into(), "*=svc-shared".into(), "ops=*".into()]).unwrap();
        assert!(rules.allows("alice", "svc-eval"));
        assert!(rules.allows("bob", "svc-shared"));
        assert!(!rules.allows("bob", "svc-train"));
        assert!(rules.allows("ops", "root"));
        let err = rules.check("j", "bob", "svc-train").unwrap_err().to_string();
        assert!(err.contains("`user: svc-train`") && err.contains("--allow-run-as bob=svc-train"), "{err}");
        assert!(err.contains("svc-shared"), "{err}");
    }

    #[test]
    fn a_submit_tokens_job_without_user_runs_as_its_own_account_unless_told_otherwise() {
        let submit = |name: &str| Caller::User { name: name.into(), role: Role::Submit };
        let rules = RunAsRules::default();
        assert_eq!(rules.default_user_for(&submit("alice")), "submitter:alice");
        assert_eq!(rules.default_user_for(&submit("bob")), "submitter:bob");
        assert_eq!(rules.default_user_for(&Caller::User { name: "ops".into(), role: Role::Admin }), "");
        assert_eq!(rules.default_user_for(&Caller::Unchecked), "");
        let shared = RunAsRules::default().with_default_job_user(DefaultJobUser::RankUser);
        assert_eq!(shared.default_user_for(&submit("alice")), "");
        // A caller's own account is allowed to it, another's never, not even with `alice=*`.
        let open = RunAsRules::parse(&["alice=*".into()]).unwrap();
        assert!(open.allows("alice", "submitter:alice"));
        assert!(!open.allows("alice", "submitter:bob"));
        // A token user that is no Unix name is refused at submit, not at launch on the nodes.
        rules.check("j", "alice", "submitter:alice").unwrap();
        let err = rules.check("j", "Alice Smith", "submitter:Alice Smith").unwrap_err().to_string();
        assert!(err.contains("\"Alice Smith\", which is no Unix user name"), "{err}");
    }

    #[test]
    fn the_default_user_fills_only_a_job_without_user() {
        let yaml = |user: &str| format!("name: a\nkind: command\nnodes: 1\n{user}command: [x]\n");
        let file = JobFile { default_user: "submitter:alice".into(), ..JobFile::default() };
        let mut spec = JobSpec::from_yaml(&yaml(""), "a.yaml").unwrap();
        apply_default_user(&mut spec, &file);
        assert_eq!(spec.user.as_deref(), Some("submitter:alice"));
        let mut named = JobSpec::from_yaml(&yaml("user: svc\n"), "a.yaml").unwrap();
        apply_default_user(&mut named, &file);
        assert_eq!(named.user.as_deref(), Some("svc"));
    }

    #[test]
    fn a_malformed_rule_is_named() {
        assert!(RunAsRules::parse(&["alice".into()]).unwrap_err().contains("identity=user"));
        assert!(RunAsRules::parse(&["=bob".into()]).unwrap_err().contains("both"));
    }
}
