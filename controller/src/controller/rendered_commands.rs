//! The prepare and launch commands agents receive, and `cohort plan`'s
//! rendering, compared byte for byte with `testdata/rendered_commands.txt`:
//! a change to any rendering rule shows up here as a diff. After an intended
//! change, regenerate with `COHORT_BLESS=1 cargo test -p cohort-controller --lib rendered_commands`.

#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

use cohort_proto::process_event::Event;
use cohort_proto::query_result::Result as Answer;
use cohort_proto::{CheckpointAnswer, EnvVar, GpuInfo, PrepareResult, ProcessEvent, RegisterRequest, StagedInput};

use super::*;
use crate::store::EmbeddedStore;

type Session = mpsc::UnboundedReceiver<Result<ControllerMessage, Status>>;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/controller/testdata/rendered_commands.txt");

/// A node with 8 GPUs on two NVLink islands and the node-specific variables of the contract.
fn node_info(name: &str, index: usize) -> NodeInfo {
    let gpus = (0..8).map(|i| GpuInfo { index: i, nvlink_island: i / 4, ..Default::default() }).collect();
    NodeInfo {
        name: name.into(),
        advertise_addr: format!("10.0.0.{}", index + 1),
        gpus,
        node_env: vec![
            EnvVar { name: "MODELSCOPE_CACHE".into(), value: "/mnt/shared/modelscope".into() },
            EnvVar { name: "NCCL_SOCKET_IFNAME".into(), value: "^docker,=eth0,ib0".into() },
            EnvVar { name: "OMP_NUM_THREADS".into(), value: "8".into() },
        ],
        ..NodeInfo::default()
    }
}

async fn cluster(dir: &Path, nodes: usize) -> (Arc<Controller>, Vec<Session>) {
    let store = Arc::new(EmbeddedStore::open(&dir.join("store")).unwrap());
    let controller = Controller::load(store, dir, ControllerConfig::default()).await.unwrap();
    let mut sessions = Vec::new();
    for i in 0..nodes {
        let name = format!("n{i}");
        let request = RegisterRequest { node: Some(node_info(&name, i)), ..Default::default() };
        let registered = controller.register(request).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        controller.attach(&name, &registered.session_id, tx).await.unwrap();
        sessions.push(rx);
    }
    (controller, sessions)
}

fn file(yaml: &str) -> JobFile {
    JobFile { yaml: yaml.into(), source_name: "t.yaml".into(), ..JobFile::default() }
}

/// Every command the sessions received since the last call, with its node; the
/// prepare marker's random part masked.
fn received(sessions: &mut [Session], out: &mut String) -> Vec<(usize, ControllerMessage)> {
    let mut all = Vec::new();
    for (i, session) in sessions.iter_mut().enumerate() {
        while let Ok(Ok(msg)) = session.try_recv() {
            let mut shown = msg.command.clone();
            if let Some(Command::Prepare(p)) = shown.as_mut() {
                let keep = p.marker.rfind('-').unwrap_or(0);
                p.marker.replace_range(keep.., "-<random>");
            }
            writeln!(out, "--- n{i}: {shown:#?}").unwrap();
            all.push((i, msg));
        }
    }
    all
}

fn prepared(id: &str, attempt: u32, staged: &[(&str, &str)]) -> PrepareResult {
    let staged = staged
        .iter()
        .map(|(name, path)| StagedInput { name: (*name).into(), path: (*path).into(), ..Default::default() })
        .collect();
    PrepareResult { job_id: id.into(), attempt, staged, ..PrepareResult::default() }
}

const COMMAND_PER_NODE: &str = "name: hello\nkind: command\nnodes: 3\ngpus_per_node: 1\nworkdir: /srv/payloads\n\
env:\n  OMP_NUM_THREADS: \"1\"\ncommand: [python3, rendezvous.py]\n";
const COMMAND_PER_RANK: &str = "name: ranks\nkind: command\nnodes: 2\ngpus_per_node: 3\nlaunch: per-rank\n\
stop_grace: 5s\ncommand: [python3, train.py, --steps, \"60\"]\n";
const COMMAND_STAGED: &str = "name: staged
kind: command
nodes: 2
gpus_per_node: 2
workdir: /srv/w
shared_paths: [/mnt/shared/data]
stage:
  - name: weights
    source: /mnt/shared/w.bin
    sha256: abababababababababababababababababababababababababababababababab
command: [./run.sh]
";
const MEGATRON: &str = "name: qwen3-8b-sft
kind: megatron-sft
nodes: 2
gpus_per_node: 2
workdir: /srv/jobs
env:
  MEGATRON_LM_PATH: /root/Megatron-LM
megatron:
  swift_version: 3
  load: Qwen3-8B-mcore
  dataset: [/root/dataset/a.jsonl, '/root/dataset/b.jsonl#500']
  tensor_model_parallel_size: 2
  sequence_parallel: true
  micro_batch_size: 2
  global_batch_size: 16
  save: out/qwen3
  save_interval: 50
