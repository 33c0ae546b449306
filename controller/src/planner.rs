//! Gang placement and the environment contract.
//!
//! `place` chooses the nodes and GPUs of a job attempt, all or nothing;
//! `render` turns that choice into each node's processes: command line and the
//! full environment of DESIGN.md's contract.

use std::collections::{BTreeMap, HashMap};

use cohort_proto::{EnvVar, GangPlan, NodeAssignment, ProcessSpec};
use cohort_shared::spec::{JobSpec, LaunchMode, Workload};

/// What the planner needs to know of a node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub labels: HashMap<String, String>,
    /// Free GPU indices, ascending.
    pub free_gpus: Vec<u32>,
    pub total_gpus: u32,
    /// Why the node takes no work now (lost, disconnected), if it doesn't.
    pub unavailable: Option<String>,
    /// Node-specific variables of the contract (MODELSCOPE_CACHE, ...).
    pub node_env: Vec<EnvVar>,
}

/// The chosen nodes, in node-rank order, with the GPUs granted on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<(String, Vec<u32>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("needs {wanted} node(s) with {gpus_per_node} free GPU(s) each{selector}; {found} qualify now{details}")]
pub struct PlacementError {
    pub wanted: u32,
    pub gpus_per_node: u32,
    pub found: usize,
    selector: String,
    details: String,
    /// True when the job could not fit even on an idle cluster.
    pub never_fits: bool,
}

/// Places a job: `spec.nodes` nodes, each with `spec.gpus_per_node` free GPUs
/// and every `node_selector` label. Best fit (fewest free GPUs first) keeps
/// big nodes free for big jobs; ranks follow node names for stable plans.
pub fn place(spec: &JobSpec, nodes: &[NodeView]) -> Result<Placement, PlacementError> {
    let mut eligible: Vec<&NodeView> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    let mut could_ever = 0usize;
    for node in nodes {
        if let Some(missing) = spec.node_selector.iter().find(|(k, v)| node.labels.get(*k) != Some(*v)) {
            rejected.push(format!("{} lacks label {}={}", node.name, missing.0, missing.1));
            continue;
        }
        if node.total_gpus >= spec.gpus_per_node {
            could_ever += 1;
        }
        if let Some(why) = &node.unavailable {
            rejected.push(format!("{} is {why}", node.name));
        } else if (node.free_gpus.len() as u32) < spec.gpus_per_node {
            rejected.push(format!("{} has {} of {} GPUs free", node.name, node.free_gpus.len(), node.total_gpus));
        } else {
            eligible.push(node);
        }
    }
    if (eligible.len() as u32) < spec.nodes {
        let selector = if spec.node_selector.is_empty() {
            String::new()
        } else {
            let labels: Vec<String> = spec.node_selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!(" and labels {}", labels.join(","))
        };
        let details = if rejected.is_empty() { String::new() } else { format!(" ({})", rejected.join("; ")) };
        return Err(PlacementError {
            wanted: spec.nodes,
            gpus_per_node: spec.gpus_per_node,
            found: eligible.len(),
            selector,
            details,
            never_fits: (could_ever as u32) < spec.nodes,
        });
    }
    eligible.sort_by(|a, b| a.free_gpus.len().cmp(&b.free_gpus.len()).then(a.name.cmp(&b.name)));
    let mut chosen: Vec<&NodeView> = eligible.into_iter().take(spec.nodes as usize).collect();
    chosen.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Placement {
        nodes: chosen
            .into_iter()
            .map(|n| (n.name.clone(), n.free_gpus[..spec.gpus_per_node as usize].to_vec()))
            .collect(),
    })
}

/// What `render` needs besides the spec and the placement.
pub struct RenderInput<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub master_port: u16,
    /// Absolute workdir on every node, or None for a per-job directory the agent makes.
    pub workdir: Option<&'a str>,
}

/// Renders each node's processes with the environment contract. Nodes absent
/// from `nodes` (which `place` never returns) render with an empty address.
pub fn render(spec: &JobSpec, placement: &Placement, nodes: &[NodeView], input: &RenderInput) -> GangPlan {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let address = |name: &str| by_name.get(name).map(|n| n.address.clone()).unwrap_or_default();
    let master_addr = placement.nodes.first().map(|(n, _)| address(n)).unwrap_or_default();
    let node_ips: Vec<String> = placement.nodes.iter().map(|(n, _)| address(n)).collect();
    let nnodes = placement.nodes.len() as u32;
    let nproc = spec.gpus_per_node.max(1);
    let (argv, mode) = match &spec.workload {
        Workload::Command(c) => (c.argv.clone(), c.launch),
        Workload::MegatronSft(m) => (m.render_args(), LaunchMode::PerNode),
    };

    let assignments = placement
        .nodes
        .iter()
        .enumerate()
        .map(|(rank, (name, gpus))| {
            let node_rank = rank as u32;
            let mut env = vec![
                var("NNODES", nnodes),
                var("NODE_RANK", node_rank),
                var("NPROC_PER_NODE", nproc),
                var("WORLD_SIZE", nnodes * nproc),
                var("MASTER_ADDR", &master_addr),
                var("MASTER_PORT", input.master_port),
                var("CUDA_VISIBLE_DEVICES", join(gpus)),
            ];
            if let Some(node) = by_name.get(name.as_str()) {
                // The job's own env wins over the node's defaults.
                env.extend(node.node_env.iter().filter(|v| !spec.env.contains_key(&v.name)).cloned());
            }
            env.extend([
                var("COHORT_JOB_ID", input.job_id),
                var("COHORT_ATTEMPT", input.attempt),
                var("COHORT_NODE_NAME", name),
                var("COHORT_NODE_IPS", node_ips.join(",")),
            ]);
            env.extend(spec.env.iter().map(|(k, v)| var(k, v)));
            let processes = match mode {
                LaunchMode::PerNode => vec![ProcessSpec { index: 0, argv: argv.clone(), env, global_rank: None }],
                LaunchMode::PerRank => (0..nproc)
                    .map(|local| {
                        let global = node_rank * nproc + local;
                        let mut env = env.clone();
                        env.push(var("RANK", global));
                        env.push(var("LOCAL_RANK", local));
                        ProcessSpec { index: local, argv: argv.clone(), env, global_rank: Some(global) }
                    })
                    .collect(),
            };
            NodeAssignment {
                node_name: name.clone(),
                address: address(name),
                node_rank,
                gpu_indices: gpus.clone(),
                workdir: input.workdir.unwrap_or_default().to_string(),
                processes,
            }
        })
        .collect();
    GangPlan { master_addr, master_port: input.master_port as u32, nodes: assignments }
}

fn var(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.to_string(), value: value.to_string() }
}

fn join(gpus: &[u32]) -> String {
    gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
