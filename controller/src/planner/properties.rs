//! Property tests of the planner over random clusters and specs, with no
//! runtime: placement is all or nothing, ranks are contiguous, tensor-parallel
//! groups stay inside a node, no MASTER_PORT is leased twice, and every node's
//! rendered commands agree with the placement.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use cohort_proto::{EnvVar, GangPlan, ProcessSpec};
use cohort_shared::spec::{JobSpec, Workload};
use proptest::prelude::*;

use super::*;

/// One node of a random cluster: its GPUs, which are busy, and whether it takes work.
#[derive(Debug, Clone)]
struct RandomNode {
    gpus: u32,
    busy: Vec<bool>,
    unavailable: Option<&'static str>,
}

fn random_node(gpus: impl Strategy<Value = u32>, busy: f64) -> impl Strategy<Value = RandomNode> {
    (gpus, prop::collection::vec(prop::bool::weighted(busy), 8), 0u32..10).prop_map(|(gpus, busy, state)| {
        let unavailable = match state {
            0 => Some("cordoned"),
            1 => Some("lost"),
            2 => Some("not connected"),
            _ => None,
        };
        RandomNode { gpus, busy, unavailable }
    })
}

/// 1 to 12 nodes of 0 to 8 GPUs, a fifth of them busy, some nodes cordoned, lost or disconnected.
fn random_cluster() -> impl Strategy<Value = Vec<NodeView>> {
    cluster_of(random_node(0u32..=8, 0.2))
}

/// Nodes of 8 GPUs, few busy: room for the bigger megatron gangs.
fn roomy_cluster() -> impl Strategy<Value = Vec<NodeView>> {
    cluster_of(random_node(Just(8u32), 0.05))
}

fn cluster_of(node: impl Strategy<Value = RandomNode>) -> impl Strategy<Value = Vec<NodeView>> {
    prop::collection::vec(node, 1..=12).prop_map(|nodes| {
        nodes
            .into_iter()
            .enumerate()
            .map(|(i, n)| NodeView {
                name: format!("node-{i:02}"),
                address: format!("10.0.{i}.1"),
                labels: HashMap::new(),
                free_gpus: (0..n.gpus).filter(|g| !n.busy[*g as usize]).collect(),
                total_gpus: n.gpus,
                unavailable: n.unavailable.map(str::to_string),
                node_env: vec![EnvVar { name: "MODELSCOPE_CACHE".into(), value: format!("/cache/{i}") }],
                islands: (0..n.gpus).map(|g| (g, g / 4)).collect(),
            })
            .collect()
    })
}

fn command_spec() -> impl Strategy<Value = JobSpec> {
    (1u32..=6, 0u32..=4, prop::bool::ANY).prop_map(|(nodes, gpus, per_rank)| {
        let launch = if per_rank { "per-rank" } else { "per-node" };
        let yaml = format!(
            "name: p\nkind: command\nnodes: {nodes}\ngpus_per_node: {gpus}\nlaunch: {launch}\ncommand: [python3, train.py]\n"
        );
        JobSpec::from_yaml(&yaml, "p.yaml").unwrap()
    })
}

/// A megatron-sft file with random TP/PP/CP; not every one validates.
fn megatron_yaml() -> impl Strategy<Value = (String, u32)> {
    let tp = prop::sample::select(vec![1u32, 2, 3, 4, 8]);
    let gpus = prop::sample::select(vec![1u32, 2, 4, 8]);
    (1u32..=4, gpus, tp, 1u32..=2, 1u32..=2).prop_map(|(nodes, gpus, tp, pp, cp)| {
        let global_batch = 2 * nodes * gpus;
        let yaml = format!(
            "name: m\nkind: megatron-sft\nnodes: {nodes}\ngpus_per_node: {gpus}\nworkdir: /w\nmegatron:\n  swift_version: 3\n  load: /models/m\n  dataset: [/data/a.jsonl]\n  tensor_model_parallel_size: {tp}\n  pipeline_model_parallel_size: {pp}\n  context_parallel_size: {cp}\n  micro_batch_size: 1\n  global_batch_size: {global_batch}\n  save: out\n"
        );
        (yaml, tp)
    })
}

fn env_of(p: &ProcessSpec) -> BTreeMap<&str, &str> {
    p.env.iter().map(|v| (v.name.as_str(), v.value.as_str())).collect()
}

/// Whether some choice of `spec.nodes` nodes could hold the job now.
fn fits(spec: &JobSpec, inventory: &[NodeView]) -> bool {
    let eligible =
        inventory.iter().filter(|n| n.unavailable.is_none() && n.free_gpus.len() as u32 >= spec.gpus_per_node).count();
    eligible as u32 >= spec.nodes
}

