//! `/metrics`: the cluster in Prometheus/OpenMetrics text, built fresh from the
//! controller's nodes and jobs on each scrape (a few hundred series at most).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use cohort_proto::{GpuHealthState, GpuTelemetry, Job, JobState, Node, NodeState, QueueStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Value = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    node: String,
    gpu: String,
    uuid: String,
    /// The job holding this GPU; empty when idle.
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuHealthLabels {
    node: String,
    gpu: String,
    uuid: String,
    job: String,
    health: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EccLabels {
    node: String,
    gpu: String,
    uuid: String,
    job: String,
    /// "volatile" (since the driver loaded) or "aggregate" (lifetime).
    scope: String,
    /// "corrected" or "uncorrected".
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuKindLabels {
    node: String,
    gpu: String,
    uuid: String,
    job: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
    name: String,
}

const NODE_STATES: [NodeState; 4] = [NodeState::Ready, NodeState::Suspect, NodeState::Lost, NodeState::Disconnected];
const JOB_STATES: [JobState; 8] = [
    JobState::Pending,
    JobState::Preparing,
    JobState::Starting,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Restarting,
];

pub fn node_state_label(state: i32) -> &'static str {
    match NodeState::try_from(state).unwrap_or(NodeState::Unspecified) {
        NodeState::Ready => "ready",
        NodeState::Suspect => "suspect",
        NodeState::Lost => "lost",
        NodeState::Disconnected => "disconnected",
        NodeState::Unspecified => "unknown",
    }
}

fn job_state_label(state: i32) -> String {
    crate::controller::state_name(state).to_ascii_lowercase()
}

fn health_label(t: Option<&GpuTelemetry>) -> &'static str {
    let state = t.and_then(|t| t.health.as_ref()).map(|h| h.state).unwrap_or_default();
    match GpuHealthState::try_from(state).unwrap_or(GpuHealthState::Unspecified) {
        GpuHealthState::Healthy => "healthy",
        GpuHealthState::Warning => "warning",
        GpuHealthState::Unhealthy => "unhealthy",
        GpuHealthState::Unspecified => "unknown",
    }
}

/// (node, GPU index) -> the jobs holding it, from each node's jobs and their plans.
fn gpu_owners(nodes: &[Node], jobs: &[Job]) -> BTreeMap<(String, u32), String> {
    let by_id: BTreeMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    let mut owners: BTreeMap<(String, u32), String> = BTreeMap::new();
    for node in nodes {
        let name = node.info.as_ref().map(|i| i.name.as_str()).unwrap_or_default();
        for id in &node.jobs {
            let Some(job) = by_id.get(id.as_str()) else { continue };
            let assigned = job.plan.iter().flat_map(|p| &p.nodes).filter(|a| a.node_name == name);
            for index in assigned.flat_map(|a| &a.gpu_indices).filter(|i| node.allocated_gpus.contains(i)) {
                let owner = owners.entry((name.to_string(), *index)).or_default();
                if !owner.is_empty() {
                    owner.push(',');
                }
                owner.push_str(id);
            }
        }
    }
    owners
}

/// Registers a gauge family and returns it for filling.
fn family<L>(registry: &mut Registry, name: &str, help: &str) -> Family<L, Value>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Value>::default();
    registry.register(name, help, family.clone());
    family
}

fn set<L>(family: &Family<L, Value>, labels: &L, value: Option<f64>)
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq,
{
    if let Some(value) = value {
        family.get_or_create(labels).set(value);
    }
}

struct GpuGauges {
    utilization: Family<GpuLabels, Value>,
    memory_utilization: Family<GpuLabels, Value>,
    memory_used: Family<GpuLabels, Value>,
    memory_total: Family<GpuLabels, Value>,
    temperature: Family<GpuLabels, Value>,
    power: Family<GpuLabels, Value>,
    power_limit: Family<GpuLabels, Value>,
    sm_clock: Family<GpuLabels, Value>,
    ecc: Family<EccLabels, Value>,
    retired_pages: Family<GpuKindLabels, Value>,
    remapped_rows: Family<GpuKindLabels, Value>,
    health: Family<GpuHealthLabels, Value>,
}

