//! The `restart` section: how many new attempts a job gets, after what wait,
//! on which failures, and whether the blamed node is left out.
//!
//! ```yaml
//! restart:
//!   max_restarts: 3           # new attempts after the first; default 3
//!   backoff: 10s              # wait before the first restart, doubled each time (at most 5m),
//!                             # back to 10s after an attempt that ran 10 minutes
//!   on: [rank_failed, node_lost, hang]   # the default
//!   exclude_failed_nodes: true           # default false
//! ```

use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::typed;
use crate::failure::{ALL_CAUSES, FailureCause};
use crate::job_file::Problems;
use crate::job_file::suggestion;

/// What a failed attempt may lead to.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    /// The wait before the first restart; doubled for each later one, capped at [`MAX_BACKOFF`],
    /// and back to this after an attempt that ran [`BACKOFF_RESET_AFTER`] (see [`backoff_step`]).
    pub backoff: Duration,
    /// Events (`rank_failed`, `node_lost`, `hang`, `time_limit`, `preflight_failed`) and
    /// causes (`cuda_oom`, `user_error`, ...) that start a new attempt.
    pub on: Vec<FailureCause>,
    /// Place the next attempt without the node blamed for the failure when
    /// enough other nodes are free.
    pub exclude_failed_nodes: bool,
}

pub const DEFAULT_MAX_RESTARTS: u32 = 3;
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
pub const DEFAULT_ON: &[FailureCause] = &[FailureCause::RankFailed, FailureCause::NodeLost, FailureCause::Hang];

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { max_restarts: 0, backoff: DEFAULT_BACKOFF, on: Vec::new(), exclude_failed_nodes: false }
    }
}

impl RestartPolicy {
    /// Whether a failure of this cause starts a new attempt (restarts left aside):
    /// the cause is named, or its event is and the cause is retried by default.
    pub fn retries(&self, cause: FailureCause) -> bool {
        self.on.contains(&cause) || (self.on.contains(&cause.event()) && cause.retried_by_default())
    }

    /// The wait at step `n` (1-based) of the backoff: backoff × 2^(n-1), at most 5 minutes.
    pub fn backoff_for(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF.max(self.backoff))
    }
}

/// An attempt that ran this long was a healthy run, not a crash loop: the
/// restart after it waits the first step of the backoff again (Kubernetes
/// resets its CrashLoopBackOff after 10 minutes of running, too).
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// The backoff step of the next restart (for [`RestartPolicy::backoff_for`]),
/// given how long each ended attempt ran, oldest first: the number of
/// attempts at the end of the list that each ran less than
/// [`BACKOFF_RESET_AFTER`] (a crash loop doubles the wait), and 1 when the
/// last one ran longer (a failure after a long healthy run waits the least).
pub fn backoff_step(runs: &[Duration]) -> u32 {
    let short = runs.iter().rev().take_while(|run| **run < BACKOFF_RESET_AFTER).count();
    u32::try_from(short).unwrap_or(u32::MAX).max(1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartText {
    #[serde(default)]
    max_restarts: Option<u32>,
    #[serde(default, with = "crate::duration::serde_duration::option")]
    backoff: Option<Duration>,
    #[serde(default)]
    on: Option<Vec<String>>,
    #[serde(default)]
    exclude_failed_nodes: Option<bool>,
}

pub(super) fn read_restart(root: &Mapping, problems: &mut Problems) -> RestartPolicy {
    match root.get("restart") {
        None | Some(Value::Null) => return RestartPolicy::default(),
        Some(Value::Mapping(_)) => {}
        Some(_) => {
            problems.at(
                &["restart"],
                "must be a mapping, e.g. `restart: {max_restarts: 3, backoff: 10s, on: [rank_failed, node_lost, hang]}`",
            );
            return RestartPolicy::default();
        }
    }
    let Some(text) = typed::<RestartText>(root, "restart", problems) else { return RestartPolicy::default() };
    let mut on = Vec::new();
    for (i, name) in text.on.clone().unwrap_or_default().iter().enumerate() {
        match FailureCause::from_name(name) {
            Some(cause) if !on.contains(&cause) => on.push(cause),
            Some(_) => {}
            None => problems.at_field(
                format!("restart.on[{i}]"),
                &["restart", "on"],
                format!(
                    "unknown failure {name:?}{}; events: rank_failed, node_lost, hang, time_limit, preflight_failed; causes: {}",
                    suggestion(name, ALL_CAUSES.iter().map(|c| c.name())),
                    ALL_CAUSES.iter().filter(|c| c.event() != **c).map(|c| c.name()).collect::<Vec<_>>().join(", ")
                ),
            ),
        }
    }
    if text.on.is_none() {
        on = DEFAULT_ON.to_vec();
    }
    let backoff = text.backoff.unwrap_or(DEFAULT_BACKOFF);
    RestartPolicy {
        max_restarts: text.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
        backoff,
        on,
        exclude_failed_nodes: text.exclude_failed_nodes.unwrap_or(false),
    }
}

/// `straggler_factor`: a node whose ranks progress this many times slower than
/// the median of the others is flagged. Default 1.5; must be above 1.
pub(super) fn read_straggler_factor(root: &Mapping, problems: &mut Problems) -> f64 {
    match typed::<f64>(root, "straggler_factor", problems) {
        None => DEFAULT_STRAGGLER_FACTOR,
        Some(f) if f.is_finite() && f > 1.0 => f,
        Some(f) => {
            problems.at(&["straggler_factor"], format!("{f} must be a number above 1, e.g. 1.5"));
            DEFAULT_STRAGGLER_FACTOR
        }
    }
}

pub const DEFAULT_STRAGGLER_FACTOR: f64 = 1.5;

#[cfg(test)]
mod backoff_tests {
    use super::*;

    fn minutes(runs: &[u64]) -> Vec<Duration> {
        runs.iter().map(|m| Duration::from_secs(m * 60)).collect()
    }

    #[test]
    fn the_backoff_step_counts_the_short_attempts_at_the_end() {
        assert_eq!(backoff_step(&[]), 1, "no attempt yet: the first step");
        assert_eq!(backoff_step(&minutes(&[1])), 1);
        assert_eq!(backoff_step(&minutes(&[1, 1, 1])), 3, "a crash loop doubles");
        assert_eq!(backoff_step(&minutes(&[1, 1, 30])), 1, "a long last run resets");
        assert_eq!(backoff_step(&minutes(&[1, 30, 1, 1])), 2, "counted from the last long run");
        assert_eq!(backoff_step(&[BACKOFF_RESET_AFTER]), 1, "exactly the reset time counts as healthy");
        assert_eq!(backoff_step(&[BACKOFF_RESET_AFTER - Duration::from_millis(1); 2]), 2);
        let policy = RestartPolicy { backoff: Duration::from_secs(10), ..RestartPolicy::default() };
        assert_eq!(policy.backoff_for(backoff_step(&minutes(&[1; 6]))), MAX_BACKOFF, "capped");
        assert_eq!(policy.backoff_for(backoff_step(&minutes(&[1, 1, 1, 1, 1, 60]))), Duration::from_secs(10));
    }
}
