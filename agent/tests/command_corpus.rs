//! The agent-command fuzz target's inputs on the stable toolchain: every seed
//! of `fuzz/corpus/agent_command` (encoded `ControllerMessage`s), a few
//! thousand byte-level mutations of them, and generated commands with hostile
//! fields, through the same property (`commands::check_bytes`): no panic,
//! and every refusal names the field at fault.
//! `COHORT_WRITE_FUZZ_SEEDS=1 cargo test -p cohort-agent --test command_corpus`
//! rewrites the seeds from `seed_messages`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cohort_agent::commands::{CommandError, check, check_bytes};
use cohort_proto::controller_message::Command;
use cohort_proto::{
    ClearGpuCommand, ControllerMessage, DumpStacksCommand, EnvVar, FetchLogsCommand, FindCheckpointCommand,
    HeartbeatAck, InspectPathCommand, LaunchCommand, PrepareCommand, ProcessSpec, StageInput, StopCommand,
};
use proptest::prelude::*;
use prost::Message as _;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/agent_command")
}

/// Commands as the controller sends them, one of each kind; the launches run
/// the test payloads (tests/payloads).
fn seed_messages() -> Vec<(&'static str, ControllerMessage)> {
    let message = |command_id, command| ControllerMessage { command_id, command: Some(command) };
    let process = |index, argv: &[&str], env: &[(&str, &str)]| ProcessSpec {
        index,
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: env.iter().map(|(n, v)| EnvVar { name: (*n).into(), value: (*v).into() }).collect(),
        global_rank: Some(index),
    };
    vec![
        (
            "launch-rendezvous",
            message(
                1,
                Command::Launch(LaunchCommand {
                    job_id: "rdzv-3".into(),
                    attempt: 1,
                    node_rank: 1,
                    workdir: "/srv/cohort/tests/payloads".into(),
                    stop_grace_ms: 10_000,
                    processes: vec![
                        process(0, &["python3", "rendezvous.py"], &[("MASTER_ADDR", "10.0.0.11"), ("RANK", "2")]),
                        process(1, &["python3", "rendezvous.py"], &[("MASTER_ADDR", "10.0.0.11"), ("RANK", "3")]),
                    ],
                    metrics_dir: String::new(),
                    user: "alice".into(),
                }),
            ),
        ),
        (
            "launch-lockstep",
            message(
                2,
                Command::Launch(LaunchCommand {
                    job_id: "pipe-7.train".into(),
                    attempt: 2,
                    processes: vec![process(0, &["python3", "lockstep.py", "--steps", "100"], &[("HF_TOKEN", "x")])],
                    metrics_dir: "/data/out".into(),
                    ..Default::default()
                }),
            ),
        ),
        (
            "stop",
            message(
                3,
                Command::Stop(StopCommand {
                    job_id: "rdzv-3".into(),
                    attempt: 1,
                    grace_ms: 5000,
                    reason: "cancelled".into(),
                    ..Default::default()
                }),
            ),
        ),
        (
            "prepare",
            message(
                4,
                Command::Prepare(PrepareCommand {
                    job_id: "sft-1".into(),
                    attempt: 1,
                    python: "python3".into(),
                    probe_packages: true,
                    shared_paths: vec!["/mnt/shared".into()],
                    marker: "m-1".into(),
                    output_dir: "/mnt/shared/out".into(),
                    master_port: 29500,
                    interfaces: vec!["eth0".into()],
                    stage: vec![StageInput {
                        name: "data".into(),
                        source: "https://example.invalid/d.jsonl".into(),
                        sha256: "0".repeat(64),
                        ..Default::default()
                    }],
                    datasets: vec!["/mnt/shared/train.jsonl".into()],
                    ..Default::default()
                }),
            ),
        ),
        (
            "find-checkpoint",
            message(
                5,
                Command::FindCheckpoint(FindCheckpointCommand { directory: "/ckpt".into(), user: "alice".into() }),
            ),
        ),
        ("clear-gpu", message(6, Command::ClearGpu(ClearGpuCommand { index: 3 }))),
        ("heartbeat-ack", message(7, Command::HeartbeatAck(HeartbeatAck::default()))),
        (
            "inspect-path",
            message(
                8,
                Command::InspectPath(InspectPathCommand {
                    path: "/cache/model".into(),
                    digest: true,
                    read: true,
                    suffix: ".json".into(),
                    max_bytes: 1 << 20,
                    remove: false,
                    user: "alice".into(),
                }),
            ),
        ),
        ("dump-stacks", message(9, Command::DumpStacks(DumpStacksCommand { job_id: "sft-1".into(), attempt: 1 }))),
        (
            "fetch-logs",
            message(
                10,
                Command::FetchLogs(FetchLogsCommand { job_id: "sft-1".into(), attempt: 1, max_lines_per_file: 100 }),
            ),
        ),
    ]
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| seed_messages().into_iter().map(|(_, m)| m.encode_to_vec()).collect())
}

