//! Queues: who may submit where, how many GPUs a queue's running jobs may
//! hold (its quota), and how long its jobs may run.
//!
//! Declared in a TOML file the controller reads at start (`--queues FILE`,
//! or `queues = "FILE"` in controller.toml):
//!
//! ```toml
//! default = "shared"            # the queue of jobs without `queue:`
//! fair_share_half_life = "7d"   # how fast past GPU use is forgiven
//!
//! [[queue]]
//! name = "team-a"
//! gpus = 32                     # quota; leave out for none
//! max_run_time = "24h"          # the time limit of jobs without one
//! users = ["alice", "bob"]      # leave out for everyone
//! borrow = true                 # may run on idle GPUs beyond its quota
//! gpus_by_label = { "gpu=h100" = 16 }  # at most 16 GPUs on nodes labelled gpu=h100
//! ```
//!
//! Without a file there is one implicit queue, `default`, with no quota: the
//! cluster schedules as it did before queues existed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::planner::NodeView;

/// The name of the one queue of a controller started without `--queues`.
pub const IMPLICIT_QUEUE: &str = "default";

/// Slurm's default PriorityDecayHalfLife.
const DEFAULT_HALF_LIFE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a submit is refused by its queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueRefusal {
    /// No such queue, or a time limit over the queue's maximum.
    #[error("{0}")]
    Invalid(String),
    /// The submitter may not use the queue.
    #[error("{0}")]
    Forbidden(String),
}

/// One queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub name: String,
    /// The most GPUs its running jobs hold together, borrowing aside (None: no quota).
    pub gpu_quota: Option<u32>,
    /// Quotas on the GPUs of nodes with a label (`gpus_by_label`, e.g. a GPU
    /// model): (label key, value, GPUs).
    pub label_quotas: Vec<LabelQuota>,
    /// The time limit of its jobs that set none (None: such jobs run unbounded).
    pub max_run_time: Option<Duration>,
    /// Who may submit to it, as token users (None: everyone).
    pub users: Option<BTreeSet<String>>,
    /// Whether its jobs may start beyond its quota on GPUs no job under its own quota can use.
    pub borrow: bool,
}

/// A quota on the GPUs a queue's jobs hold on nodes with one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelQuota {
    pub key: String,
    pub value: String,
    pub gpus: u32,
}

impl LabelQuota {
    /// Whether a node with `labels` counts against this quota.
    pub fn covers(&self, labels: &LabelMap) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

impl std::fmt::Display for LabelQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Every queue of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queues {
    queues: Vec<Queue>,
    default: String,
    /// Half-life of the usage fair share orders users by.
    pub half_life: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueConfigError {
    #[error("queue file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("queue file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueuesFile {
    default: Option<String>,
    fair_share_half_life: Option<String>,
    #[serde(default)]
    queue: Vec<QueueEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueEntry {
    name: String,
    gpus: Option<u32>,
    max_run_time: Option<String>,
    users: Option<Vec<String>>,
    #[serde(default = "borrow_default")]
    borrow: bool,
    #[serde(default)]
    gpus_by_label: std::collections::BTreeMap<String, u32>,
}

fn borrow_default() -> bool {
    true
}

impl Default for Queues {
    /// One queue, [`IMPLICIT_QUEUE`], open to everyone, no quota, no maximum run time.
    fn default() -> Self {
        Queues {
            queues: vec![Queue {
                name: IMPLICIT_QUEUE.into(),
                gpu_quota: None,
                label_quotas: Vec::new(),
                max_run_time: None,
                users: None,
                borrow: true,
            }],
            default: IMPLICIT_QUEUE.into(),
            half_life: DEFAULT_HALF_LIFE,
        }
    }
}

impl Queues {
    /// Reads a queue file.
    pub fn load(path: &Path) -> Result<Self, QueueConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| QueueConfigError::Read { path: path.to_owned(), error })?;
        Self::parse(&text).map_err(|message| QueueConfigError::Invalid { path: path.to_owned(), message })
    }

