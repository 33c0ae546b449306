//! Queues: who may submit where, how many GPUs a queue's running jobs may
//! hold (its quota), and how long its jobs may run.
//!
//! Declared in a TOML file the controller reads at start (`--queues FILE`,
//! or `queues = "FILE"` in controller.toml):
//!
//! ```toml
//! default = "shared"            # the queue of jobs without `queue:`
//! fair_share_half_life = "7d"   # how fast past GPU use is forgiven
//! preempt_exempt_time = "10m"   # a gang runs this long before it may be preempted (Slurm's PreemptExemptTime)
//! preempt_for_fair_share = true # a borrower whose queue used less than its weight's share may preempt
//!                               # borrowers of queues that used more
//!
//! [[queue]]
//! name = "team-a"
//! gpus = 32                     # quota; leave out for none
//! max_run_time = "24h"          # the time limit of jobs without one
//! weight = 2                    # its fair share of the cluster, against the others' weights
//! users = ["alice", "bob"]      # leave out for everyone
//! borrow = true                 # may run on idle GPUs beyond its quota
//! gpus_by_label = { "gpu=h100" = 16 }  # at most 16 GPUs on nodes labelled gpu=h100
//! reclaim = true                # may its jobs preempt borrowers to get its quota back
//! preempt_lower_priority = false  # may its jobs preempt its own lower-priority jobs
//! ```
//!
//! Without a file there is one implicit queue, `default`, with no quota: the
//! cluster schedules as it did before queues existed.

use std::collections::{BTreeMap, BTreeSet};
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
#[derive(Debug, Clone, PartialEq)]
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
    /// Its weight in the fair share of the whole cluster (> 0).
    pub weight: f64,
    /// Whether a job of it within its quota that does not fit may preempt borrowers of its lent GPUs.
    pub reclaim: bool,
    /// Whether a job of it that does not fit may preempt the queue's own jobs of lower priority.
    pub preempt_lower_priority: bool,
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
#[derive(Debug, Clone, PartialEq)]
pub struct Queues {
    queues: Vec<Queue>,
    default: String,
    /// Half-life of the usage fair share orders users by.
    pub half_life: Duration,
    /// How long a gang runs before it may be preempted (0: at once).
    pub preempt_exempt_time: Duration,
    /// Whether a job borrowing beyond its queue's quota may preempt the gangs
    /// other queues run beyond theirs, where those queues used more of the
    /// cluster than their weight's share ([`Queues::fair_share_victims`]).
    pub preempt_for_fair_share: bool,
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
    preempt_exempt_time: Option<String>,
    #[serde(default)]
    preempt_for_fair_share: bool,
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
    weight: Option<f64>,
    #[serde(default = "reclaim_default")]
    reclaim: bool,
    #[serde(default)]
    preempt_lower_priority: bool,
}

fn reclaim_default() -> bool {
    true
}

fn borrow_default() -> bool {
    true
}

/// The weight of a queue that names none.
pub const DEFAULT_WEIGHT: f64 = 1.0;

/// A weight, or why it is not one (`field` names where it came from).
fn check_weight(field: &str, weight: Option<f64>) -> Result<f64, String> {
    match weight {
        None => Ok(DEFAULT_WEIGHT),
        Some(w) if w.is_finite() && w > 0.0 && w <= 1e6 => Ok(w),
        Some(w) => Err(format!("{field}: {w} is not a weight: give a number above 0 (at most 1e6), e.g. 2")),
    }
}

/// Label quotas from `KEY=VALUE` → GPUs, or the error naming `field`.
fn label_quotas(field: &str, by_label: impl IntoIterator<Item = (String, u32)>) -> Result<Vec<LabelQuota>, String> {
    let mut quotas = Vec::new();
    for (label, gpus) in by_label {
        let Some((key, value)) = label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(format!("{field}: {label:?} is not a node label KEY=VALUE, e.g. \"gpu=h100\""));
        };
        quotas.push(LabelQuota { key: key.into(), value: value.into(), gpus });
    }
    Ok(quotas)
}

