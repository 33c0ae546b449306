//! `cohort nodes` and `cohort gpus`: each node's state, each GPU's health,
//! utilisation, memory and job.

use std::process::ExitCode;
use std::time::Duration;

use cohort_proto::job_service_client::JobServiceClient;
use cohort_proto::{ListNodesRequest, NodeState};

use crate::connection::ApiChannel as Channel;
use crate::output::{Output, ago, print_json, status_error, table};

/// "Ready", "Suspect,Cordoned", "Lost", "Ready,Draining", ...
pub fn node_state(node: &cohort_proto::Node) -> String {
    let mut state = match NodeState::try_from(node.state) {
        Ok(NodeState::Ready) => "Ready",
        Ok(NodeState::Suspect) => "Suspect",
        Ok(NodeState::Lost) => "Lost",
        Ok(NodeState::Disconnected) => "Disconnected",
        _ => "Unknown",
    }
    .to_string();
    if node.draining {
        state.push_str(",Draining");
    } else if node.cordoned {
        state.push_str(",Cordoned");
    }
    state
}

fn health_of(t: &cohort_proto::GpuTelemetry) -> (&'static str, String) {
    use cohort_proto::GpuHealthState;
    match &t.health {
        Some(h) => {
            let state = match GpuHealthState::try_from(h.state) {
                Ok(GpuHealthState::Healthy) => "Healthy",
                Ok(GpuHealthState::Warning) => "Warning",
                Ok(GpuHealthState::Unhealthy) => "Unhealthy",
                _ => "Unknown",
            };
            (state, h.reasons.join("; "))
        }
        None => ("Unknown", String::new()),
    }
}

pub(crate) async fn nodes(client: &mut JobServiceClient<Channel>, out: Output, wide: bool) -> anyhow::Result<ExitCode> {
    let nodes = client.list_nodes(ListNodesRequest {}).await.map_err(status_error)?.into_inner();
    if out == Output::Json {
        print_json(&nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut header = vec!["NAME", "ADDRESS", "STATE", "GPUS", "GPU MODEL", "LABELS", "JOBS", "LAST HEARTBEAT"];
    if wide {
        header.extend(["UNHEALTHY GPUS", "FENCE DEADLINE"]);
    }
    let mut t = table(&header);
    for node in &nodes.nodes {
        let info = node.info.clone().unwrap_or_default();
        let mut models: Vec<String> = info.gpus.iter().map(|g| g.name.clone()).collect();
        models.dedup();
        let mut labels: Vec<String> = info.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let mut row = vec![
            info.name.clone(),
            info.advertise_addr.clone(),
            node_state(node),
            format!("{}/{} used", node.allocated_gpus.len(), info.gpus.len()),
            if models.is_empty() { format!("none ({})", info.gpu_note) } else { models.join(", ") },
            labels.join(","),
            node.jobs.join(","),
            ago(node.last_heartbeat_unix_ms),
        ];
        if wide {
            let unhealthy: Vec<String> = node
                .telemetry
                .iter()
                .filter(|t| health_of(t).0 == "Unhealthy")
                .map(|t| format!("{} ({})", t.index, health_of(t).1))
                .collect();
            row.push(if unhealthy.is_empty() { "-".into() } else { unhealthy.join("; ") });
            row.push(if node.fence_deadline_unix_ms > 0 { until(node.fence_deadline_unix_ms) } else { "-".into() });
        }
        t.add_row(row);
    }
    say!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// Every GPU of every node: model, health and why, utilisation, memory, temperature, power, job.
pub(crate) async fn gpus(client: &mut JobServiceClient<Channel>, out: Output) -> anyhow::Result<ExitCode> {
    let nodes = client.list_nodes(ListNodesRequest {}).await.map_err(status_error)?.into_inner();
    if out == Output::Json {
        print_json(&nodes)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t =
        table(&["NODE", "GPU", "MODEL", "UUID", "ISLAND", "HEALTH", "UTIL", "MEMORY", "TEMP", "POWER", "JOBS", "WHY"]);
    for node in &nodes.nodes {
        let info = node.info.clone().unwrap_or_default();
        for gpu in &info.gpus {
            let telemetry = node.telemetry.iter().find(|t| t.index == gpu.index);
            let (health, why) = telemetry.map(health_of).unwrap_or(("Unknown", String::new()));
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let allocated = node.allocated_gpus.contains(&gpu.index);
            t.add_row(vec![
                info.name.clone(),
                gpu.index.to_string(),
                gpu.name.clone(),
                gpu.uuid.clone(),
                gpu.nvlink_island.to_string(),
                health.to_string(),
                opt(telemetry.and_then(|t| t.utilization_gpu_pct).map(|u| format!("{u}%"))),
                opt(telemetry
                    .and_then(|t| Some((t.memory_used_bytes?, t.memory_total_bytes?)))
                    .map(|(u, m)| format!("{}/{}", crate::metrics::bytes(u), crate::metrics::bytes(m)))),
                opt(telemetry.and_then(|t| t.temperature_c).map(|c| format!("{c}°C"))),
                opt(telemetry.and_then(|t| t.power_w).map(|w| format!("{w:.0} W"))),
                if allocated { node.jobs.join(",") } else { String::new() },
                why,
            ]);
        }
    }
    say!("{t}");
    Ok(ExitCode::SUCCESS)
}

fn until(unix_ms: i64) -> String {
    let left = unix_ms - cohort_proto::now_unix_ms();
    if left <= 0 {
        "passed".into()
    } else {
        format!("in {}", humantime::format_duration(Duration::from_secs((left / 1000) as u64)))
    }
}