fn render_all(spec: &JobSpec, placement: &Placement, inventory: &[NodeView], port: u16) -> (GangPlan, LaunchPlan) {
    let input = RenderInput { job_id: "p-1", attempt: 2, master_port: port, workdir: spec.workdir.as_deref() };
    let gang = layout(spec, placement, inventory, &input);
    let node_env: HashMap<&str, &[EnvVar]> =
        inventory.iter().map(|n| (n.name.as_str(), n.node_env.as_slice())).collect();
    let inputs = AttemptInputs {
        job_id: "p-1",
        attempt: 2,
        resume_from: None,
        staged: &[],
        node_env: &node_env,
        prepare_marker: Some("p-1-2-0000"),
        sync: None,
    };
    let plan = launch_plan(spec, &gang, &inputs);
    (gang, plan)
}

/// The checks every rendered plan passes: ranks, the contract's variables and
/// the prepare commands agree with the placement. Returns each global rank's node.
fn check_plan(
    spec: &JobSpec,
    placement: &Placement,
    inventory: &[NodeView],
    port: u16,
) -> Result<Vec<String>, TestCaseError> {
    let (gang, plan) = render_all(spec, placement, inventory, port);
    let nnodes = placement.nodes.len() as u32;
    let nproc = spec.gpus_per_node.max(1);
    let by_name: HashMap<&str, &NodeView> = inventory.iter().map(|n| (n.name.as_str(), n)).collect();
    let master = &by_name[placement.nodes[0].0.as_str()].address;
    prop_assert_eq!(plan.nodes.len(), placement.nodes.len());
    let mut rank_node: BTreeMap<u32, String> = BTreeMap::new();
    for (rank, (node, (name, gpus))) in plan.nodes.iter().zip(&placement.nodes).enumerate() {
        let rank = rank as u32;
        prop_assert_eq!(&node.node_name, name);
        prop_assert_eq!(gang.nodes[rank as usize].node_rank, rank, "node ranks are 0..n in order");
        prop_assert_eq!(node.launch.node_rank, rank);
        prop_assert_eq!(node.launch.attempt, 2);
        prop_assert!(!node.launch.processes.is_empty());
        for process in &node.launch.processes {
            let env = env_of(process);
            let want = [
                ("NNODES", nnodes.to_string()),
                ("NODE_RANK", rank.to_string()),
                ("NPROC_PER_NODE", nproc.to_string()),
                ("WORLD_SIZE", (nnodes * nproc).to_string()),
                ("MASTER_ADDR", master.clone()),
                ("MASTER_PORT", port.to_string()),
                ("CUDA_VISIBLE_DEVICES", join(gpus)),
                ("COHORT_NODE_NAME", name.clone()),
                ("COHORT_ATTEMPT", "2".into()),
            ];
            for (key, value) in want {
                prop_assert_eq!(env.get(key).copied(), Some(value.as_str()), "{} on {}", key, name);
            }
            // A per-rank process gets what torchrun gives its workers; a per-node one leaves them to torchrun.
            let per_rank = process.global_rank.map(|_| {
                [
                    ("LOCAL_RANK", process.index.to_string()),
                    ("LOCAL_WORLD_SIZE", nproc.to_string()),
                    ("GROUP_RANK", rank.to_string()),
                ]
            });
            for key in ["LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"] {
                let want = per_rank.as_ref().and_then(|vars| vars.iter().find(|(k, _)| *k == key)).map(|(_, v)| v);
                prop_assert_eq!(env.get(key).copied(), want.map(String::as_str), "{} on {}", key, name);
            }
        }
        // Global ranks as torchrun (per-node) or the agent (per-rank) number them.
        let globals: Vec<u32> = match node.launch.processes.iter().map(|p| p.global_rank).collect::<Option<Vec<_>>>() {
            Some(globals) => globals,
            None => (0..nproc).map(|local| rank * nproc + local).collect(),
        };
        for global in globals {
            prop_assert!(rank_node.insert(global, name.clone()).is_none(), "global rank {} given twice", global);
        }
        let prepare = node.prepare.as_ref().unwrap();
        prop_assert_eq!(prepare.node_rank, rank);
        prop_assert_eq!(prepare.master_port, u32::from(port));
        prop_assert_eq!(&prepare.env, &node.launch.processes[0].env, "preparation checks the env the launch gets");
    }
    prop_assert_eq!(
        rank_node.keys().copied().collect::<Vec<_>>(),
        (0..nnodes * nproc).collect::<Vec<_>>(),
        "global ranks cover 0..world once"
    );
    Ok(rank_node.into_values().collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A placement holds the whole gang on free GPUs of available nodes, or
    /// there is none: it fails only when no choice of nodes could hold the job.
    #[test]
    fn placement_is_all_or_nothing(
        spec in command_spec(),
        inventory in random_cluster(),
        excluded in prop::collection::btree_set(0usize..12, 0..3),
    ) {
        let excluded: Vec<String> = excluded.iter().map(|i| format!("node-{i:02}")).collect();
        match place(&spec, &inventory, &excluded) {
            Err(e) => {
                prop_assert!(!fits(&spec, &inventory), "refused although it fits: {}", e);
                prop_assert_eq!(e.wanted, spec.nodes);
            }
            Ok(placement) => {
                prop_assert_eq!(placement.nodes.len() as u32, spec.nodes);
                let names: BTreeSet<&str> = placement.nodes.iter().map(|(n, _)| n.as_str()).collect();
                prop_assert_eq!(names.len(), placement.nodes.len(), "a node twice in one gang");
                for (name, gpus) in &placement.nodes {
                    let node = inventory.iter().find(|n| &n.name == name).unwrap();
                    prop_assert!(node.unavailable.is_none(), "{} is {:?}", name, node.unavailable);
                    prop_assert_eq!(gpus.len() as u32, spec.gpus_per_node);
                    let distinct: BTreeSet<u32> = gpus.iter().copied().collect();
                    prop_assert_eq!(distinct.len(), gpus.len());
                    prop_assert!(gpus.iter().all(|g| node.free_gpus.contains(g)), "{} granted busy GPUs {:?}", name, gpus);
                }
                let without: Vec<NodeView> = inventory.iter().filter(|n| !excluded.contains(&n.name)).cloned().collect();
                if fits(&spec, &without) {
                    prop_assert!(names.iter().all(|n| !excluded.iter().any(|e| e == n)), "a blamed node used though others suffice");
                }
                check_plan(&spec, &placement, &inventory, 29500)?;
            }
        }
    }

    /// A megatron-sft spec that validates renders TP groups (consecutive global
    /// ranks) that never span nodes, with the TP it asked for.
    #[test]
    fn tensor_parallel_groups_stay_inside_a_node((yaml, tp) in megatron_yaml(), inventory in roomy_cluster()) {
        let Ok(spec) = JobSpec::from_yaml(&yaml, "m.yaml") else {
            // The spec checks refuse a TP that does not divide gpus_per_node (and other misfits).
            return Ok(());
        };
        prop_assert_eq!(spec.gpus_per_node % tp, 0);
        let Ok(placement) = place(&spec, &inventory, &[]) else { return Ok(()) };
        let rank_node = check_plan(&spec, &placement, &inventory, 29500)?;
        for group in rank_node.chunks(tp as usize) {
            prop_assert!(group.iter().all(|n| n == &group[0]), "TP group spans nodes: {:?}", group);
        }
        let Workload::MegatronSft(m) = &spec.workload else { unreachable!() };
        let argv = command_line(&spec).0;
        let flag = argv.iter().position(|a| a == "--tensor_model_parallel_size").map(|i| argv[i + 1].clone());
        prop_assert_eq!(flag, Some(tp.to_string()));
        prop_assert_eq!(m.layout(spec.nodes, spec.gpus_per_node).tp, tp);
    }

    /// Jobs placed one after another on one cluster (as the scheduler does)
    /// never share a GPU, and no two concurrent plans (so no node) get the same
    /// MASTER_PORT; the range running out stops placement instead.
    #[test]
    fn concurrent_plans_never_share_a_port_or_a_gpu(
        mut inventory in random_cluster(),
        specs in prop::collection::vec(command_spec(), 1..8),
        ports in 1u16..6,
        start in 0u16..8,
    ) {
        let range = 29500..=29500 + ports - 1;
        let mut used: HashSet<u16> = HashSet::new();
        let mut next = 29500 + start;
        let mut ports_on: HashMap<String, Vec<u16>> = HashMap::new();
        for spec in &specs {
            let Ok(placement) = place(spec, &inventory, &[]) else { continue };
            let Some(port) = next_master_port(&range, next, &used) else {
                prop_assert_eq!(used.len(), usize::from(ports), "no port although some are free");
                break;
            };
            prop_assert!(range.contains(&port));
            prop_assert!(used.insert(port), "port {} leased twice", port);
            next = port.saturating_add(1);
            check_plan(spec, &placement, &inventory, port)?;
            for (name, gpus) in &placement.nodes {
                ports_on.entry(name.clone()).or_default().push(port);
                let node = inventory.iter_mut().find(|n| &n.name == name).unwrap();
                node.free_gpus.retain(|g| !gpus.contains(g));
            }
        }
        for (node, ports) in ports_on {
            let distinct: HashSet<&u16> = ports.iter().collect();
            prop_assert_eq!(distinct.len(), ports.len(), "a port used twice on {}", node);
        }
    }
}
