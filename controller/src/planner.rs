//! Gang placement and the environment contract.
//!
//! `place` chooses the nodes and GPUs of a job attempt, all or nothing;
//! `layout` records that choice (what the job record keeps) and `node_processes`
//! renders one node's processes from it at launch: command line and the full
//! environment of DESIGN.md's contract. `render` does both for every node.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// NVLink island of each GPU index (GPUs without NVLink are islands of one).
    pub islands: HashMap<u32, u32>,
}

/// The chosen nodes, in node-rank order, with the GPUs granted on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub nodes: Vec<(String, Vec<u32>)>,
    /// Why, for `cohort plan`: islands used per node.
    pub notes: Vec<String>,
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
    let mut notes = Vec::new();
    let nodes = chosen
        .into_iter()
        .map(|n| {
            let (gpus, note) = pick_gpus(n, spec.gpus_per_node as usize);
            if let Some(note) = note {
                notes.push(format!("{}: {note}", n.name));
            }
            (n.name.clone(), gpus)
        })
        .collect();
    Ok(Placement { nodes, notes })
}

/// `count` free GPUs of `node`, from one NVLink island when one has room (the
/// one with the fewest free GPUs that fits, so big islands stay whole),
/// else from as few islands as possible. Returns a note when islands matter.
fn pick_gpus(node: &NodeView, count: usize) -> (Vec<u32>, Option<String>) {
    if count == 0 {
        return (Vec::new(), None);
    }
    let mut by_island: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for gpu in &node.free_gpus {
        let island = node.islands.get(gpu).copied().unwrap_or(u32::MAX - gpu);
        by_island.entry(island).or_default().push(*gpu);
    }
    let multi_gpu_islands = by_island.values().any(|g| g.len() > 1)
        || node.islands.values().collect::<BTreeSet<_>>().len() < node.islands.len();
    if let Some((island, gpus)) =
        by_island.iter().filter(|(_, g)| g.len() >= count).min_by_key(|(_, g)| (g.len(), g[0]))
    {
        let picked = gpus[..count].to_vec();
        let note = (count > 1 && multi_gpu_islands)
            .then(|| format!("GPUs {} share NVLink island {island} ({} free there)", join(&picked), gpus.len()));
        return (picked, note);
    }
    // No island has room: fewest islands, biggest first.
    let mut islands: Vec<&Vec<u32>> = by_island.values().collect();
    islands.sort_by_key(|g| std::cmp::Reverse(g.len()));
    let picked: Vec<u32> = islands.iter().flat_map(|g| g.iter().copied()).take(count).collect();
    let used = islands.iter().scan(0usize, |taken, g| {
        let before = *taken;
        *taken += g.len();
        (before < count).then_some(())
    });
    let note = multi_gpu_islands.then(|| {
        format!(
            "no NVLink island has {count} free GPUs: GPUs {} span {} islands (traffic between them crosses PCIe)",
            join(&picked),
            used.count()
        )
    });
    let mut picked = picked;
    picked.sort_unstable();
    (picked, note)
}

/// What `render` needs besides the spec and the placement.
pub struct RenderInput<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub master_port: u16,
    /// Absolute workdir on every node, or None for a per-job directory the agent makes.
    pub workdir: Option<&'a str>,
}

/// Renders the attempt's layout: nodes in rank order with their address and
/// GPUs, the master address and port, but not the processes. The job record
/// keeps only this: each node's processes (argv and the full environment, which
/// names every node's address) are rendered by [`node_processes`] when its launch
/// command is sent, so the record grows with the number of nodes, not with its
/// square. Nodes absent from `nodes` (which `place` never returns) get an empty address.
pub fn layout(spec: &JobSpec, placement: &Placement, nodes: &[NodeView], input: &RenderInput) -> GangPlan {
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let address = |name: &str| by_name.get(name).map(|n| n.address.clone()).unwrap_or_default();
    let master_addr = placement.nodes.first().map(|(n, _)| address(n)).unwrap_or_default();
    let assignments = placement
        .nodes
        .iter()
        .enumerate()
        .map(|(rank, (name, gpus))| NodeAssignment {
            node_name: name.clone(),
            address: address(name),
            node_rank: rank as u32,
            gpu_indices: gpus.clone(),
            workdir: input.workdir.unwrap_or_default().to_string(),
            processes: Vec::new(),
        })
        .collect();
    GangPlan {
        master_addr,
        master_port: input.master_port as u32,
        nodes: assignments,
        notes: placement.notes.clone(),
        argv: command(spec).0,
    }
}

