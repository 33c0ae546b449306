//! Prints what the agent sees of this machine's GPUs, as JSON: the inventory
//! with topology and NVLink islands, whether XID/ECC events can be watched,
//! and 3 telemetry samples (1 s apart) with the health policy applied and how
//! long each poll took.
//!
//! ```text
//! cargo run --release -p cohort-agent --example gpu_probe                 # NVML
//! cargo run --release -p cohort-agent --example gpu_probe -- --fake 4,4   # fake islands
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cohort_agent::gpu::{FakeBackend, GpuBackend, GpuHealthTracker, NvmlBackend};
use cohort_proto::now_unix_ms;
use serde_json::json;

const SAMPLES: usize = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend: Box<dyn GpuBackend> = match args.iter().position(|a| a == "--fake") {
        Some(i) => {
            let sizes = args.get(i + 1).map(String::as_str).unwrap_or("1");
            let sizes: Vec<u32> = sizes.split(',').map(str::parse).collect::<Result<_, _>>()?;
            Box::new(FakeBackend::with_islands(&sizes))
        }
        None => Box::new(NvmlBackend::open()),
    };

    let started = Instant::now();
    let inventory = backend.inventory();
    let inventory_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut islands: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for gpu in &inventory.gpus {
        islands.entry(gpu.nvlink_island).or_default().push(gpu.index);
    }
    let (tx, _rx) = tokio::sync::mpsc::channel(16);
    let events = match backend.watch_events(&inventory.gpus, tx) {
        Ok(()) => "watching XID and ECC events".to_string(),
        Err(e) => format!("events not watched: {e}"),
    };

    let mut trackers: BTreeMap<u32, GpuHealthTracker> =
        inventory.gpus.iter().map(|g| (g.index, GpuHealthTracker::new(now_unix_ms()))).collect();
    let mut samples = Vec::new();
    for n in 0..SAMPLES {
        if n > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let started = Instant::now();
        let polled = backend.poll(&inventory.gpus);
        let poll_ms = started.elapsed().as_secs_f64() * 1000.0;
        let gpus: Vec<_> = polled
            .into_iter()
            .map(|s| {
                let mut t = s.telemetry;
                if let Some(tracker) = trackers.get_mut(&t.index) {
                    t.health = Some(tracker.observe(&t, s.lost, now_unix_ms()));
                }
                // pbjson leaves zero values out; the index is spelled out.
                json!({ "index": t.index, "lost": s.lost, "telemetry": t })
            })
            .collect();
        samples.push(json!({ "poll_ms": poll_ms, "gpus": gpus }));
    }

    let report = json!({
        "note": inventory.note,
        "inventory_ms": inventory_ms,
        "gpus": inventory.gpus.iter().map(|g| json!({
            "index": g.index,
            "uuid": g.uuid,
            "name": g.name,
            "pci_bus_id": g.pci_bus_id,
            "memory_total_bytes": g.memory_total_bytes,
            "nvlink_island": g.nvlink_island,
            "links": g.links.iter().map(|l| json!({ "peer": l.peer_index, "kind": l.kind, "nvlinks": l.nvlinks })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "nvlink_islands": islands,
        "events": events,
        "samples": samples,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
