//! Placement: which nodes and GPUs an attempt gets, all or nothing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use cohort_proto::EnvVar;
use cohort_shared::spec::JobSpec;

use super::join;

/// How many rejected nodes a placement error names one by one.
const MAX_DETAILS: usize = 16;

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
/// and every `node_selector` label, all or nothing. Nodes in `excluded` (blamed
/// for an earlier failure of the job) are left out when the others suffice.
pub fn place(spec: &JobSpec, inventory: &[NodeView], excluded: &[String]) -> Result<Placement, PlacementError> {
    place_setting_aside(spec, inventory, excluded, &|_| None)
}

/// [`place`] on the nodes `set_aside` gives no reason to leave out (e.g.
/// reserved for another job), without copying the inventory.
pub fn place_setting_aside(
    spec: &JobSpec,
    inventory: &[NodeView],
    excluded: &[String],
    set_aside: &dyn Fn(&NodeView) -> Option<String>,
) -> Result<Placement, PlacementError> {
    if !excluded.is_empty() {
        let without = |v: &NodeView| {
            set_aside(v)
                .or_else(|| excluded.contains(&v.name).then(|| "blamed for an earlier failure of this job".to_string()))
        };
        if let Ok(placement) = place_on(spec, inventory, &without) {
            return Ok(placement);
        }
    }
    place_on(spec, inventory, set_aside)
}

/// Best fit (fewest free GPUs first) keeps big nodes free for big jobs; ranks
/// follow node names for stable plans.
fn place_on(
    spec: &JobSpec,
    nodes: &[NodeView],
    set_aside: &dyn Fn(&NodeView) -> Option<String>,
) -> Result<Placement, PlacementError> {
    let mut eligible: Vec<&NodeView> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    let mut more = 0usize;
    // The first few reasons are enough for a message, and formatting one per node of a big cluster is not free.
    let mut reject = |why: &dyn Fn() -> String| {
        if rejected.len() < MAX_DETAILS {
            rejected.push(why());
        } else {
            more += 1;
        }
    };
    let mut could_ever = 0usize;
    for node in nodes {
        if let Some(missing) = spec.node_selector.iter().find(|(k, v)| node.labels.get(*k) != Some(*v)) {
            reject(&|| format!("{} lacks label {}={}", node.name, missing.0, missing.1));
            continue;
        }
        if node.total_gpus >= spec.gpus_per_node {
            could_ever += 1;
        }
        let why = node.unavailable.as_deref().map(Cow::Borrowed).or_else(|| set_aside(node).map(Cow::Owned));
        if let Some(why) = why {
            reject(&|| format!("{} is {why}", node.name));
        } else if (node.free_gpus.len() as u32) < spec.gpus_per_node {
            reject(&|| format!("{} has {} of {} GPUs free", node.name, node.free_gpus.len(), node.total_gpus));
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
        if more > 0 {
            rejected.push(format!("{more} more node(s)"));
        }
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