impl GpuGauges {
    fn register(r: &mut Registry) -> Self {
        Self {
            utilization: family(r, "gpu_utilization_percent", "GPU (SM) utilization over the last sample period"),
            memory_utilization: family(r, "gpu_memory_utilization_percent", "GPU memory-controller utilization"),
            memory_used: family(r, "gpu_memory_used_bytes", "GPU memory in use"),
            memory_total: family(r, "gpu_memory_total_bytes", "GPU memory in all"),
            temperature: family(r, "gpu_temperature_celsius", "GPU core temperature"),
            power: family(r, "gpu_power_watts", "GPU power draw"),
            power_limit: family(r, "gpu_power_limit_watts", "GPU power limit"),
            sm_clock: family(r, "gpu_sm_clock_hertz", "GPU SM clock"),
            ecc: family(r, "gpu_ecc_errors", "ECC error counts by scope (volatile, aggregate) and kind"),
            retired_pages: family(r, "gpu_retired_pages", "Retired memory pages by cause (single_bit, double_bit)"),
            remapped_rows: family(r, "gpu_remapped_rows", "Remapped memory rows (correctable, uncorrectable)"),
            health: family(r, "gpu_health", "1 for the GPU's current health (healthy, warning, unhealthy, unknown)"),
        }
    }

    fn record(&self, labels: GpuLabels, t: &GpuTelemetry) {
        let f = |v: Option<u32>| v.map(f64::from);
        let b = |v: Option<u64>| v.map(|v| v as f64);
        set(&self.utilization, &labels, f(t.utilization_gpu_pct));
        set(&self.memory_utilization, &labels, f(t.utilization_memory_pct));
        set(&self.memory_used, &labels, b(t.memory_used_bytes));
        set(&self.memory_total, &labels, b(t.memory_total_bytes));
        set(&self.temperature, &labels, f(t.temperature_c));
        set(&self.power, &labels, t.power_w);
        set(&self.power_limit, &labels, t.power_limit_w);
        set(&self.sm_clock, &labels, f(t.sm_clock_mhz).map(|mhz| mhz * 1e6));
        let ecc = |scope: &str, kind: &str| EccLabels {
            node: labels.node.clone(),
            gpu: labels.gpu.clone(),
            uuid: labels.uuid.clone(),
            job: labels.job.clone(),
            scope: scope.into(),
            kind: kind.into(),
        };
        set(&self.ecc, &ecc("volatile", "corrected"), b(t.ecc_volatile_corrected));
        set(&self.ecc, &ecc("volatile", "uncorrected"), b(t.ecc_volatile_uncorrected));
        set(&self.ecc, &ecc("aggregate", "corrected"), b(t.ecc_aggregate_corrected));
        set(&self.ecc, &ecc("aggregate", "uncorrected"), b(t.ecc_aggregate_uncorrected));
        let kind = |kind: &str| GpuKindLabels {
            node: labels.node.clone(),
            gpu: labels.gpu.clone(),
            uuid: labels.uuid.clone(),
            job: labels.job.clone(),
            kind: kind.into(),
        };
        set(&self.retired_pages, &kind("single_bit"), f(t.retired_pages_single_bit));
        set(&self.retired_pages, &kind("double_bit"), f(t.retired_pages_double_bit));
        set(&self.remapped_rows, &kind("correctable"), f(t.remapped_rows_correctable));
        set(&self.remapped_rows, &kind("uncorrectable"), f(t.remapped_rows_uncorrectable));
        let health = GpuHealthLabels {
            node: labels.node,
            gpu: labels.gpu,
            uuid: labels.uuid,
            job: labels.job,
            health: health_label(Some(t)).into(),
        };
        self.health.get_or_create(&health).set(1.0);
    }
}

struct JobGauges {
    attempt: Family<JobLabels, Value>,
    iteration: Family<JobLabels, Value>,
    total_iterations: Family<JobLabels, Value>,
    loss: Family<JobLabels, Value>,
    learning_rate: Family<JobLabels, Value>,
    throughput: Family<JobLabels, Value>,
    iteration_seconds: Family<JobLabels, Value>,
}