    /// Parses a queue file's text; the error names the key and the fix.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: QueuesFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let duration = |key: String, text: &str| {
            humantime::parse_duration(text)
                .map_err(|e| format!("{key}: {text:?} is not a duration ({e}), e.g. \"24h\""))
        };
        let mut queues: Vec<Queue> = Vec::new();
        for (i, entry) in file.queue.into_iter().enumerate() {
            if !cohort_shared::spec::is_queue_name(&entry.name) {
                return Err(format!(
                    "queue[{i}].name: {:?} is not a queue name: use letters, digits, `-` and `_`",
                    entry.name
                ));
            }
            if queues.iter().any(|q| q.name == entry.name) {
                return Err(format!("queue[{i}].name: queue {:?} is declared twice", entry.name));
            }
            let max_run_time = match entry.max_run_time {
                Some(text) => Some(duration(format!("queue[{i}].max_run_time"), &text)?)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("queue[{i}].max_run_time: must be longer than zero; leave it out for none"))
                    .map(Some)?,
                None => None,
            };
            let users = entry.users.filter(|u| !u.iter().any(|u| u == "*")).map(|u| u.into_iter().collect());
            let mut label_quotas = Vec::new();
            for (label, gpus) in entry.gpus_by_label {
                let Some((key, value)) = label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    return Err(format!(
                        "queue[{i}].gpus_by_label: {label:?} is not a node label KEY=VALUE, e.g. \"gpu=h100\""
                    ));
                };
                label_quotas.push(LabelQuota { key: key.into(), value: value.into(), gpus });
            }
            queues.push(Queue {
                name: entry.name,
                gpu_quota: entry.gpus,
                label_quotas,
                max_run_time,
                users,
                borrow: entry.borrow,
            });
        }
        if queues.is_empty() {
            return Err("declares no queue; add a [[queue]] table with a name, or leave --queues out".into());
        }
        let default = file.default.unwrap_or_else(|| queues[0].name.clone());
        if !queues.iter().any(|q| q.name == default) {
            return Err(format!("default: {default:?} is not a declared queue ({})", names(&queues)));
        }
        let half_life = match file.fair_share_half_life {
            Some(text) => duration("fair_share_half_life".into(), &text)?,
            None => DEFAULT_HALF_LIFE,
        };
        if half_life.is_zero() {
            return Err("fair_share_half_life: must be longer than zero, e.g. \"7d\"".into());
        }
        Ok(Queues { queues, default, half_life })
    }

    /// Every queue, in declaration order.
    pub fn all(&self) -> &[Queue] {
        &self.queues
    }

    /// The queue a job named (`queue:`), or the default one. None for an unknown name.
    pub fn of(&self, named: Option<&str>) -> Option<&Queue> {
        let name = named.unwrap_or(&self.default);
        self.queues.iter().find(|q| q.name == name)
    }

    /// The queue a job of `job` may be submitted to by `submitter` (None: an
    /// admin or `--insecure`, who may use any queue), with a time limit that
    /// fits the queue's maximum run time and, in a queue that does not
    /// borrow, no more `gpus` than its quota.
    pub fn admit(
        &self,
        job: &str,
        named: Option<&str>,
        gpus: u32,
        time_limit: Option<Duration>,
        submitter: Option<&str>,
    ) -> Result<&Queue, QueueRefusal> {
        let allowed: Vec<&Queue> = self.queues.iter().filter(|q| submitter.is_none_or(|s| q.admits(s))).collect();
        let allowed_names = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed.iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
        };
        let Some(queue) = self.of(named) else {
            return Err(QueueRefusal::Invalid(format!(
                "job {job}: queue: {:?} is not a queue of this cluster; queues you may use: {allowed_names}",
                named.unwrap_or_default()
            )));
        };
        if !allowed.iter().any(|q| q.name == queue.name) {
            let what = if named.is_some() { "queue:" } else { "the default queue" };
            return Err(QueueRefusal::Forbidden(format!(
                "job {job}: {what} {} does not admit jobs of {}; name one you may use with `queue:`: {allowed_names}",
                queue.name,
                submitter.unwrap_or_default()
            )));
        }
        if let (Some(limit), Some(max)) = (time_limit, queue.max_run_time)
            && limit > max
        {
            return Err(QueueRefusal::Invalid(format!(
                "job {job}: time_limit {} is longer than queue {}'s max_run_time {}; shorten it or leave it out",
                humantime::format_duration(limit),
                queue.name,
                humantime::format_duration(max)
            )));
        }
        if let Some(quota) = queue.gpu_quota.filter(|quota| gpus > *quota && !queue.borrow) {
            return Err(QueueRefusal::Invalid(format!(
                "job {job}: needs {gpus} GPU(s), more than queue {}'s quota of {quota}, and the queue does not borrow \
                 (borrow = false): it could never start; ask for fewer nodes or GPUs, or name another queue",
                queue.name
            )));
        }
        Ok(queue)
    }
}

impl Queue {
    /// Whether `user` may submit here.
    pub fn admits(&self, user: &str) -> bool {
        self.users.as_ref().is_none_or(|u| u.contains(user))
    }

    /// The time limit one attempt of a job in this queue runs under.
    pub fn time_limit(&self, own: Option<Duration>) -> Option<Duration> {
        own.or(self.max_run_time)
    }
}

