//! The job-file fuzz target's inputs on the stable toolchain: every seed of
//! `fuzz/corpus/job_file` and every example of `examples/jobs`, mutations of
//! them, and hostile files up to 1 MiB built from the shapes that cost a
//! parser most (nesting, indentation, aliases, many keys), through the same
//! property (`spec::fuzzing::check_job_file`): no panic, every error names a
//! field or a line, and each input is checked within the controller's
//! `--job-file-check-timeout` default (5 s; `COHORT_FUZZ_BUDGET_MS`).
//! `COHORT_FUZZ_CASES=200000` runs longer (the mutation count; the 1 MiB
//! inputs get a hundredth of it); `cargo +nightly fuzz run job_file`
//! explores further.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_shared::spec::fuzzing::check_job_file;
use proptest::prelude::*;

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(read_seeds)
}

fn read_seeds() -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = root.join("fuzz/corpus/job_file");
    let examples = root.join("examples/jobs");
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for (dir, keep) in [(&corpus, "seed-"), (&examples, "")] {
        let found = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(keep))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            });
        seeds.extend(found);
    }
    seeds.sort();
    assert!(seeds.len() >= 10, "too few seeds in {} and {}", corpus.display(), examples.display());
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Mutations per run (`COHORT_FUZZ_CASES`).
fn cases() -> u32 {
    env_number("COHORT_FUZZ_CASES", 4000).min(u64::from(u32::MAX)) as u32
}

/// The property, and that it held within the budget a controller gives one file.
fn check_within_budget(text: &str) {
    let budget = Duration::from_millis(env_number("COHORT_FUZZ_BUDGET_MS", 5000));
    let started = Instant::now();
    check_job_file(text);
    let took = started.elapsed();
    assert!(
        took <= budget,
        "a {} byte job file took {took:?} to check, over the {budget:?} a controller allows (starts {:?})",
        text.len(),
        text.chars().take(120).collect::<String>()
    );
}

/// A hostile file up to 1 MiB: a valid head, then runs of the units that cost
/// a YAML parser most, each repeated many times.
fn hostile_file() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec![
        "[", "{", "[]", "- ", " ", "\n", "*a, ", "&a ", "  K: v\n", "a", "\"", "? ", ": ", "!!str ", "#", "<<: *a\n",
    ]);
    prop::collection::vec((unit, 1usize..200_000), 1..4).prop_map(|runs| {
        let mut text = String::from("name: fuzz\nkind: command\nnodes: 1\ncommand: [x]\na: &a [1]\nx: ");
        for (unit, count) in runs {
            let room = (1usize << 20).saturating_sub(text.len()) / unit.len();
            text.push_str(&unit.repeat(count.min(room)));
        }
        text
    })
}

/// One edit of a byte string, as libFuzzer's mutators make them, plus a line
/// swap (YAML is line-shaped).
#[derive(Debug, Clone)]
enum Edit {
    Flip { at: usize, byte: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Duplicate { at: usize, len: usize },
    LineFromOther { other: usize, line: usize, at_line: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop::sample::select(vec![
        b":".to_vec(),
        b"- ".to_vec(),
        b"\n  ".to_vec(),
        b"{".to_vec(),
        b"[".to_vec(),
        b"&a ".to_vec(),
        b"*a".to_vec(),
        b"<<: ".to_vec(),
        b"!!binary ".to_vec(),
        b"\"".to_vec(),
        b"~".to_vec(),
        b"-1".to_vec(),
        b"99999999999999999999".to_vec(),
        b"1e400".to_vec(),
        b"${".to_vec(),
        b"\t".to_vec(),
        "\u{feff}é".as_bytes().to_vec(),
    ]);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Flip { at, byte }),
        (any::<usize>(), prop_oneof![token, prop::collection::vec(any::<u8>(), 1..8)])
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Edit::Duplicate { at, len }),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(other, line, at_line)| Edit::LineFromOther {
            other,
            line,
            at_line
        }),
    ]
}

fn apply(mut text: Vec<u8>, edit: &Edit, seeds: &[Vec<u8>]) -> Vec<u8> {
    let len = text.len().max(1);
    match *edit {
        Edit::Flip { at, byte } => {
            if !text.is_empty() {
                text[at % len] ^= byte;
            }
        }
        Edit::Insert { at, ref bytes } => {
            let at = at % (text.len() + 1);
            text.splice(at..at, bytes.iter().copied());
        }
        Edit::Delete { at, len: n } => {
            let at = at % len;
            let end = (at + n).min(text.len());
            if at < end {
                text.drain(at..end);
            }
        }
        Edit::Duplicate { at, len: n } => {
            let at = at % len;
            let end = (at + n).min(text.len());
            if at < end {
                let chunk: Vec<u8> = text[at..end].to_vec();
                text.splice(end..end, chunk);
            }
        }
        Edit::LineFromOther { other, line, at_line } => {
            let other = &seeds[other % seeds.len()];
            let lines: Vec<&[u8]> = other.split(|b| *b == b'\n').collect();
            let picked = lines[line % lines.len()].to_vec();
            let mut own: Vec<Vec<u8>> = text.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
            let at = at_line % (own.len() + 1);
            own.insert(at, picked);
            text = own.join(&b'\n');
        }
    }
    text
}

#[test]
fn every_seed_holds() {
    for seed in seeds() {
        check_within_budget(&String::from_utf8_lossy(seed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_hold(seed in any::<usize>(), edits in prop::collection::vec(edit(), 1..6)) {
        let seeds = seeds();
        let mut text = seeds[seed % seeds.len()].clone();
        for e in &edits {
            text = apply(text, e, seeds);
        }
        check_within_budget(&String::from_utf8_lossy(&text));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: (cases() / 100).max(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_files_up_to_one_mib_hold(text in hostile_file()) {
        check_within_budget(&text);
    }

    #[test]
    fn raw_bytes_up_to_one_mib_hold(seed in any::<u64>(), len in 0usize..(1 << 20)) {
        use rand::{RngCore, SeedableRng};
        let mut bytes = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        check_within_budget(&String::from_utf8_lossy(&bytes));
    }
}

/// Found by `mutated_seeds_hold`: an empty text key (`!!binary &c` decodes
/// to nothing) was reported as "unknown key ``" with neither field nor line.
#[test]
fn an_empty_top_level_key_names_its_line() {
    for text in [
        "name: a\nkind: command\n!!binary &c : x\ncommand: [x]\n",
        "name: a\nkind: command\n\"\": x\ncommand: [x]\n",
        "name: a\nkind: command\n!!binary : x\ncommand: [x]\n",
    ] {
        check_job_file(text);
        let errors = cohort_shared::spec::JobSpec::from_yaml(text, "job.yaml").unwrap_err();
        assert!(
            errors.issues.iter().any(|i| i.message.contains("empty top-level key") && i.line == Some(3)),
            "{errors}"
        );
    }
}
