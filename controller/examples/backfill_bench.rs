//! How long one EASY backfill decision takes on a big cluster: a reservation
//! for a blocked 64-node (then 900-node) head job, then a backfill check for each of 1,000
//! pending 1-node jobs, over 1,000 nodes × 8 GPUs with 990 of them busy.
//! `cargo run -p cohort-controller --example backfill_bench [--release]`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cohort_controller::planner::{NodeView, RunningGang, backfill, reserve};
use cohort_shared::spec::JobSpec;

fn spec(nodes: u32) -> anyhow::Result<JobSpec> {
    let yaml = format!("name: j\nkind: command\nnodes: {nodes}\ngpus_per_node: 8\ncommand: [x]\n");
    JobSpec::from_yaml(&yaml, "bench.yaml").map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() -> anyhow::Result<()> {
    const NODES: usize = 1000;
    const BUSY: usize = 990;
    let mut inventory = Vec::new();
    let mut running = Vec::new();
    for i in 0..NODES {
        let name = format!("node-{i:04}");
        let busy = i < BUSY;
        inventory.push(NodeView {
            name: name.clone(),
            address: format!("10.0.{}.{}", i / 256, i % 256),
            labels: HashMap::new(),
            free_gpus: if busy { Vec::new() } else { (0..8).collect() },
            total_gpus: 8,
            unavailable: None,
            node_env: Vec::new(),
            islands: HashMap::new(),
        });
        if busy {
            // Gangs end over the next ~16 hours, one a minute.
            running.push(RunningGang { gpus: vec![(name, (0..8).collect())], ends_unix_ms: Some(i as i64 * 60_000) });
        }
    }
    let small = spec(1)?;
    for (round, head_nodes) in [(1, 64), (2, 64), (3, 64), (4, 900), (5, 900)] {
        let head = spec(head_nodes)?;
        let start = Instant::now();
        let reservation =
            reserve("head", &head, &inventory, &running, 0).ok_or_else(|| anyhow::anyhow!("no reservation"))?;
        let reserved_in = start.elapsed();
        let start = Instant::now();
        let mut started = 0;
        for i in 0..1000u64 {
            let limit = Duration::from_secs(60 * (i % 120 + 1));
            if backfill(&small, Some(limit), &inventory, &[], &reservation, 0).is_ok() {
                started += 1;
            }
        }
        let checked_in = start.elapsed();
        println!(
            "round {round}: reserve ({head_nodes}-node head, {} running gangs, {NODES} nodes): {:.1} ms; 1000 backfill checks: {:.1} ms ({started} would start)",
            running.len(),
            reserved_in.as_secs_f64() * 1e3,
            checked_in.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