/// Each submitter's GPU-seconds, decayed by half every half-life (Slurm's
/// classic fair share): within a queue and a priority, the job of the user who
/// used least goes first. Kept in memory: a controller starts from zero.
#[derive(Debug, Clone, Default)]
pub struct FairShare {
    usage: std::collections::HashMap<String, f64>,
    at_unix_ms: Option<i64>,
}

impl FairShare {
    /// Decays what was used and adds what each (user, GPUs held) used since the last call.
    pub fn accrue(&mut self, now_unix_ms: i64, half_life: Duration, holding: impl IntoIterator<Item = (String, u32)>) {
        let Some(last) = self.at_unix_ms.replace(now_unix_ms) else { return };
        let seconds = (now_unix_ms - last).max(0) as f64 / 1000.0;
        let decay = 0.5f64.powf(seconds / half_life.as_secs_f64().max(1.0));
        for used in self.usage.values_mut() {
            *used *= decay;
        }
        for (user, gpus) in holding {
            *self.usage.entry(user).or_default() += f64::from(gpus) * seconds;
        }
        self.usage.retain(|_, used| *used > 1e-3);
    }

    /// `user`'s decayed GPU-seconds.
    pub fn usage(&self, user: &str) -> f64 {
        self.usage.get(user).copied().unwrap_or(0.0)
    }
}

/// The GPUs each queue's jobs hold under each of its label quotas.
#[derive(Debug, Clone, Default)]
pub struct LabelUse {
    held: std::collections::HashMap<(String, usize), u32>,
}

impl LabelUse {
    /// Counts a gang of `queue` holding GPUs on nodes: (the node's labels, GPUs there).
    pub fn add<'a>(&mut self, queue: &Queue, nodes: impl IntoIterator<Item = (&'a LabelMap, u32)>) {
        for (labels, gpus) in nodes {
            for (i, quota) in queue.label_quotas.iter().enumerate() {
                if quota.covers(labels) {
                    *self.held.entry((queue.name.clone(), i)).or_default() += gpus;
                }
            }
        }
    }

    fn held(&self, queue: &Queue, i: usize) -> u32 {
        self.held.get(&(queue.name.clone(), i)).copied().unwrap_or(0)
    }

    /// Takes out of `views` the nodes of each label quota of `queue` with no
    /// room left for `gpus_per_node` more GPUs; the reason of the first, if any.
    pub fn restrict(&self, queue: &Queue, gpus_per_node: u32, views: &mut [NodeView]) -> Option<String> {
        let mut first = None;
        for (i, quota) in queue.label_quotas.iter().enumerate() {
            let held = self.held(queue, i);
            if held + gpus_per_node <= quota.gpus || gpus_per_node == 0 {
                continue;
            }
            let why = format!("queue {} at its {quota} quota {held}/{} GPUs", queue.name, quota.gpus);
            for view in views.iter_mut().filter(|v| v.unavailable.is_none() && quota.covers(&v.labels)) {
                view.unavailable = Some(format!("kept for other queues: {why}"));
            }
            first.get_or_insert(why);
        }
        first
    }

    /// The label quota of `queue` a placement would exceed: (the node's labels, GPUs there).
    pub fn exceeded<'a>(
        &self,
        queue: &Queue,
        nodes: impl IntoIterator<Item = (&'a LabelMap, u32)> + Clone,
    ) -> Option<String> {
        queue.label_quotas.iter().enumerate().find_map(|(i, quota)| {
            let held = self.held(queue, i);
            let wanted: u32 = nodes.clone().into_iter().filter(|(l, _)| quota.covers(l)).map(|(_, g)| g).sum();
            (wanted > 0 && held + wanted > quota.gpus).then(|| {
                format!(
                    "queue {} at its {quota} quota {held}/{} GPUs (this job needs {wanted} there)",
                    queue.name, quota.gpus
                )
            })
        })
    }
}

/// A node's labels.
pub type LabelMap = std::collections::HashMap<String, String>;

