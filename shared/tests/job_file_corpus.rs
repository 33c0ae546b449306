//! The job-file fuzz target's inputs on the stable toolchain: every seed of
//! `fuzz/corpus/job_file`, then a few thousand mutations of them, through
//! the same property (`spec::fuzzing::check_job_file`): no panic, and every
//! error names a field or a line. `cargo +nightly fuzz run job_file` explores
//! further.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cohort_shared::spec::fuzzing::check_job_file;
use proptest::prelude::*;

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(read_seeds)
}

fn read_seeds() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/job_file");
    let mut seeds: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seed-"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "too few seeds in {}", dir.display());
    seeds.into_iter().map(|(_, bytes)| bytes).collect()
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
        check_job_file(&String::from_utf8_lossy(seed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_hold(seed in any::<usize>(), edits in prop::collection::vec(edit(), 1..6)) {
        let seeds = seeds();
        let mut text = seeds[seed % seeds.len()].clone();
        for e in &edits {
            text = apply(text, e, seeds);
        }
        check_job_file(&String::from_utf8_lossy(&text));
    }
}
