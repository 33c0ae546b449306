//! Which users a caller may ask jobs to run as (`user:`), bound at submit
//! (issue 14, finding 9): a node runs ranks as any user its own
//! `allowed-rank-users` lists, so without this any submit token could run
//! code as any of them. By default a token of user `alice` may run jobs only
//! without `user:` (the node's rank-user) or as `alice`; the controller's
//! `--allow-run-as alice=svc-train,svc-eval` adds users, `*=svc-shared` adds
//! one for every caller, `alice=*` lets alice name any user. Admin tokens
//! and `--insecure` controllers are not bound.

use std::collections::BTreeMap;

use crate::error::ControllerError;

/// `--allow-run-as` rules: per caller identity (a token's user; `*`: every
/// caller), the users its jobs may name besides its own name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAsRules {
    allowed: BTreeMap<String, Vec<String>>,
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
        Ok(RunAsRules { allowed })
    }

    /// Whether `identity`'s jobs may ask for `user:` `user` (empty: the node's rank-user).
    pub fn allows(&self, identity: &str, user: &str) -> bool {
        let user = user.trim();
        if user.is_empty() || user == identity {
            return true;
        }
        [identity, "*"]
            .iter()
            .filter_map(|who| self.allowed.get(*who))
            .flatten()
            .any(|allowed| allowed == user || allowed == "*")
    }

    /// Refuses a job whose `user:` its submitter may not run as.
    pub fn check(&self, job: &str, identity: &str, user: &str) -> Result<(), ControllerError> {
        if self.allows(identity, user) {
            return Ok(());
        }
        let mut may: Vec<String> = vec!["the node's rank-user (no `user:`)".into(), identity.to_owned()];
        may.extend([identity, "*"].iter().filter_map(|who| self.allowed.get(*who)).flatten().cloned());
        Err(ControllerError::PermissionDenied(format!(
            "job {job}: `user: {user}` is not a user {identity:?} may run jobs as (allowed: {}); drop `user:` or \
             name one of those, or ask an admin to add `--allow-run-as {identity}={user}` to the controller",
            may.join(", ")
        )))
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
    fn a_malformed_rule_is_named() {
        assert!(RunAsRules::parse(&["alice".into()]).unwrap_err().contains("identity=user"));
        assert!(RunAsRules::parse(&["=bob".into()]).unwrap_err().contains("both"));
    }
}
