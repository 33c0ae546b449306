//! Per-node progress of running jobs on `/metrics`: step interval, GPU
//! utilisation, straggler flag, and the seconds since the job's last progress.

use std::sync::atomic::AtomicU64;

use cohort_proto::{Job, JobState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Value = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobNodeLabels {
    job: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job: String,
}

pub struct ProgressGauges {
    step_interval: Family<JobNodeLabels, Value>,
    gpu_utilization: Family<JobNodeLabels, Value>,
    straggler: Family<JobNodeLabels, Value>,
    since_progress: Family<JobLabels, Value>,
}

impl ProgressGauges {
    pub fn register(r: &mut Registry) -> Self {
        let mut family = |name: &str, help: &str| {
            let f = Family::<JobNodeLabels, Value>::default();
            r.register(name, help, f.clone());
            f
        };
        let step_interval = family(
            "job_node_step_interval_seconds",
            "Median time between consecutive progress events of the node's ranks",
        );
        let gpu_utilization =
            family("job_node_gpu_utilization_percent", "Mean utilisation of the job's GPUs on the node");
        let straggler =
            family("job_node_straggler", "1 when the node is slower than the others by the job's straggler_factor");
        let since_progress = Family::<JobLabels, Value>::default();
        r.register(
            "job_seconds_since_progress",
            "Seconds since the running job's last progress (iteration, output, GPU use)",
            since_progress.clone(),
        );
        Self { step_interval, gpu_utilization, straggler, since_progress }
    }

    pub fn record(&self, job: &Job) {
        if job.state != JobState::Running as i32 {
            return;
        }
        if job.last_progress_unix_ms > 0 {
            let since = (cohort_proto::now_unix_ms() - job.last_progress_unix_ms).max(0) as f64 / 1000.0;
            self.since_progress.get_or_create(&JobLabels { job: job.id.clone() }).set(since);
        }
        for n in &job.node_progress {
            let labels = JobNodeLabels { job: job.id.clone(), node: n.node_name.clone() };
            if n.step_interval_s > 0.0 {
                self.step_interval.get_or_create(&labels).set(n.step_interval_s);
            }
            if n.gpu_utilization_pct >= 0.0 {
                self.gpu_utilization.get_or_create(&labels).set(n.gpu_utilization_pct);
            }
            self.straggler.get_or_create(&labels).set(if n.straggler { 1.0 } else { 0.0 });
        }
    }
}