fn check_name(field: &str, name: &str) -> Result<(), String> {
    if cohort_shared::spec::is_queue_name(name) {
        return Ok(());
    }
    Err(format!("{field}: {name:?} is not a queue name: use letters, digits, `-` and `_`"))
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
                weight: DEFAULT_WEIGHT,
                reclaim: true,
                preempt_lower_priority: false,
            }],
            default: IMPLICIT_QUEUE.into(),
            half_life: DEFAULT_HALF_LIFE,
            preempt_exempt_time: Duration::ZERO,
            preempt_for_fair_share: false,
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
            check_name(&format!("queue[{i}].name"), &entry.name)?;
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
            queues.push(Queue {
                name: entry.name,
                gpu_quota: entry.gpus,
                label_quotas: label_quotas(&format!("queue[{i}].gpus_by_label"), entry.gpus_by_label)?,
                max_run_time,
                users,
                borrow: entry.borrow,
                weight: check_weight(&format!("queue[{i}].weight"), entry.weight)?,
                reclaim: entry.reclaim,
                preempt_lower_priority: entry.preempt_lower_priority,
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
        let preempt_exempt_time = match file.preempt_exempt_time {
            Some(text) => duration("preempt_exempt_time".into(), &text)?,
            None => Duration::ZERO,
        };
        Ok(Queues {
            queues,
            default,
            half_life,
            preempt_exempt_time,
            preempt_for_fair_share: file.preempt_for_fair_share,
        })
    }

    /// Whether a gang that started (every rank running) at `started_unix_ms`
    /// may be preempted at `now_unix_ms`: it has run `preempt_exempt_time`.
    pub fn preemptible(&self, started_unix_ms: i64, now_unix_ms: i64) -> bool {
        let exempt = i64::try_from(self.preempt_exempt_time.as_millis()).unwrap_or(i64::MAX);
        now_unix_ms.saturating_sub(started_unix_ms) >= exempt
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

    /// The queue of a job of `submitter` that names none, where it is not the
    /// default queue: when the default queue does not admit them, the first
    /// declared queue whose `users` lists them (a team member's jobs go to the
    /// team's queue). None: the default queue.
    fn default_of(&self, submitter: &str) -> Option<&str> {
        let default = self.of(None)?;
        if default.admits(submitter) {
            return None;
        }
        let listed = |q: &&Queue| q.users.as_ref().is_some_and(|u| u.contains(submitter));
        self.queues.iter().find(listed).map(|q| q.name.as_str())
    }

    /// The queue a job of `job` may be submitted to by `submitter` (None: an
    /// admin or `--insecure`, who may use any queue; a job that names no queue
    /// goes to the default one, or to the submitter's own, see `default_of`), with a time limit that
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
        let Some(queue) = self.of(named.or_else(|| submitter.and_then(|s| self.default_of(s)))) else {
            return Err(QueueRefusal::Invalid(format!(
                "job {job}: queue: {:?} is not a queue of this cluster; queues you may use: {allowed_names}",
                named.unwrap_or_default()
            )));
        };
        if !allowed.iter().any(|q| q.name == queue.name) {
            let what = if named.is_some() { "queue:" } else { "the default queue" };
            let user = submitter.unwrap_or_default();
            let fix = if allowed.is_empty() {
                format!("no queue admits {user}: ask an admin to add {user} to a queue's users (cohort queue set)")
            } else {
                format!("name one you may use with `queue:`: {allowed_names}")
            };
            return Err(QueueRefusal::Forbidden(format!(
                "job {job}: {what} {} does not admit jobs of {user}; {fix}",
                queue.name
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

impl Queues {
    /// Reclaim grounds for a job of `gpus` GPUs in `queue`, given the GPUs each
    /// queue's gangs hold (`held`): the queue reclaims (`reclaim`, the default),
    /// has a quota and stays within it with the job, and other queues hold GPUs
    /// beyond theirs (a queue without a quota owns none: all it holds is lent).
    /// The GPUs each such queue holds beyond its quota; None: no grounds.
    /// (The controller's `try_preempt` and the scheduling simulator both ask this.)
    pub fn reclaimable(&self, queue: &Queue, gpus: u32, held: impl Fn(&str) -> u32) -> Option<BTreeMap<String, u32>> {
        let quota = queue.gpu_quota.filter(|_| queue.reclaim)?;
        if held(&queue.name) + gpus > quota {
            return None;
        }
        let beyond: BTreeMap<String, u32> = self
            .all()
            .iter()
            .filter(|q| q.name != queue.name)
            .map(|q| (q.name.clone(), held(&q.name).saturating_sub(q.gpu_quota.unwrap_or(0))))
            .filter(|(_, n)| *n > 0)
            .collect();
        (!beyond.is_empty()).then_some(beyond)
    }

    /// Fair-share grounds for a job in `queue` that would hold GPUs beyond
    /// the queue's quota (a borrower), given the GPUs each queue's gangs hold
    /// (`held`) and their decayed use (`usage`, what orders the queues): every
    /// other queue whose decayed GPU use over its weight is above the
    /// borrower's queue's, with the GPUs it holds beyond its quota (only those
    /// may go). A queue that has had less than its weight's share catches up
    /// on GPUs lent to those that had more; one measure for the order and for
    /// preemption, which changes slowly, so two queues do not take the same
    /// GPUs back and forth with every preemption (as comparing the GPUs held
    /// at the moment would). None when `preempt_for_fair_share` is off or no
    /// queue qualifies.
    pub fn fair_share_victims(
        &self,
        queue: &Queue,
        held: impl Fn(&str) -> u32,
        usage: &FairShare,
    ) -> Option<BTreeMap<String, u32>> {
        if !self.preempt_for_fair_share {
            return None;
        }
        let own = usage.queue_rank(queue);
        let victims: BTreeMap<String, u32> = self
            .queues
            .iter()
            .filter(|q| q.name != queue.name && usage.queue_rank(q) > own)
            .map(|q| (q.name.clone(), held(&q.name).saturating_sub(q.gpu_quota.unwrap_or(0))))
            .filter(|(_, beyond)| *beyond > 0)
            .collect();
        (!victims.is_empty()).then_some(victims)
    }

    /// The default queue's name.
    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// These queues with `stored` (the store's, set through the admin API)
    /// in place of the declared ones: the store wins; the default queue is
    /// kept as declared when the store lacks it.
    pub fn with_stored(&self, stored: Vec<Queue>) -> Queues {
        let mut queues = stored;
        if !queues.iter().any(|q| q.name == self.default)
            && let Some(default) = self.of(None)
        {
            queues.push(default.clone());
        }
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        Queues {
            queues,
            default: self.default.clone(),
            half_life: self.half_life,
            preempt_exempt_time: self.preempt_exempt_time,
            preempt_for_fair_share: self.preempt_for_fair_share,
        }
    }

    /// Adds or replaces a queue.
    pub fn set(&mut self, queue: Queue) {
        match self.queues.iter_mut().find(|q| q.name == queue.name) {
            Some(old) => *old = queue,
            None => {
                self.queues.push(queue);
                self.queues.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
    }

    /// Takes a queue out; the default one stays (the error says so).
    pub fn remove(&mut self, name: &str) -> Result<Queue, String> {
        if name == self.default {
            return Err(format!(
                "queue {name} is the default queue (jobs without `queue:` go there): it cannot be deleted; \
                 change `default` in the --queues file first"
            ));
        }
        let i = self
            .queues
            .iter()
            .position(|q| q.name == name)
            .ok_or_else(|| format!("queue {name:?} is not a queue of this cluster ({})", names(&self.queues)))?;
        Ok(self.queues.remove(i))
    }

    /// Each queue's part of the weights: what fair share aims at.
    pub fn target_share(&self, name: &str) -> f64 {
        let total: f64 = self.queues.iter().map(|q| q.weight).sum();
        self.queues.iter().find(|q| q.name == name).map_or(0.0, |q| q.weight / total.max(f64::MIN_POSITIVE))
    }
}

impl Queue {
    /// The wire form ([`cohort_proto::QueueSpec`]): the admin API and the store.
    pub fn to_spec(&self) -> cohort_proto::QueueSpec {
        cohort_proto::QueueSpec {
            name: self.name.clone(),
            gpus: self.gpu_quota,
            weight: self.weight,
            max_run_time_ms: self.max_run_time.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            users: self.users.iter().flatten().cloned().collect(),
            borrow: self.borrow,
            label_quotas: self
                .label_quotas
                .iter()
                .map(|q| cohort_proto::LabelQuotaSpec { label: q.to_string(), gpus: q.gpus })
                .collect(),
            reclaim: Some(self.reclaim),
            preempt_lower_priority: self.preempt_lower_priority,
        }
    }

    /// A queue from its wire form; the error names the field and the fix.
    /// A weight of 0 (unset on the wire) is the default weight.
    pub fn from_spec(spec: &cohort_proto::QueueSpec) -> Result<Queue, String> {
        check_name("name", &spec.name)?;
        if spec.max_run_time_ms < 0 {
            return Err("max_run_time_ms: must be 0 (none) or more".into());
        }
        let weight = (spec.weight != 0.0).then_some(spec.weight);
        Ok(Queue {
            name: spec.name.clone(),
            gpu_quota: spec.gpus,
            label_quotas: label_quotas("label_quotas", spec.label_quotas.iter().map(|q| (q.label.clone(), q.gpus)))?,
            max_run_time: (spec.max_run_time_ms > 0).then(|| Duration::from_millis(spec.max_run_time_ms as u64)),
            users: (!spec.users.is_empty() && !spec.users.iter().any(|u| u == "*"))
                .then(|| spec.users.iter().cloned().collect()),
            borrow: spec.borrow,
            weight: check_weight("weight", weight)?,
            reclaim: spec.reclaim.unwrap_or(true),
            preempt_lower_priority: spec.preempt_lower_priority,
        })
    }

    /// Whether `user` may submit here.
    pub fn admits(&self, user: &str) -> bool {
        self.users.as_ref().is_none_or(|u| u.contains(user))
    }

    /// The time limit one attempt of a job in this queue runs under.
    pub fn time_limit(&self, own: Option<Duration>) -> Option<Duration> {
        own.or(self.max_run_time)
    }
}

/// Each submitter's and each queue's GPU-seconds, decayed by half every
/// half-life (Slurm's classic fair share): across queues, the queue furthest
/// below its weighted share goes first; within a queue and a priority, the
/// job of the user who used least. Stored ([`FairShare::to_record`]) so that
/// a controller that restarts or takes over goes on from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FairShare {
    // Ordered maps: sums over them (`total_queue_usage`) come out the same in
    // every controller and every replay, which a hash map's order does not give.
    usage: std::collections::BTreeMap<String, f64>,
    queues: std::collections::BTreeMap<String, f64>,
    at_unix_ms: Option<i64>,
}

impl FairShare {
    /// Decays what was used and adds what each (user, queue, GPUs held) used since the last call.
    pub fn accrue(
        &mut self,
        now_unix_ms: i64,
        half_life: Duration,
        holding: impl IntoIterator<Item = (String, String, u32)>,
    ) {
        let Some(last) = self.at_unix_ms.replace(now_unix_ms) else { return };
        let seconds = (now_unix_ms - last).max(0) as f64 / 1000.0;
        let decay = 0.5f64.powf(seconds / half_life.as_secs_f64().max(1.0));
        for used in self.usage.values_mut().chain(self.queues.values_mut()) {
            *used *= decay;
        }
        for (user, queue, gpus) in holding {
            *self.usage.entry(user).or_default() += f64::from(gpus) * seconds;
            *self.queues.entry(queue).or_default() += f64::from(gpus) * seconds;
        }
        self.usage.retain(|_, used| *used > 1e-3);
        self.queues.retain(|_, used| *used > 1e-3);
    }

    /// `user`'s decayed GPU-seconds.
    pub fn usage(&self, user: &str) -> f64 {
        self.usage.get(user).copied().unwrap_or(0.0)
    }

    /// `queue`'s decayed GPU-seconds.
    pub fn queue_usage(&self, queue: &str) -> f64 {
        self.queues.get(queue).copied().unwrap_or(0.0)
    }

    /// Every queue's decayed GPU-seconds together.
    pub fn total_queue_usage(&self) -> f64 {
        self.queues.values().sum()
    }

    /// How far `queue` is over its weighted share: its usage over its weight
    /// (the lowest goes first; equal weights compare plain usage).
    pub fn queue_rank(&self, queue: &Queue) -> f64 {
        self.queue_usage(&queue.name) / queue.weight.max(f64::MIN_POSITIVE)
    }

    /// The stored form.
    pub fn to_record(&self) -> cohort_proto::FairShareRecord {
        cohort_proto::FairShareRecord {
            users: self.usage.clone().into_iter().collect(),
            queues: self.queues.clone().into_iter().collect(),
            at_unix_ms: self.at_unix_ms.unwrap_or(0),
        }
    }

    /// From the stored form; values that are not finite non-negative numbers are dropped.
    pub fn from_record(record: cohort_proto::FairShareRecord) -> FairShare {
        let keep = |m: std::collections::HashMap<String, f64>| -> std::collections::BTreeMap<String, f64> {
            m.into_iter().filter(|(_, v)| v.is_finite() && *v >= 0.0).collect()
        };
        FairShare {
            usage: keep(record.users),
            queues: keep(record.queues),
            at_unix_ms: (record.at_unix_ms > 0).then_some(record.at_unix_ms),
        }
    }
}

/// Where a pending job stands in the order ([`OrderKey::order`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrderKey {
    /// Its queue's [`FairShare::queue_rank`]: usage over weight.
    pub queue_rank: f64,
    pub priority: i32,
    /// Its submitter's decayed GPU-seconds.
    pub user_usage: f64,
    /// Submission order.
    pub seq: u64,
}

impl OrderKey {
    /// Across queues, the one furthest below its weighted share first; then
    /// higher priority, then the submitter who used least, then submission.
    pub fn order(&self, other: &OrderKey) -> std::cmp::Ordering {
        self.queue_rank
            .total_cmp(&other.queue_rank)
            .then(other.priority.cmp(&self.priority))
            .then(self.user_usage.total_cmp(&other.user_usage))
            .then(self.seq.cmp(&other.seq))
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

/// How the controller orders and places pending jobs (`--scheduler`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduler {
    /// Queues with quotas and borrowing, fair share, EASY backfill with reservations.
    #[default]
    Backfill,
    /// The order before queues: one line by priority then submission, no
    /// quotas, no fair share, no backfill (the first job that does not fit
    /// holds up every job behind it). A baseline for `cohort-sim`.
    Fifo,
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
    use prost::Message as _;

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
    fn the_preempt_exempt_time_bounds_who_may_be_preempted() {
        let queues = Queues::parse("preempt_exempt_time = \"10m\"\n[[queue]]\nname = \"a\"\n").unwrap();
        let start = 1_000_000;
        assert!(!queues.preemptible(start, start + 599_999));
        assert!(queues.preemptible(start, start + 600_000));
        assert!(Queues::default().preemptible(start, start), "none by default");
        let err = Queues::parse("preempt_exempt_time = \"soon\"\n[[queue]]\nname = \"a\"\n").unwrap_err();
        assert!(err.contains("preempt_exempt_time"), "{err}");
    }

    #[test]
    fn fair_share_victims_are_what_queues_that_used_more_than_their_share_borrowed() {
        let file = "preempt_for_fair_share = true\n\
                    [[queue]]\nname = \"a\"\ngpus = 10\nweight = 1\n\
                    [[queue]]\nname = \"b\"\ngpus = 10\nweight = 1\n\
                    [[queue]]\nname = \"c\"\ngpus = 20\nweight = 2\n\
                    [[queue]]\nname = \"d\"\n\
                    [[queue]]\nname = \"e\"\ngpus = 10\n";
        let queues = Queues::parse(file).unwrap();
        let held = |name: &str| match name {
            "a" => 12,
            "b" => 30,
            "c" => 34,
            "d" => 3,
            "e" => 10,
            _ => 0,
        };
        let past = |usage: &[(&str, f64)]| {
            FairShare::from_record(cohort_proto::FairShareRecord {
                queues: usage.iter().map(|(q, u)| (q.to_string(), *u)).collect(),
                ..Default::default()
            })
        };
        // Decayed GPU-seconds over weight: a 100, b 90, c 110 (220 over weight 2), d 500, e 900.
        let usage = past(&[("a", 100.0), ("b", 90.0), ("c", 220.0), ("d", 500.0), ("e", 900.0)]);
        let a = queues.of(Some("a")).unwrap();
        // c and d used more than a: what they hold beyond their quotas (d has none: all of its 3
        // are lent); b used less; e used more but holds only its quota.
        let victims = queues.fair_share_victims(a, held, &usage).unwrap();
        assert_eq!(victims, [("c".to_string(), 14), ("d".to_string(), 3)].into());
        let b = queues.of(Some("b")).unwrap();
        let victims = queues.fair_share_victims(b, held, &usage).unwrap();
        assert_eq!(victims, [("a".to_string(), 2), ("c".to_string(), 14), ("d".to_string(), 3)].into());
        // The most used: none.
        assert_eq!(queues.fair_share_victims(queues.of(Some("e")).unwrap(), held, &usage), None);
        // Off unless the file says so.
        let off = Queues::parse(&file.replace("preempt_for_fair_share = true", "")).unwrap();
        assert!(!off.preempt_for_fair_share);
        assert_eq!(off.fair_share_victims(off.of(Some("a")).unwrap(), held, &usage), None);
        let err = Queues::parse(&file.replace("true", "\"yes\"")).unwrap_err();
        assert!(err.contains("preempt_for_fair_share"), "{err}");
    }

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
    fn a_job_naming_no_queue_goes_to_the_default_or_to_the_first_queue_that_lists_its_submitter() {
        let file = "default = \"shared\"\n\
                    [[queue]]\nname = \"team-a\"\nusers = [\"alice\", \"bob\"]\n\
                    [[queue]]\nname = \"team-b\"\nusers = [\"bob\", \"carol\"]\n\
                    [[queue]]\nname = \"shared\"\nusers = [\"alice\", \"dan\"]\n";
        let queues = Queues::parse(file).unwrap();
        let default_for = |user: &str| queues.admit("j", None, 1, None, Some(user)).map(|q| q.name.clone());
        assert_eq!(default_for("alice").unwrap(), "shared", "the default queue admits alice");
        assert_eq!(default_for("bob").unwrap(), "team-a", "the first queue listing bob");
        assert_eq!(default_for("carol").unwrap(), "team-b");
        let e = default_for("erin").unwrap_err().to_string();
        assert!(e.contains("the default queue shared does not admit jobs of erin"), "{e}");
        assert!(
            e.ends_with("no queue admits erin: ask an admin to add erin to a queue's users (cohort queue set)"),
            "{e}"
        );
        // Admins (no submitter) get the default queue.
        assert_eq!(queues.admit("j", None, 1, None, None).unwrap().name, "shared");
        // A named queue is never replaced.
        let e = queues.admit("j", Some("shared"), 1, None, Some("bob")).unwrap_err().to_string();
        assert!(e.contains("queue: shared does not admit jobs of bob"), "{e}");
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
        let alice = || ("alice".to_string(), "team-a".to_string(), 8);
        share.accrue(0, hour, [alice()]);
        share.accrue(1000, hour, [alice()]);
        assert_eq!(share.usage("alice"), 8.0);
        assert_eq!(share.queue_usage("team-a"), 8.0);
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

    #[test]
    fn a_weight_is_read_checked_and_defaults_to_one() {
        let queues = Queues::parse("[[queue]]\nname = \"a\"\nweight = 3\n[[queue]]\nname = \"b\"\n").unwrap();
        assert_eq!(queues.of(Some("a")).unwrap().weight, 3.0);
        assert_eq!(queues.of(Some("b")).unwrap().weight, 1.0);
        assert!((queues.target_share("a") - 0.75).abs() < 1e-12);
        let e = Queues::parse("[[queue]]\nname = \"a\"\nweight = 0\n").unwrap_err();
        assert!(e.starts_with("queue[0].weight: 0 is not a weight"), "{e}");
        let e = Queues::parse("[[queue]]\nname = \"a\"\nweight = -1.5\n").unwrap_err();
        assert!(e.contains("give a number above 0"), "{e}");
    }

    #[test]
    fn a_queue_goes_to_its_wire_form_and_back_and_bad_specs_name_the_field() {
        let queues = Queues::parse(FILE).unwrap();
        for queue in queues.all() {
            assert_eq!(&Queue::from_spec(&queue.to_spec()).unwrap(), queue);
        }
        let mut spec = queues.of(Some("team-a")).unwrap().to_spec();
        spec.name = "no spaces".into();
        assert!(Queue::from_spec(&spec).unwrap_err().starts_with("name: \"no spaces\""));
        spec.name = "ok".into();
        spec.weight = f64::NAN;
        assert!(Queue::from_spec(&spec).unwrap_err().starts_with("weight:"));
        spec.weight = 0.0;
        assert_eq!(Queue::from_spec(&spec).unwrap().weight, DEFAULT_WEIGHT, "unset on the wire");
        spec.label_quotas[0].label = "h100".into();
        assert!(Queue::from_spec(&spec).unwrap_err().starts_with("label_quotas: \"h100\""));
    }

    #[test]
    fn stored_queues_win_over_declared_ones_and_the_default_stays() {
        let declared = Queues::parse(FILE).unwrap();
        let mut a = declared.of(Some("team-a")).unwrap().clone();
        a.gpu_quota = Some(4);
        let mut queues = declared.with_stored(vec![a]);
        assert_eq!(queues.of(Some("team-a")).unwrap().gpu_quota, Some(4));
        assert_eq!(queues.of(None).unwrap().name, "shared", "the default is kept though the store lacks it");
        assert!(queues.remove("shared").unwrap_err().contains("is the default queue"));
        assert!(
            queues.remove("nope").unwrap_err().contains("\"nope\" is not a queue of this cluster (shared, team-a)")
        );
        assert_eq!(queues.remove("team-a").unwrap().name, "team-a");
        assert!(queues.of(Some("team-a")).is_none());
    }

    #[test]
    fn fair_share_survives_its_stored_form() {
        let mut share = FairShare::default();
        let day = Duration::from_secs(86_400);
        share.accrue(1_000, day, [("alice".into(), "a".into(), 2)]);
        share.accrue(61_000, day, [("alice".into(), "a".into(), 2), ("bob".into(), "b".into(), 1)]);
        let record = share.to_record();
        let back = FairShare::from_record(
            cohort_proto::FairShareRecord::decode(prost::Message::encode_to_vec(&record).as_slice()).unwrap(),
        );
        assert_eq!(back, share);
        assert!(back.queue_usage("a") > 119.0 && back.usage("bob") > 59.0, "{back:?}");
    }

    #[test]
    fn the_queue_below_its_weighted_share_goes_first_then_priority() {
        let key = |queue_rank, priority, seq| OrderKey { queue_rank, priority, user_usage: 0.0, seq };
        let mut keys = [key(2.0, 10, 1), key(1.0, 0, 2), key(1.0, 5, 3), key(1.0, 5, 0)];
        keys.sort_by(OrderKey::order);
        assert_eq!(keys.map(|k| k.seq), [0, 3, 2, 1]);
        let heavy = Queue { weight: 4.0, ..Queues::default().all()[0].clone() };
        let light = Queue { name: "light".into(), weight: 1.0, ..heavy.clone() };
        let mut share = FairShare::default();
        let hour = Duration::from_secs(3600);
        share.accrue(0, hour, []);
        share.accrue(1000, hour, [("u".into(), heavy.name.clone(), 3), ("u".into(), "light".into(), 1)]);
        assert!(share.queue_rank(&heavy) < share.queue_rank(&light), "3 GPU-s over weight 4 is below 1 over 1");
    }

    /// A cluster of `gpus` GPUs, every queue with an endless backlog of
    /// one-GPU jobs of 1 to 10 minutes, one scheduling pass a minute in the
    /// order [`OrderKey`] gives: each queue's part of the GPU time over the
    /// second half of `minutes` as against its weight's part.
    fn simulate(weights: &[f64], gpus: u32, half_life_min: u64, durations: &[u64], minutes: u64) -> Vec<f64> {
        let queues: Vec<Queue> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Queue { name: format!("q{i}"), weight: *w, ..Queues::default().all()[0].clone() })
            .collect();
        let half_life = Duration::from_secs(half_life_min * 60);
        let mut share = FairShare::default();
        let mut running: Vec<(usize, u64)> = Vec::new();
        let mut got = vec![0.0; queues.len()];
        let mut next_duration = durations.iter().cycle();
        for t in 0..minutes {
            // The minute that ends now was held by the jobs running through it.
            let holding = running.iter().map(|(q, _)| ("u".to_string(), queues[*q].name.clone(), 1));
            share.accrue((t * 60_000) as i64, half_life, holding);
            running.retain(|(_, end)| *end > t);
            let mut order: Vec<(OrderKey, usize)> = (0..queues.len())
                .map(|q| {
                    (
                        OrderKey {
                            queue_rank: share.queue_rank(&queues[q]),
                            priority: 0,
                            user_usage: 0.0,
                            seq: q as u64,
                        },
                        q,
                    )
                })
                .collect();
            order.sort_by(|a, b| a.0.order(&b.0));
            // A pass goes down the order: the first queue's backlog takes every free GPU.
            let free = gpus as usize - running.len();
            let first = order[0].1;
            for _ in 0..free {
                running.push((first, t + next_duration.next().copied().unwrap_or(1)));
            }
            // The GPUs held during minute t, by the jobs that run on past it.
            if t >= minutes / 2 {
                for (q, _) in &running {
                    got[*q] += 1.0;
                }
            }
        }
        let total: f64 = got.iter().sum();
        got.iter().map(|g| g / total).collect()
    }

    /// Prints the share error of one fixed contention (weights 1:2:3:4 on 32
    /// GPUs, a 2-hour half-life, jobs of 1 to 10 minutes, 50 simulated hours):
    /// `cargo test -p cohort-controller --lib fair_share_figures -- --nocapture`.
    #[test]
    fn fair_share_figures() {
        let weights = [1.0, 2.0, 3.0, 4.0];
        let durations: Vec<u64> = (0..97).map(|i| 1 + (i * 7) % 10).collect();
        let shares = simulate(&weights, 32, 120, &durations, 3000);
        let error = shares.iter().zip(&weights).map(|(s, w)| (s - w / 10.0).abs()).fold(0.0, f64::max);
        eprintln!(
            "figures: weights {weights:?} got shares {shares:.4?}; the largest share error is {:.2} %",
            error * 100.0
        );
        assert!(error < 0.05, "{shares:?}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Fair share converges: with queues contending for the whole
        /// cluster, each one's long-run share of GPU time comes within 5 % of
        /// its weight's share.
        #[test]
        fn contending_queues_get_shares_that_approach_their_weights(
            weights in proptest::collection::vec(1u32..=4, 2..=4),
            gpus in 4u32..=32,
            half_life_min in proptest::sample::select(vec![60u64, 120, 240]),
            durations in proptest::collection::vec(1u64..=10, 1..=16),
        ) {
            let weights: Vec<f64> = weights.into_iter().map(f64::from).collect();
            let total: f64 = weights.iter().sum();
            let shares = simulate(&weights, gpus, half_life_min, &durations, 3000);
            for (share, weight) in shares.iter().zip(&weights) {
                proptest::prop_assert!((share - weight / total).abs() < 0.05, "shares {shares:?} against weights {weights:?}");
            }
        }
    }
}
