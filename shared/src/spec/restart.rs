//! The `restart` section: how many new attempts a job gets, after what wait,
//! on which failures, and whether the blamed node is left out.
//!
//! ```yaml
//! restart:
//!   max_restarts: 3           # new attempts after the first; default 3
//!   backoff: 10s              # wait before the first restart, doubled each time (at most 5m)
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
    /// The wait before the first restart; doubled for each later one, capped at [`MAX_BACKOFF`].
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

    /// The wait before restart number `n` (1-based): backoff × 2^(n-1), at most 5 minutes.
    pub fn backoff_for(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(16));
        self.backoff.saturating_mul(factor).min(MAX_BACKOFF.max(self.backoff))
    }
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