#[test]
fn the_checked_in_seeds_are_the_seed_messages() {
    let dir = corpus_dir();
    for (name, message) in seed_messages() {
        let path = dir.join(format!("seed-{name}"));
        let bytes = message.encode_to_vec();
        if std::env::var_os("COHORT_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; COHORT_WRITE_FUZZ_SEEDS=1 cargo test -p cohort-agent --test command_corpus",
                path.display()
            )
        });
        assert_eq!(stored, bytes, "{} differs from seed_messages()", path.display());
        assert_eq!(check(&message), Ok(()), "seed {name} must pass the agent's checks");
        check_bytes(&stored);
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Flip { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Splice { other: usize, from: usize, len: usize, at: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Flip { at, byte }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..10)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1..32usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), any::<usize>(), 1..64usize, any::<usize>()).prop_map(|(other, from, len, at)| Edit::Splice {
            other,
            from,
            len,
            at
        }),
    ]
}

fn apply(mut bytes: Vec<u8>, edit: &Edit) -> Vec<u8> {
    let len = bytes.len().max(1);
    match *edit {
        Edit::Flip { at, byte } => {
            if !bytes.is_empty() {
                bytes[at % len] ^= byte;
            }
        }
        Edit::Insert { at, bytes: ref new } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Edit::Delete { at, len: n } => {
            let at = at % len;
            let end = (at + n).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
        Edit::Splice { other, from, len: n, at } => {
            let other = &seeds()[other % seeds().len()];
            let from = from % other.len().max(1);
            let chunk = &other[from..(from + n).min(other.len())];
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, chunk.iter().copied());
        }
    }
    bytes
}

/// Text a controller would never send: path tricks, NULs, spaces, long runs.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{1,12}",
        Just(String::new()),
        Just("..".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("a\0b".to_owned()),
        Just("x".repeat(300)),
        "\\PC{0,16}",
        ".{0,8}",
    ]
}

fn launch_of(job_id: String, user: String, argvs: Vec<Vec<String>>, env_name: String) -> ControllerMessage {
    let processes = argvs
        .into_iter()
        .enumerate()
        .map(|(i, argv)| ProcessSpec {
            index: (i as u32) % 3,
            argv,
            env: vec![EnvVar { name: env_name.clone(), value: "v".into() }],
            global_rank: None,
        })
        .collect();
    ControllerMessage {
        command_id: 1,
        command: Some(Command::Launch(LaunchCommand { job_id, user, processes, ..Default::default() })),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_hold(seed in any::<usize>(), edits in prop::collection::vec(edit(), 1..6)) {
        let mut bytes = seeds()[seed % seeds().len()].clone();
        for e in &edits {
            bytes = apply(bytes, e);
        }
        check_bytes(&bytes);
    }

    #[test]
    fn hostile_launches_are_refused_by_field(
        job_id in hostile_text(),
        user in hostile_text(),
        argvs in prop::collection::vec(prop::collection::vec(hostile_text(), 0..3), 0..4),
        env_name in hostile_text(),
    ) {
        let message = launch_of(job_id, user, argvs, env_name);
        match check(&message) {
            Ok(()) => {}
            Err(CommandError::Field { field, message }) => {
                prop_assert!(field.starts_with("LaunchCommand."), "{field}: {message}");
            }
            Err(other) => prop_assert!(false, "a decoded message cannot fail to decode: {other}"),
        }
        check_bytes(&message.encode_to_vec());
    }
}
