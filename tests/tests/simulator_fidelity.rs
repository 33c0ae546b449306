//! The simulator decides as the controller does: random small clusters and
//! queues, random jobs, one scheduling pass of the real Controller (register,
//! submit, reconcile on an embedded store) against cohort-sim's engine on the
//! same jobs, under both `--scheduler` policies; the same jobs must start.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../src/bin/cohort_sim/engine.rs"]
mod engine;
#[allow(dead_code)]
#[path = "../src/bin/cohort_sim/trace.rs"]
mod trace;

use std::collections::BTreeSet;
use std::sync::Arc;

use cohort_controller::queues::{Queues, Scheduler};
use cohort_controller::store::EmbeddedStore;
use cohort_controller::{Controller, ControllerConfig};
use cohort_proto::{GpuInfo, JobFile, JobState, NodeInfo, RegisterRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trace::TraceJob;

const NODES: u32 = 4;
const GPUS: u32 = 2;

/// A queue file with a quota on `qa` (borrowing or not) and none on `qb`;
/// `qa` does not reclaim: the simulator's victims free their GPUs within the
/// pass, the controller's only once their gangs are seen gone (later passes).
fn queue_file(rng: &mut ChaCha8Rng) -> String {
    let quota = rng.random_range(1..=6);
    let borrow = rng.random_bool(0.5);
    format!(
        "[[queue]]\nname = \"qa\"\ngpus = {quota}\nborrow = {borrow}\nreclaim = false\nmax_run_time = \"4h\"\n\
         [[queue]]\nname = \"qb\"\nmax_run_time = \"4h\"\n"
    )
}

/// Jobs that all fit an idle cluster (the first ones start and hold GPUs),
/// with time limits from 5 minutes to 2 hours.
fn jobs(rng: &mut ChaCha8Rng, quota_text: &str) -> Vec<TraceJob> {
    let quota: u32 = quota_text.split("gpus = ").nth(1).and_then(|s| s.split('\n').next()).unwrap().parse().unwrap();
    let borrow = quota_text.contains("borrow = true");
    (0..rng.random_range(3..=9))
        .filter_map(|_| {
            let nodes = rng.random_range(1..=3);
            let gpus_per_node = rng.random_range(1..=GPUS);
            let queue = if rng.random_bool(0.5) { "qa" } else { "qb" };
            // Submit refuses a job over the quota of a queue that does not borrow.
            if queue == "qa" && !borrow && nodes * gpus_per_node > quota {
                return None;
            }
            let limit_s = [300.0, 1800.0, 3600.0, 7200.0][rng.random_range(0..4)];
            Some(TraceJob {
                submit_s: 0.0,
                queue: queue.into(),
                user: "u".into(),
                nodes,
                gpus_per_node,
                run_s: limit_s / 2.0,
                limit_s,
            })
        })
        .collect()
}

/// The jobs the real controller starts in one pass.
async fn controller_starts(queues: Queues, policy: Scheduler, trace: &[TraceJob]) -> BTreeSet<usize> {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("store")).unwrap());
    let config = ControllerConfig { queues, scheduler: policy, ..ControllerConfig::default() };
    let controller = Controller::load(store, dir.path(), config).await.unwrap();
    let mut sessions = Vec::new();
    for i in 0..NODES {
        let name = format!("n{i:05}");
        let node = NodeInfo {
            name: name.clone(),
            advertise_addr: "127.0.0.1".into(),
            gpus: (0..GPUS).map(|index| GpuInfo { index, ..Default::default() }).collect(),
            ..NodeInfo::default()
        };
        let registered = controller.register(RegisterRequest { node: Some(node), ..Default::default() }).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        controller.attach(&name, &registered.session_id, tx).await.unwrap();
        sessions.push(rx);
    }
    let mut ids = Vec::new();
    for (i, job) in trace.iter().enumerate() {
        let yaml = format!(
            "name: j{i}\nkind: command\nnodes: {}\ngpus_per_node: {}\nqueue: {}\ntime_limit: {}s\ncommand: [sleep, '1000']\n",
            job.nodes, job.gpus_per_node, job.queue, job.limit_s
        );
        let file = JobFile { yaml, source_name: "t.yaml".into(), submitted_by: job.user.clone(), ..JobFile::default() };
        ids.push(controller.submit(file, Default::default()).await.unwrap().0.id);
    }
    controller.reconcile().await.unwrap();
    let mut started = BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        if controller.get(id).await.unwrap().state != JobState::Pending as i32 {
            started.insert(i);
        }
    }
    started
}

fn simulator_starts(queues: Queues, policy: Scheduler, trace: &[TraceJob]) -> BTreeSet<usize> {
    let sim = engine::Sim::new(trace, queues, policy, NODES, GPUS, true).unwrap();
    let run = sim.run(0);
    assert_eq!(run.checks.overcommits + run.checks.reservations_delayed, 0);
    run.outcomes.iter().enumerate().filter(|(_, o)| o.start_ms.is_some()).map(|(i, _)| i).collect()
}

#[tokio::test]
async fn one_pass_of_the_simulator_starts_the_jobs_the_controller_starts() {
    let mut differ = 0;
    let mut blocked = 0;
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let text = queue_file(&mut rng);
        let trace = jobs(&mut rng, &text);
        for policy in [Scheduler::Backfill, Scheduler::Fifo] {
            let queues = Queues::parse(&text).unwrap();
            let real = controller_starts(queues.clone(), policy, &trace).await;
            let simulated = simulator_starts(queues, policy, &trace);
            if real != simulated {
                differ += 1;
                eprintln!(
                    "seed {seed} {policy:?}: controller started {real:?}, simulator {simulated:?}\n{text}{trace:?}"
                );
            }
            blocked += usize::from(real.len() < trace.len());
        }
    }
    assert_eq!(differ, 0, "the simulator and the controller decided differently (above)");
    assert!(blocked > 10, "too few passes left a job waiting to tell the policies apart: {blocked}");
}
