//! What submit admits: a job the cluster could ever run, at a priority the
//! caller's role may ask for, once per client request id.
//!
//! The cluster's size is its registered nodes, connected or not (Slurm's
//! "configured nodes of the partition", down ones included): a job that needs
//! more nodes, or more GPUs on a node, than those could ever offer is refused
//! at submit, as Slurm refuses it ("Requested node configuration is not
//! available"), instead of queueing forever ahead of every other job. Nodes
//! that join later grow the cluster for later submits. With no node registered
//! yet (a cluster being set up) only `--max-job-nodes` applies.

use super::*;

/// Admission flags of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// The highest `priority` a submit-role token may set (admins: any).
    pub max_submit_priority: i32,
    /// The most nodes one job may ask for (0: only the cluster's size bounds it).
    pub max_job_nodes: u32,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits { max_submit_priority: 100, max_job_nodes: 0 }
    }
}

/// What the API knows of one submit besides the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// SubmitJobRequest.request_id; empty for none.
    pub request_id: String,
    /// The caller's priority cap (None: an admin, or `--insecure`).
    pub max_priority: Option<i32>,
    /// The identity whose `--allow-run-as` rules bound the job's `user:`
    /// (None: an admin, or `--insecure`).
    pub run_as_bound: Option<String>,
}

const MAX_REQUEST_ID_LEN: usize = 128;

pub(super) fn check_request_id(id: &str) -> Result<(), ControllerError> {
    if id.len() > MAX_REQUEST_ID_LEN || id.chars().any(char::is_control) {
        return Err(ControllerError::InvalidRequest(format!(
            "request_id: give at most {MAX_REQUEST_ID_LEN} printable characters (e.g. a UUID)"
        )));
    }
    Ok(())
}

/// A repeated request id must carry the same job file as the first submit.
pub(super) fn check_same_file(id: &str, first: &Job, file: &JobFile) -> Result<(), ControllerError> {
    let same = first.file.as_ref().is_some_and(|f| f.yaml == file.yaml && f.base_dir == file.base_dir);
    if same {
        Ok(())
    } else {
        Err(ControllerError::InvalidRequest(format!(
            "request_id {id:?} was already used for job {} with another job file; send a new request id for a new job",
            first.id
        )))
    }
}

pub(super) fn check_priority(spec: &JobSpec, cap: Option<i32>) -> Result<(), ControllerError> {
    match cap {
        Some(cap) if spec.priority > cap => Err(ControllerError::PermissionDenied(format!(
            "job {}: priority {} is above {cap}, the highest a submit token may set (the controller's \
             --max-submit-priority); lower it, or ask an admin to submit it",
            spec.name, spec.priority
        ))),
        _ => Ok(()),
    }
}

/// Refuses a job no placement could ever satisfy on the registered nodes.
pub(super) fn check_fits(spec: &JobSpec, state: &State, limits: &AdmissionLimits) -> Result<(), ControllerError> {
    if spec.is_pipeline() {
        return Ok(()); // its stages are admitted as they start
    }
    if limits.max_job_nodes > 0 && spec.nodes > limits.max_job_nodes {
        return Err(ControllerError::Unsatisfiable(format!(
            "job {}: nodes: {} is more than the {} a job may ask for on this cluster (the controller's --max-job-nodes)",
            spec.name, spec.nodes, limits.max_job_nodes
        )));
    }
    let registered = state.nodes.len();
    if registered == 0 {
        return Ok(());
    }
    let matching: Vec<u32> = state
        .nodes
        .values()
        .filter(|n| spec.node_selector.iter().all(|(k, v)| n.info.labels.get(k) == Some(v)))
        .map(|n| n.info.gpus.len() as u32)
        .collect();
    let labels = if spec.node_selector.is_empty() {
        String::new()
    } else {
        let labels: Vec<String> = spec.node_selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with labels {}", labels.join(","))
    };
    let size = format!("the cluster has {registered} registered node(s), {} of them{labels}", matching.len());
    let biggest = matching.iter().copied().max().unwrap_or(0);
    if spec.gpus_per_node > biggest {
        return Err(ControllerError::Unsatisfiable(format!(
            "job {}: gpus_per_node: {} is more than any node could ever offer: {size}, the biggest with {biggest} \
             GPU(s); requested node configuration is not available",
            spec.name, spec.gpus_per_node
        )));
    }
    let qualifying = matching.iter().filter(|g| **g >= spec.gpus_per_node).count();
    if spec.nodes as usize > qualifying {
        return Err(ControllerError::Unsatisfiable(format!(
            "job {}: nodes: {} is more than the cluster could ever offer: {size}, {qualifying} with at least {} \
             GPU(s); requested node configuration is not available",
            spec.name, spec.nodes, spec.gpus_per_node
        )));
    }
    Ok(())
}