";

#[tokio::test]
async fn commands_sent_to_agents_are_rendered_as_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, mut sessions) = cluster(dir.path(), 3).await;
    let mut out = String::new();

    for yaml in [COMMAND_PER_NODE, COMMAND_PER_RANK] {
        writeln!(out, "=== {}", yaml.lines().next().unwrap()).unwrap();
        let plan = controller.plan(file(yaml), false).await;
        writeln!(out, "--- plan: {:#?}", plan.plan).unwrap();
        let id = controller.submit(file(yaml), Default::default()).await.unwrap().0.id;
        controller.reconcile().await.unwrap();
        received(&mut sessions, &mut out);
        controller.cancel(&id).await.unwrap();
        received(&mut sessions, &mut out);
    }

    // Staged inputs become COHORT_STAGED_* variables of the node that staged them.
    writeln!(out, "=== staged").unwrap();
    let id = controller.submit(file(COMMAND_STAGED), Default::default()).await.unwrap().0.id;
    controller.reconcile().await.unwrap();
    let sent = received(&mut sessions, &mut out);
    for (i, (node, _)) in sent.iter().enumerate() {
        let path = format!("/var/cache/cohort/{i}/w.bin");
        controller.prepare_result(&format!("n{node}"), prepared(&id, 1, &[("weights", &path)])).await;
    }
    received(&mut sessions, &mut out);
    controller.cancel(&id).await.unwrap();
    received(&mut sessions, &mut out);

    // megatron-sft: prepared, launched, failed, then resumed from a checkpoint.
    writeln!(out, "=== megatron").unwrap();
    let plan = controller.plan(file(MEGATRON), false).await;
    writeln!(out, "--- plan: {:#?}", plan.plan).unwrap();
    let id = controller.submit(file(MEGATRON), Default::default()).await.unwrap().0.id;
    controller.reconcile().await.unwrap();
    let sent = received(&mut sessions, &mut out);
    for (node, _) in &sent {
        controller.prepare_result(&format!("n{node}"), prepared(&id, 1, &[])).await;
    }
    let sent = received(&mut sessions, &mut out);
    let (first, _) = sent.first().unwrap();
    let exited = ProcessExited { exit_code: Some(1), ..Default::default() };
    let event = ProcessEvent { job_id: id.clone(), attempt: 1, index: 0, event: Some(Event::Exited(exited)) };
    controller.process_event(&format!("n{first}"), event).await;
    received(&mut sessions, &mut out);
    // The other ranks end on their stop: a job is resumed once its processes are gone.
    for (node, _) in sent.iter().skip(1) {
        let stopped = ProcessExited { signal: Some(15), stopped_by_agent: true, ..Default::default() };
        let event = ProcessEvent { job_id: id.clone(), attempt: 1, index: 0, event: Some(Event::Exited(stopped)) };
        controller.process_event(&format!("n{node}"), event).await;
    }

    writeln!(out, "=== megatron resumed").unwrap();
    let resuming = {
        let controller = controller.clone();
        let id = id.clone();
        tokio::spawn(async move { controller.resume(&id).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let query = loop {
        let sent = received(&mut sessions, &mut out);
        if let Some((_, msg)) = sent.into_iter().find(|(_, m)| matches!(m.command, Some(Command::FindCheckpoint(_)))) {
            break msg;
        }
        assert!(
            std::time::Instant::now() < deadline && !resuming.is_finished(),
            "no checkpoint lookup was sent for the resume"
        );
        tokio::task::yield_now().await;
    };
    let checkpoint = cohort_proto::Checkpoint {
        iteration: 150,
        path: "/srv/jobs/out/qwen3/v0-20260101".into(),
        layout: "megatron-iter".into(),
    };
    let answer = CheckpointAnswer { checkpoint: Some(checkpoint), skipped: Vec::new() };
    let result =
        QueryResult { command_id: query.command_id, result: Some(Answer::Checkpoint(answer)), ..Default::default() };
    controller.query_result(result).await;
    resuming.await.unwrap().unwrap();
    controller.reconcile().await.unwrap();
    let sent = received(&mut sessions, &mut out);
    for (node, _) in &sent {
        controller.prepare_result(&format!("n{node}"), prepared(&id, 2, &[])).await;
    }
    received(&mut sessions, &mut out);

    if std::env::var_os("COHORT_BLESS").is_some() {
        std::fs::create_dir_all(Path::new(GOLDEN).parent().unwrap()).unwrap();
        std::fs::write(GOLDEN, &out).unwrap();
    }
    let expected = std::fs::read_to_string(GOLDEN).unwrap();
    if expected != out {
        let first = expected.lines().zip(out.lines()).position(|(a, b)| a != b);
        panic!(
            "the rendered commands differ from {GOLDEN} (first differing line {first:?}; {} lines recorded, {} now); \
             regenerate with COHORT_BLESS=1 if the change is intended",
            expected.lines().count(),
            out.lines().count()
        );
    }
}