fn names(queues: &[Queue]) -> String {
    queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const FILE: &str = r#"
default = "shared"
fair_share_half_life = "1d"

[[queue]]
name = "team-a"
gpus = 32
max_run_time = "24h"
users = ["alice", "bob"]
borrow = false
gpus_by_label = { "gpu=h100" = 16 }

[[queue]]
name = "shared"
users = ["*"]
"#;

    #[test]
    fn a_queue_file_declares_quotas_users_and_the_default() {
        let queues = Queues::parse(FILE).unwrap();
        let a = queues.of(Some("team-a")).unwrap();
        assert_eq!(a.gpu_quota, Some(32));
        let h100 = LabelQuota { key: "gpu".into(), value: "h100".into(), gpus: 16 };
        assert_eq!(a.label_quotas, [h100]);
        assert_eq!(a.max_run_time, Some(Duration::from_secs(24 * 3600)));
        assert!(a.admits("alice") && !a.admits("carol"));
        assert!(!a.borrow);
        let shared = queues.of(None).unwrap();
        assert_eq!(shared.name, "shared");
        assert!(shared.admits("carol") && shared.borrow && shared.gpu_quota.is_none());
        assert_eq!(queues.half_life, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn submit_to_an_unknown_or_forbidden_queue_names_queue_and_the_allowed_ones() {
        let queues = Queues::parse(FILE).unwrap();
        let e = queues.admit("j", Some("team-b"), 1, None, Some("carol")).unwrap_err().to_string();
        assert!(e.contains("queue: \"team-b\"") && e.ends_with("queues you may use: shared"), "{e}");
        let e = queues.admit("j", Some("team-a"), 1, None, Some("carol")).unwrap_err().to_string();
        assert!(e.contains("queue: team-a does not admit jobs of carol") && e.ends_with("shared"), "{e}");
        assert_eq!(queues.admit("j", Some("team-a"), 1, None, Some("alice")).unwrap().name, "team-a");
        assert_eq!(queues.admit("j", Some("team-a"), 1, None, None).unwrap().name, "team-a", "admins use any queue");
        let long = Some(Duration::from_secs(48 * 3600));
        let e = queues.admit("j", Some("team-a"), 1, long, Some("bob")).unwrap_err().to_string();
        assert!(e.contains("time_limit 2days is longer than queue team-a's max_run_time 1day"), "{e}");
        let e = queues.admit("j", Some("team-a"), 33, None, Some("bob")).unwrap_err().to_string();
        assert!(e.contains("needs 33 GPU(s), more than queue team-a's quota of 32"), "{e}");
        assert!(queues.admit("j", Some("team-a"), 32, None, Some("bob")).is_ok());
    }

    #[test]
    fn without_a_file_one_open_queue_has_no_quota_and_no_limit() {
        let queues = Queues::default();
        let q = queues.admit("j", None, 1000, None, Some("anyone")).unwrap();
        assert_eq!((q.name.as_str(), q.gpu_quota, q.max_run_time), (IMPLICIT_QUEUE, None, None));
        assert!(queues.admit("j", Some("team-a"), 1, None, None).is_err());
    }

    #[test]
    fn fair_share_accrues_gpu_seconds_and_halves_every_half_life() {
        let mut share = FairShare::default();
        let hour = Duration::from_secs(3600);
        share.accrue(0, hour, [("alice".to_string(), 8)]);
        share.accrue(1000, hour, [("alice".to_string(), 8)]);
        assert_eq!(share.usage("alice"), 8.0);
        assert_eq!(share.usage("bob"), 0.0);
        share.accrue(1000 + 3_600_000, hour, []);
        assert!((share.usage("alice") - 4.0).abs() < 1e-9, "{}", share.usage("alice"));
    }

    #[test]
    fn the_example_queue_file_parses() {
        let example = Queues::parse(include_str!("../../deploy/config/queues.toml")).unwrap();
        assert_eq!(example.of(None).unwrap().name, "shared");
        assert_eq!(example.all().len(), 2);
    }

    #[test]
    fn a_bad_queue_file_is_refused_naming_the_key() {
        let e = Queues::parse("[[queue]]\nname = \"a\"\ngpus = \"x\"\n").unwrap_err();
        assert!(e.contains("gpus"), "{e}");
        let e = Queues::parse("default = \"b\"\n[[queue]]\nname = \"a\"\n").unwrap_err();
        assert!(e.contains("default: \"b\" is not a declared queue (a)"), "{e}");
        let e = Queues::parse("[[queue]]\nname = \"a\"\nmax_run_time = \"soon\"\n").unwrap_err();
        assert!(e.starts_with("queue[0].max_run_time"), "{e}");
        let e = Queues::parse("[[queue]]\nname = \"a\"\n[[queue]]\nname = \"a\"\n").unwrap_err();
        assert!(e.contains("declared twice"), "{e}");
        let e = Queues::parse("[[queue]]\nname = \"a\"\ngpus_by_label = { h100 = 1 }\n").unwrap_err();
        assert!(e.contains("queue[0].gpus_by_label: \"h100\" is not a node label KEY=VALUE"), "{e}");
        assert!(Queues::parse("").unwrap_err().contains("declares no queue"));
    }
}