impl JobGauges {
    fn register(r: &mut Registry) -> Self {
        Self {
            attempt: family(r, "job_attempt", "The job's current attempt (1 for the first)"),
            iteration: family(r, "job_iteration", "The newest training iteration reported by the job's last rank"),
            total_iterations: family(r, "job_total_iterations", "The iterations the job will run"),
            loss: family(r, "job_loss", "Training loss at the newest iteration"),
            learning_rate: family(r, "job_learning_rate", "Learning rate at the newest iteration"),
            throughput: family(r, "job_throughput_tflops", "Training throughput per GPU, TFLOP/s"),
            iteration_seconds: family(r, "job_iteration_seconds", "Seconds per training iteration"),
        }
    }

    fn record(&self, job: &Job) {
        let labels = JobLabels { job: job.id.clone(), name: job.name.clone() };
        set(&self.attempt, &labels, Some(f64::from(job.attempt)));
        let Some(p) = &job.progress else { return };
        set(&self.iteration, &labels, Some(p.iteration as f64));
        set(&self.total_iterations, &labels, p.total_iterations.map(|v| v as f64));
        set(&self.loss, &labels, p.loss);
        set(&self.learning_rate, &labels, p.learning_rate);
        set(&self.throughput, &labels, p.throughput_tflops);
        set(&self.iteration_seconds, &labels, p.iteration_time_s);
    }
}