/// The command line every node runs, and whether once per node or per rank.
fn command(spec: &JobSpec) -> (Vec<String>, LaunchMode) {
    match &spec.workload {
        Workload::Command(c) => (c.argv.clone(), c.launch),
        Workload::MegatronSft(m) => (m.render_args(), LaunchMode::PerNode),
    }
}

/// Renders one node's processes of a laid-out attempt with the environment
/// contract: the contract's variables, then the node's defaults (unless the job
/// sets them), then Cohort's own, then the job's `env`.
pub fn node_processes(
    spec: &JobSpec,
    plan: &GangPlan,
    node: &NodeAssignment,
    node_env: &[EnvVar],
    input: &RenderInput,
) -> Vec<ProcessSpec> {
    let nnodes = plan.nodes.len() as u32;
    let nproc = spec.gpus_per_node.max(1);
    let node_ips: Vec<&str> = plan.nodes.iter().map(|a| a.address.as_str()).collect();
    let (argv, mode) = command(spec);
    let node_rank = node.node_rank;
    let mut env = vec![
        var("NNODES", nnodes),
        var("NODE_RANK", node_rank),
        var("NPROC_PER_NODE", nproc),
        var("WORLD_SIZE", nnodes * nproc),
        var("MASTER_ADDR", &plan.master_addr),
        var("MASTER_PORT", plan.master_port),
        var("CUDA_VISIBLE_DEVICES", join(&node.gpu_indices)),
    ];
    // The job's own env wins over the node's defaults.
    env.extend(node_env.iter().filter(|v| !spec.env.contains_key(&v.name)).cloned());
    env.extend([
        var("COHORT_JOB_ID", input.job_id),
        var("COHORT_ATTEMPT", input.attempt),
        var("COHORT_NODE_NAME", &node.node_name),
        var("COHORT_NODE_IPS", node_ips.join(",")),
    ]);
    env.extend(spec.env.iter().map(|(k, v)| var(k, v)));
    match mode {
        LaunchMode::PerNode => vec![ProcessSpec { index: 0, argv, env, global_rank: None }],
        LaunchMode::PerRank => (0..nproc)
            .map(|local| {
                let global = node_rank * nproc + local;
                let mut env = env.clone();
                env.push(var("RANK", global));
                env.push(var("LOCAL_RANK", local));
                ProcessSpec { index: local, argv: argv.clone(), env, global_rank: Some(global) }
            })
            .collect(),
    }
}

/// Renders each node's processes: [`layout`] plus [`node_processes`] for every
/// node, as `cohort plan` shows it.
pub fn render(spec: &JobSpec, placement: &Placement, nodes: &[NodeView], input: &RenderInput) -> GangPlan {
    let mut plan = layout(spec, placement, nodes, input);
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let processes: Vec<Vec<ProcessSpec>> = plan
        .nodes
        .iter()
        .map(|a| {
            let node_env = by_name.get(a.node_name.as_str()).map(|n| n.node_env.as_slice()).unwrap_or_default();
            node_processes(spec, &plan, a, node_env, input)
        })
        .collect();
    for (a, processes) in plan.nodes.iter_mut().zip(processes) {
        a.processes = processes;
    }
    plan
}

fn var(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.to_string(), value: value.to_string() }
}

fn join(gpus: &[u32]) -> String {
    gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
