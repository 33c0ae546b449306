//! What the planner's unit and property tests build their clusters and jobs from.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use cohort_shared::spec::JobSpec;

use super::NodeView;

/// A node at `address` with `free` of its `total` GPUs free, no labels, one island.
pub fn node_at(name: &str, address: &str, free: &[u32], total: u32) -> NodeView {
    NodeView {
        name: name.into(),
        address: address.into(),
        labels: HashMap::new(),
        free_gpus: free.to_vec(),
        total_gpus: total,
        unavailable: None,
        node_env: Vec::new(),
        islands: HashMap::new(),
    }
}

/// [`node_at`] with the address the tests never look at.
pub fn node(name: &str, free: &[u32], total: u32) -> NodeView {
    node_at(name, "10.0.0.1", free, total)
}

/// A `command` job of `nodes` × `gpus_per_node` GPUs.
pub fn command_job(nodes: u32, gpus_per_node: u32) -> JobSpec {
    let yaml = format!("name: j\nkind: command\nnodes: {nodes}\ngpus_per_node: {gpus_per_node}\ncommand: [x]\n");
    JobSpec::from_yaml(&yaml, "j.yaml").unwrap()
}