/// The registry of one scrape. A standby (`leading` false) has no nodes or jobs
/// to report: it exports only `cohort_controller_leader 0`.
pub fn registry(controller_id: &str, leading: bool, nodes: &[Node], jobs: &[Job], queues: &[QueueStatus]) -> Registry {
    let mut r = Registry::with_prefix("cohort");
    let leader = family::<ControllerLabels>(&mut r, "controller_leader", "1 while this controller leads");
    leader.get_or_create(&ControllerLabels { controller: controller_id.into() }).set(if leading { 1.0 } else { 0.0 });
    if !leading {
        return r;
    }
    let node_count = family::<StateLabels>(&mut r, "nodes", "Nodes by state");
    let gpu_count = family::<HealthLabels>(&mut r, "gpus", "GPUs by health (unknown: no telemetry yet)");
    let job_count = family::<StateLabels>(&mut r, "jobs", "Jobs by state");
    let gpus = GpuGauges::register(&mut r);
    let job_gauges = JobGauges::register(&mut r);
    let progress = crate::http::progress_metrics::ProgressGauges::register(&mut r);

    // Every state is present, at 0 when empty, so that series do not vanish.
    for state in NODE_STATES {
        node_count.get_or_create(&StateLabels { state: node_state_label(state as i32).into() }).set(0.0);
    }
    for health in ["healthy", "warning", "unhealthy", "unknown"] {
        gpu_count.get_or_create(&HealthLabels { health: health.into() }).set(0.0);
    }
    for state in JOB_STATES {
        job_count.get_or_create(&StateLabels { state: job_state_label(state as i32) }).set(0.0);
    }

    let owners = gpu_owners(nodes, jobs);
    for node in nodes {
        let Some(info) = &node.info else { continue };
        node_count.get_or_create(&StateLabels { state: node_state_label(node.state).into() }).inc();
        // A lost or disconnected node's telemetry is stale: count its GPUs, export no readings.
        let fresh = matches!(NodeState::try_from(node.state), Ok(NodeState::Ready | NodeState::Suspect));
        for gpu in &info.gpus {
            let t = node.telemetry.iter().find(|t| t.index == gpu.index);
            gpu_count.get_or_create(&HealthLabels { health: health_label(t).into() }).inc();
            let Some(t) = t.filter(|_| fresh) else { continue };
            let labels = GpuLabels {
                node: info.name.clone(),
                gpu: gpu.index.to_string(),
                uuid: if t.uuid.is_empty() { gpu.uuid.clone() } else { t.uuid.clone() },
                job: owners.get(&(info.name.clone(), gpu.index)).cloned().unwrap_or_default(),
            };
            gpus.record(labels, t);
        }
    }
    for job in jobs {
        job_count.get_or_create(&StateLabels { state: job_state_label(job.state) }).inc();
        job_gauges.record(job);
        progress.record(job);
    }
    record_queues(&mut r, queues, jobs);
    r
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

/// Per queue: its quota (absent without one), GPUs used and borrowed, jobs
/// running and pending, and the preemptions of its jobs (over the jobs the
/// controller holds: a deleted job's go with it).
fn record_queues(r: &mut Registry, queues: &[QueueStatus], jobs: &[Job]) {
    let quota = family::<QueueLabels>(r, "queue_quota_gpus", "The queue's GPU quota (absent: none)");
    let used = family::<QueueLabels>(r, "queue_used_gpus", "GPUs the queue's running jobs hold");
    let borrowed = family::<QueueLabels>(r, "queue_borrowed_gpus", "GPUs the queue holds beyond its quota");
    let lent = family::<QueueLabels>(r, "queue_lent_gpus", "GPUs of the queue's idle quota that other queues borrow");
    let running = family::<QueueLabels>(r, "queue_running_jobs", "The queue's jobs holding GPUs");
    let pending = family::<QueueLabels>(r, "queue_pending_jobs", "The queue's jobs waiting to be placed");
    let weight = family::<QueueLabels>(r, "queue_weight", "The queue's fair-share weight");
    let usage = family::<QueueLabels>(r, "queue_fair_share_usage_gpu_seconds", "The queue's decayed GPU-seconds");
    let preempted =
        family::<QueueLabels>(r, "queue_preempted_attempts", "Attempts of the queue's jobs that were preempted");
    let lost = family::<QueueLabels>(
        r,
        "queue_preempted_lost_iterations",
        "Iterations the queue's preempted attempts did and did not save (where known)",
    );
    let mut preemptions: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
    for job in jobs {
        for p in job.attempts.iter().filter_map(|a| a.preemption.as_ref()) {
            let entry = preemptions.entry(job.queue.as_str()).or_default();
            entry.0 += 1;
            entry.1 += p.lost_iterations.unwrap_or(0);
        }
    }
    for q in queues {
        let Some(spec) = &q.spec else { continue };
        let labels = QueueLabels { queue: spec.name.clone() };
        set(&quota, &labels, spec.gpus.map(f64::from));
        set(&used, &labels, Some(f64::from(q.used_gpus)));
        set(&borrowed, &labels, Some(f64::from(q.borrowed_gpus)));
        set(&lent, &labels, Some(f64::from(q.lent_gpus)));
        set(&running, &labels, Some(f64::from(q.running_jobs)));
        set(&pending, &labels, Some(f64::from(q.pending_jobs)));
        set(&weight, &labels, Some(spec.weight));
        set(&usage, &labels, Some(q.fair_share_usage));
        let (count, iterations) = preemptions.get(spec.name.as_str()).copied().unwrap_or_default();
        set(&preempted, &labels, Some(count as f64));
        set(&lost, &labels, Some(iterations as f64));
    }
}

/// The OpenMetrics text of one scrape (also valid Prometheus text 0.0.4: gauges only).
pub fn render(controller_id: &str, leading: bool, nodes: &[Node], jobs: &[Job], queues: &[QueueStatus]) -> String {
    let mut text = String::new();
    let registry = registry(controller_id, leading, nodes, jobs, queues);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(error = %e, "cannot encode the metrics registry");
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use cohort_proto::{GangPlan, GpuHealth, GpuInfo, NodeAssignment, NodeInfo, TrainingPoint};

    use super::*;

    fn node(name: &str, jobs: &[&str], allocated: &[u32]) -> Node {
        Node {
            info: Some(NodeInfo {
                name: name.into(),
                gpus: (0..2)
                    .map(|i| GpuInfo { index: i, uuid: format!("GPU-{name}-{i}"), ..Default::default() })
                    .collect(),
                ..Default::default()
            }),
            state: NodeState::Ready as i32,
            allocated_gpus: allocated.to_vec(),
            jobs: jobs.iter().map(|j| j.to_string()).collect(),
            telemetry: (0..2)
                .map(|i| GpuTelemetry {
                    index: i,
                    uuid: format!("GPU-{name}-{i}"),
                    utilization_gpu_pct: Some(40 + i),
                    sm_clock_mhz: Some(1980),
                    health: Some(GpuHealth { state: GpuHealthState::Healthy as i32, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn gpus_carry_the_job_that_holds_them_and_every_state_is_present() {
        let job = Job {
            id: "sft-1".into(),
            name: "sft".into(),
            state: JobState::Running as i32,
            attempt: 1,
            plan: Some(GangPlan {
                nodes: vec![NodeAssignment { node_name: "a".into(), gpu_indices: vec![1], ..Default::default() }],
                ..Default::default()
            }),
            progress: Some(TrainingPoint { iteration: 7, loss: Some(1.25), ..Default::default() }),
            queue: "team-a".into(),
            attempts: vec![
                cohort_proto::AttemptRecord {
                    state: JobState::Preempted as i32,
                    preemption: Some(cohort_proto::Preemption { lost_iterations: Some(3), ..Default::default() }),
                    ..Default::default()
                },
                cohort_proto::AttemptRecord::default(),
            ],
            ..Default::default()
        };
        let queue = QueueStatus {
            spec: Some(cohort_proto::QueueSpec {
                name: "team-a".into(),
                gpus: Some(8),
                weight: 2.0,
                ..Default::default()
            }),
            used_gpus: 10,
            borrowed_gpus: 2,
            pending_jobs: 3,
            running_jobs: 1,
            ..Default::default()
        };
        let open = QueueStatus {
            spec: Some(cohort_proto::QueueSpec { name: "open".into(), ..Default::default() }),
            ..Default::default()
        };
        let text = render("c1", true, &[node("a", &["sft-1"], &[1]), node("b", &[], &[])], &[job], &[queue, open]);
        for line in [
            r#"cohort_queue_quota_gpus{queue="team-a"} 8.0"#,
            r#"cohort_queue_used_gpus{queue="team-a"} 10.0"#,
            r#"cohort_queue_borrowed_gpus{queue="team-a"} 2.0"#,
            r#"cohort_queue_pending_jobs{queue="team-a"} 3.0"#,
            r#"cohort_queue_running_jobs{queue="team-a"} 1.0"#,
            r#"cohort_queue_pending_jobs{queue="open"} 0.0"#,
            r#"cohort_queue_preempted_attempts{queue="team-a"} 1.0"#,
            r#"cohort_queue_preempted_lost_iterations{queue="team-a"} 3.0"#,
            r#"cohort_queue_preempted_attempts{queue="open"} 0.0"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(
            !text.contains(r#"cohort_queue_quota_gpus{queue="open"}"#),
            "a queue without quota has no quota series"
        );
        assert!(text.contains(r#"cohort_gpu_utilization_percent{node="a",gpu="1",uuid="GPU-a-1",job="sft-1"} 41.0"#));
        assert!(text.contains(r#"cohort_gpu_utilization_percent{node="a",gpu="0",uuid="GPU-a-0",job=""} 40.0"#));
        assert!(text.contains(r#"cohort_gpu_sm_clock_hertz{node="b",gpu="0",uuid="GPU-b-0",job=""} 1980000000.0"#));
        assert!(text.contains(r#"cohort_gpus{health="healthy"} 4.0"#), "{text}");
        assert!(text.contains(r#"cohort_nodes{state="lost"} 0.0"#));
        assert!(text.contains(r#"cohort_jobs{state="running"} 1.0"#));
        assert!(text.contains(r#"cohort_job_loss{job="sft-1",name="sft"} 1.25"#));
        assert!(!text.contains("cohort_job_learning_rate{"), "absent readings are not exported");
        assert!(text.contains(r#"cohort_controller_leader{controller="c1"} 1"#));
    }

    #[test]
    fn a_standby_exports_only_its_role() {
        let text = render("c2", false, &[], &[], &[]);
        assert!(text.contains(r#"cohort_controller_leader{controller="c2"} 0"#), "{text}");
        assert!(!text.contains("cohort_nodes"), "{text}");
    }
}
